"""hnkit image demo, offline on a CPU in about a minute: a hypernetwork for a small Stable Diffusion.

    pip install -e ".[demo]"   # scikit-image, for its sample photographs (bash scripts/install.sh does it)
    python scripts/demo_image.py [--kind sd1|sd2v|sdxl] [--steps 60]

1. builds a small SD pipeline from configs (hnkit.testing.build_tiny_sd: random weights, the real
   diffusers folder layout) - real weights cannot be downloaded here;
2. writes a captioned dataset from the photographs scikit-image ships (skimage.data);
3. trains with `hnkit train-image` (the same command as for a real model);
4. prints the noise-prediction loss with the bare UNet and with the hypernetwork attached, on the
   training images and on held-out ones, with the same fixed noise and timesteps both times, and
   saves previews at strengths 0, 0.5 and 1 (random weights: they show the mechanism, not art).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hnkit  # noqa: E402
from hnkit.commands.cli import main as hnkit_main  # noqa: E402
from hnkit.commands.cli import quiet_libraries  # noqa: E402

PHOTOS = {  # skimage.data name -> caption
    "astronaut": "a photo of an astronaut, portrait, flag, space suit",
    "coffee": "a photo of a cup of coffee, saucer, spoon, table",
    "chelsea": "a photo of a cat, tabby, fur, close-up",
    "rocket": "a photo of a rocket, launch pad, sky",
    "cat": "a photo of a cat, tabby, whiskers",
    "hubble_deep_field": "a photo of galaxies, deep space, stars",
    "immunohistochemistry": "a micrograph of tissue, stained, cells",
    "retina": "a photo of a retina, eye, blood vessels",
    "motorcycle_left": "a photo of a motorcycle, bike, street",
    "rocket_right": "a photo of a rocket, close-up, sky",
}
HELD_OUT = ("coffee", "retina")  # never trained on


def write_dataset(folder: Path) -> Path:
    import numpy as np
    from PIL import Image

    try:
        import skimage.data
    except ImportError:
        sys.exit("demo_image: needs scikit-image for its sample photographs: pip install scikit-image")
    for split in ("train", "held_out"):
        (folder / split).mkdir(parents=True, exist_ok=True)
    for name, caption in PHOTOS.items():
        if name == "motorcycle_left":
            pixels = skimage.data.stereo_motorcycle()[0]
        elif name == "rocket_right":
            pixels = skimage.data.rocket()[:, 200:]
        else:
            pixels = getattr(skimage.data, name)()
        split = folder / ("held_out" if name in HELD_OUT else "train")
        Image.fromarray(np.asarray(pixels)).convert("RGB").save(split / f"{name}.png")
        (split / f"{name}.txt").write_text(caption + "\n")
    return folder


def measure(model: Path, data: Path, hn, resolution: int, draws: int) -> tuple[float, float]:
    """Loss with the bare UNet and with ``hn`` attached, same fixed noise and timesteps."""
    from hnkit.image import ImageTask, fixed_loss
    from hnkit.sd_model import encode_images, load_sd
    from hnkit.image_data import read_image_folder

    sd = load_sd(str(model))
    records = read_image_folder(data)
    images = encode_images(sd, records, resolution)
    task = ImageTask(sd, hn, images, [r.caption for r in records], resolution=resolution,
                     latent_sampling="deterministic")
    task.prepare("cpu")
    bare = fixed_loss(task, draws=draws)
    with hnkit.attach(sd.unet, hn):
        attached = fixed_loss(task, draws=draws)
    return bare, attached


def previews(model: Path, hn, prompt: str, resolution: int, out: Path) -> Path:
    from PIL import Image

    from hnkit.sd_model import generate_images, load_sd

    sd = load_sd(str(model))
    row = []
    with hnkit.attach(sd.unet, hn) as handle:
        for strength in (0.0, 0.5, 1.0):
            handle.strength = strength
            row += generate_images(sd, [prompt], resolution, steps=12, seed=0)
    sheet = Image.new("RGB", (resolution * len(row), resolution))
    for i, image in enumerate(row):
        sheet.paste(image, (i * resolution, 0))
    sheet.save(out)
    return out


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--kind", default="sd1", choices=["sd1", "sd2v", "sdxl"], help="which small SD to build")
    p.add_argument("--steps", type=int, default=60, help="training steps")
    p.add_argument("--resolution", type=int, default=48, help="pixels (the small VAE halves: 24 x 24 latents)")
    p.add_argument("--output", default=None, help="default: runs/demo-image-<time>")
    args = p.parse_args(argv)
    console = Console()
    quiet_libraries()
    t0 = time.time()
    root = Path(args.output or time.strftime("runs/demo-image-%Y%m%d-%H%M%S"))
    from hnkit.testing import build_tiny_sd

    model = build_tiny_sd(root / f"model-{args.kind}", args.kind)
    data = write_dataset(root / "data")
    console.rule("training")
    console.print(f"model {model} (small {args.kind} from configs, random weights)\n"
                  f"data {data / 'train'}: {len(PHOTOS) - len(HELD_OUT)} photographs from skimage.data; "
                  f"held out: {', '.join(HELD_OUT)}\noutput {root / 'run'}")
    code = hnkit_main(["train-image", "--model", str(model), "--data", str(data / "train"), "--output",
                       str(root / "run"), "--resolution", str(args.resolution), "--max-steps", str(args.steps),
                       "--batch-size", "4", "--lr", "3e-3", "--template", "style_filewords", "--name", "skimage-style",
                       "--eval-every", str(max(1, args.steps // 3)), "--log-every", "10", "--save-pt"])
    if code != 0:
        sys.exit(code)

    console.rule("measured")
    hn = hnkit.load(root / "run" / "skimage-style.safetensors")
    table = Table("images", "bare UNet", f"with the hypernetwork ({hn.step} steps)", "change",
                  title="noise-prediction loss (MSE), same fixed noise and timesteps (8 draws per image)")
    for label, folder in (("training", data / "train"), ("held out", data / "held_out")):
        before, after = measure(model, folder, hn, args.resolution, draws=8)
        table.add_row(label, f"{before:.4f}", f"{after:.4f}", f"{(after - before) / before:+.1%}")
    console.print(table)
    sheet = previews(model, hn, "a photo of a cat, in the style of skimage-style", args.resolution,
                     root / "run" / "strengths.png")
    console.print(f"previews at strengths 0, 0.5, 1 (seed 0): {sheet}\n"
                  f"files: {root / 'run'} (skimage-style.safetensors and the web UI's .pt, metrics.jsonl, "
                  f"loss.png, checkpoints/)\ntotal {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
