"""Every ```python block of README.md runs, as written, against tiny models.

The blocks run in a working folder that holds what they name, so their paths are not rewritten:

    path/or/hub-id/    a tiny GPT-2 with its tokenizer (512 positions, so 200 new tokens fit)
    styles/            noir, whimsy, gothic: [1, 2, 1] ReLU styles for it, each called "hypernetwork"
                       inside, as `hnkit train-text` without --name writes them
    someone_elses.pt   a web UI file for it
    path/to/sd15/      a tiny SD 1.x pipeline (hnkit.testing.build_tiny_sd); ink.pt, paper.pt for its UNet

Blocks that continue the Quick start (README says so) get its ``model``, ``tokenizer`` and
``inputs``, made afresh for each block. The OpenAI client block talks to the tiny test server (the
``served`` fixture): SERVER maps the README's address and model name to the test server's. A block
whose fence follows a line ``<!-- not run: REASON -->`` is skipped (none is, now).
"""

import os
import re
from pathlib import Path

import pytest
import torch

README = Path(__file__).parent.parent / "README.md"
SERVER = {"http://127.0.0.1:8000/v1": "{url}/v1", "SmolLM2-135M-Instruct": "tiny"}
STYLES = ("noir", "whimsy", "gothic")
PROMPT = "The rain had not stopped"  # the Quick start's


def python_blocks(text: str) -> list[tuple[str, str, str | None]]:
    """``(id, code, reason not run or None)`` for each ```python block, the id from its section."""
    blocks, heading, previous, fence = [], "top", "", None
    for line in text.splitlines():
        if fence is not None:  # inside a fenced block
            if line.strip() == "```":
                if fence["python"]:
                    blocks.append((fence["id"], "\n".join(fence["lines"]), fence["skip"]))
                fence = None
            else:
                fence["lines"].append(line)
        elif line.startswith("```"):
            skip = re.fullmatch(r"<!-- not run: (.+) -->", previous.strip())
            count = sum(b[0].startswith(heading + " #") for b in blocks) + 1
            fence = {"python": line.strip() == "```python", "id": f"{heading} #{count}", "lines": [],
                     "skip": skip and skip.group(1)}
        elif line.startswith("#"):
            heading = line.lstrip("#").strip()
        if line.strip():
            previous = line
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


@pytest.fixture(scope="session")
def lm_world(tiny_lm, tmp_path_factory):
    import hnkit
    from transformers import AutoModelForCausalLM, AutoTokenizer, GPT2Config

    root = tmp_path_factory.mktemp("readme")
    tokenizer = AutoTokenizer.from_pretrained(tiny_lm["model"])
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(
        n_layer=2, n_embd=32, n_head=4, vocab_size=len(tokenizer), n_positions=512, bos_token_id=0, eos_token_id=0))
    model.save_pretrained(root / "path/or/hub-id")
    tokenizer.save_pretrained(root / "path/or/hub-id")
    (root / "styles").mkdir()
    config = hnkit.HypernetworkConfig(layer_structure=[1, 2, 1], activation="relu", weight_init="XavierNormal")
    for seed, name in enumerate(STYLES):
        torch.manual_seed(seed)
        hnkit.save(hnkit.Hypernetwork.for_model(model, config), root / "styles" / f"{name}.safetensors")
    hnkit.save(hnkit.Hypernetwork.for_model(model), root / "someone_elses.pt")
    return root


@pytest.fixture(scope="session")
def sd_world(lm_world):
    import hnkit
    from hnkit.testing import CONTEXT_WIDTH, SELF_WIDTHS, build_tiny_sd

    build_tiny_sd(lm_world / "path/to/sd15", "sd1")
    for seed, name in enumerate(("ink", "paper")):
        torch.manual_seed(seed)
        hnkit.save(hnkit.Hypernetwork(keys=[*SELF_WIDTHS, CONTEXT_WIDTH["sd1"]]), lm_world / f"{name}.pt")
    return lm_world


def quick_start_names(world: Path) -> dict:
    """What the Quick start defines and later blocks use: a fresh model, its tokenizer, the prompt."""
    import hnkit
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world / "path/or/hub-id")
    return {"hnkit": hnkit, "model": AutoModelForCausalLM.from_pretrained(world / "path/or/hub-id").eval(),
            "tokenizer": tokenizer, "inputs": tokenizer(PROMPT, return_tensors="pt")}


def test_the_readme_has_its_examples():
    names = [name for name, _, _ in BLOCKS]
    assert len(BLOCKS) >= 5 and any(n.startswith("Quick start") for n in names), names
    skipped = [(name, reason) for name, _, reason in BLOCKS if reason]
    assert len(skipped) <= 1, f"keep README's unrun examples few: {skipped}"


@pytest.mark.parametrize("name, code, reason", BLOCKS, ids=[b[0] for b in BLOCKS])
def test_the_example_runs(name, code, reason, request, lm_world, tmp_path, monkeypatch):
    if reason:
        pytest.skip(reason)
    world = request.getfixturevalue("sd_world") if "path/to/sd15" in code else lm_world
    if "127.0.0.1:8000" in code:
        url = request.getfixturevalue("served")["url"]
        for readme_text, test_text in SERVER.items():
            code = code.replace(readme_text, test_text.format(url=url))
    for entry in world.iterdir():  # a folder of its own (the examples write files), seeing the world's
        os.symlink(entry, tmp_path / entry.name)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace = {"__name__": "readme"}
    if not name.startswith("Quick start"):
        namespace.update(quick_start_names(world))
    exec(compile(code, f"README.md: {name}", "exec"), namespace)
