"""hnkit demo: attach a hypernetwork to a real pretrained model (SmolLM2-135M, offline) and generate.

    bash scripts/install.sh --demo && python scripts/demo.py

It creates a hypernetwork for the model's widths, checks that strength 0 reproduces the bare
model exactly, generates at strengths 0, 0.5 and 1, and saves/reloads it in both file formats.
(The next step, `hnkit train-text`, trains one on a style corpus; this demo shows the core.)
"""

import sys
import tempfile
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).parent))
import hnkit  # noqa: E402
from prepare_smollm2 import prepare_smollm2  # noqa: E402

PROMPT = "The old lighthouse keeper looked out at the sea and"


def main() -> None:
    console = Console()
    t0 = time.time()
    folder = prepare_smollm2()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    console.print(f"model: {folder} ({sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters)")

    torch.manual_seed(0)
    config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
    hn = hnkit.Hypernetwork.for_model(model, config, name="random-style")
    console.print(hn)

    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    with torch.no_grad():
        base_logits = model(ids).logits
    with hnkit.attach(model, hn, strength=0.0) as handle:
        with torch.no_grad():
            assert torch.equal(model(ids).logits, base_logits), "strength 0 must be the bare model"
        table = Table("strength", "continuation (greedy, 30 tokens)")
        for strength in (0.0, 0.5, 1.0):
            handle.strength = strength
            out = model.generate(ids, max_new_tokens=30, do_sample=False, pad_token_id=tokenizer.eos_token_id)
            table.add_row(f"{strength:g}", tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True))
    console.print(table)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, base_logits), "remove() must restore the bare model"

    with tempfile.TemporaryDirectory() as d:
        for name in ("style.safetensors", "style.pt"):
            path = hnkit.save(hn, Path(d) / name)
            back = hnkit.load(path)
            same = all(torch.equal(a, b) for a, b in zip(hn.state_dict().values(), back.state_dict().values()))
            console.print(f"saved and reloaded {name}: {path.stat().st_size / 1e6:.1f} MB, identical={same}")
            assert same
    console.print(f"[green]demo finished in {time.time() - t0:.0f} s[/green]")


if __name__ == "__main__":
    main()
