"""Benchmark hnkit on the Stable Diffusion UNet: every figure is a ratio against a baseline run in
this process, on the same model and the same batch (see docs/design.md). Nothing here asserts a time.

    python scripts/bench_image.py                 # SD1.5-sized UNet, VAE and CLIP text encoder (random init),
                                                  # CPU fp32, batch 1, 64 x 64 latents, 77 x 768 context
    python scripts/bench_image.py --tiny          # the small SD of hnkit.testing: a smoke run in seconds
    python scripts/bench_image.py --device cuda --dtype fp16 --batch-size 4

Needs PEFT for the LoRA baseline: pip install -e ".[bench]"

The hypernetwork is the web UI's classic one, hnkit train-image's default: a shared [1, 2, 1] linear
(k, v) pair per input width (320, 640, 1280 and the 768-wide text context in SD1.5).

1. the cross-attention (attn2) modules run once per UNet call on the text context (hnkit's memo)
   vs once in every attn2 layer (the web UI's way): (a) training step, (b) no-grad forward.
2. hnkit training step vs a PEFT LoRA training step on to_k/to_v with the same number of trainable
   parameters (target <= 1.0): (a) the classic network; (b) a per-site bottleneck [1, f, 1] relu
   (one pair per attention layer, f chosen so that its size matches the same LoRA), which spends its
   parameters where LoRA does, where the classic network puts 60 % of them at the 1280-wide sites.
3. a training step from cached latents and text-encoder outputs vs one that runs the VAE encoder
   and the text encoder every step (what the cache saves).
4. hnkit training step vs a no-grad forward of the UNet on the same batch (target <= 2.1).

A training step is the loss of hnkit's ImageTask (noise-prediction MSE at a random timestep),
backward and an AdamW step (the trainer's optimizer), with the base frozen. With --dtype fp16/bf16 the
frozen base is cast to that dtype and runs under autocast (as hnkit's trainer does on a GPU); the
hypernetwork and LoRA weights stay fp32; fp16 adds a GradScaler.

Timing: warm-up rounds, then --steps timed rounds. Each round runs every variant once, in a rotating
order, so that load from other processes falls on all of them alike; a ratio is the median over
rounds of (time / baseline time) within a round.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import os
import statistics
import sys
import tempfile
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import hnkit  # noqa: E402
from hnkit.commands.cli import quiet_libraries  # noqa: E402
from hnkit.image import ImageTask  # noqa: E402
from hnkit.sd_model import EncodedImages, SDModel  # noqa: E402
from hnkit.kernels import Memo  # noqa: E402
from hnkit.train_config import make_optimizer  # noqa: E402
from bench_text import DTYPES, Variant, measure, middle_half, per_round, setup  # noqa: E402  (the same timing loop as the text bench)

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tiny", action="store_true", help="the small SD1-like pipeline of hnkit.testing (smoke run)")
    p.add_argument("--batch-size", type=int, default=1)
    p.add_argument("--latent-size", type=int, default=None, help="latent height and width (default 64; tiny: 16)")
    p.add_argument("--steps", type=int, default=3, help="timed rounds (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch CPU threads")
    return p.parse_args(argv)


# -----------------------------------------------------------------------------------------------
# the model


def sd15_sized() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, int]:
    """UNet, VAE and text encoder with Stable Diffusion 1.5's configurations and random weights."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # the other defaults are SD1.5's
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, sample_size=512,
        block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, scaling_factor=0.18215,
    )
    text_encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=49408, hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
        max_position_embeddings=77, hidden_act="quick_gelu", projection_dim=768))
    return unet, vae, text_encoder, 64


def tiny() -> tuple[torch.nn.Module, torch.nn.Module, torch.nn.Module, int]:
    from hnkit.sd_model import load_sd
    from hnkit.testing import LATENT_SIZE, build_tiny_sd

    with tempfile.TemporaryDirectory() as folder:
        sd = load_sd(str(build_tiny_sd(Path(folder) / "sd1", "sd1")))
    return sd.unet, sd.vae, sd.text_encoders[0], LATENT_SIZE


def lora_unet(unet, rank: int):
    """A copy of ``unet`` with PEFT LoRA on every to_k and to_v; only the LoRA weights train."""
    from peft import LoraConfig

    warnings.filterwarnings("ignore", category=FutureWarning)
    lora = copy.deepcopy(unet)
    lora.add_adapter(LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_v"]))
    for name, p in lora.named_parameters():
        p.requires_grad_("lora_" in name)
        if "lora_" in name:
            p.data = p.data.float()  # adapter weights fp32, as hnkit's hypernetwork
    return lora


def lora_rank_for(unet, n_params: int) -> int:
    """LoRA rank on every to_k/to_v with about ``n_params`` parameters: r * (in + out) per projection."""
    per_rank = sum(m.in_features + m.out_features for name, m in unet.named_modules()
                   if name.endswith((".to_k", ".to_v")))
    return max(1, round(n_params / per_rank))


def n_trainable(params) -> int:
    return sum(p.numel() for p in params if p.requires_grad)


# -----------------------------------------------------------------------------------------------
# timing


def ratio(v, base) -> float:
    return statistics.median(per_round(v, base))


@contextlib.contextmanager
def memo_off():
    """While inside, every attn2 runs its modules itself, as the web UI does: the Memo kernels
    compute nothing at the start of a UNet call, so each site computes its own K/V input."""
    make = Memo.make
    Memo.make = lambda self, context: None
    try:
        yield
    finally:
        Memo.make = make


@contextlib.contextmanager
def attached(unet, hn, memo: bool = True):
    with memo_off() if not memo else contextlib.nullcontext(), hnkit.attach(unet, hn):
        yield


# -----------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    args = parse_args(argv)
    quiet_libraries()
    console = Console(width=None if sys.stdout.isatty() else 130)
    device, sync, autocast = setup(args)
    dtype = DTYPES[args.dtype]

    from diffusers import DDPMScheduler

    torch.manual_seed(0)
    unet, vae, text_encoder, latent = tiny() if args.tiny else sd15_sized()
    latent = args.latent_size or latent
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False).eval()
    unet.to(device, dtype)  # the frozen base in the run's dtype, as the trainer does on a GPU
    text_encoder.to(device, dtype)
    vae.to(device, torch.float32)  # hnkit encodes latents in fp32
    scheduler = DDPMScheduler(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012,
                              beta_schedule="scaled_linear")
    sd = SDModel("bench", unet, vae, [text_encoder], [None], scheduler)
    hn = hnkit.Hypernetwork.for_model(unet, hnkit.HypernetworkConfig([1, 2, 1]), name="classic").to(device)
    rank = lora_rank_for(unet, n_trainable(hn.parameters()))
    lora = lora_unet(unet, rank).to(device)
    lora_params = [p for p in lora.parameters() if p.requires_grad]
    # A per-site bottleneck [1, f, 1] of the same size: 2 modules x 2 layers x f * d^2 per site.
    squares = sum(m.in_features ** 2 for name, m in unet.named_modules() if name.endswith(".to_k"))
    fraction = n_trainable(lora_params) / (4 * squares)
    hn_site = hnkit.Hypernetwork.for_model(unet, hnkit.HypernetworkConfig([1, fraction, 1], "relu", per_site=True),
                                           name="per-site").to(device)
    width = unet.config.cross_attention_dim
    b, scale = args.batch_size, 2 ** (len(vae.config.block_out_channels) - 1)
    console.print(f"UNet {sum(p.numel() for p in unet.parameters()) / 1e6:.0f}M parameters, VAE "
                  f"{sum(p.numel() for p in vae.parameters()) / 1e6:.0f}M, text encoder "
                  f"{sum(p.numel() for p in text_encoder.parameters()) / 1e6:.0f}M; batch {b}, latents "
                  f"{latent} x {latent} (images {latent * scale} px), context 77 x {width}; {device}, {args.dtype}, "
                  f"{torch.get_num_threads()} threads")

    # one fixed batch, as the image task's collate would give it
    torch.manual_seed(0)
    pixels = torch.rand(b, 3, latent * scale, latent * scale, device=device) * 2 - 1
    ids = torch.randint(0, text_encoder.config.vocab_size - 1, (b, 77), device=device)
    with torch.no_grad():
        mean = torch.randn(b, 4, latent, latent)
        context = text_encoder(ids)[0].float()
    images = EncodedImages(mean, torch.zeros_like(mean), torch.zeros(b, 4, dtype=torch.long), ["x"] * b)
    task = ImageTask(sd, hn, images, ["x"] * b, latent_sampling="deterministic")
    cached = {"latents": mean.to(device), "noise": torch.randn(b, 4, latent, latent, device=device),
              "timesteps": torch.randint(0, 1000, (b,), device=device), "context": context.to(device)}

    scaler = torch.amp.GradScaler(device.type, enabled=args.dtype == "fp16")
    hn_opt = make_optimizer(hn.parameters(), lr=1e-4)  # what hnkit's Trainer uses
    site_opt = make_optimizer(hn_site.parameters(), lr=1e-4)
    lora_opt = make_optimizer(lora_params, lr=1e-4)

    def step(loss_fn, optimizer):
        with autocast():
            loss = loss_fn()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad(set_to_none=True)

    def hn_step():
        step(lambda: task.loss(cached), hn_opt)

    def site_step():  # the task's loss runs whatever is attached to the UNet
        step(lambda: task.loss(cached), site_opt)

    @torch.no_grad()
    def encode():
        """What a step without the caches does first: VAE-encode the images, run the text encoder."""
        dist = vae.encode(pixels).latent_dist
        latents = dist.sample() * vae.config.scaling_factor
        with autocast():
            ctx = text_encoder(ids)[0]
        return {**cached, "latents": latents, "context": ctx}

    def hn_step_encoding():
        batch = encode()
        step(lambda: task.loss(batch), hn_opt)

    def lora_step():
        def loss():
            noisy = scheduler.add_noise(cached["latents"], cached["noise"], cached["timesteps"])
            pred = lora(noisy.to(dtype), cached["timesteps"], encoder_hidden_states=cached["context"].to(dtype)).sample
            return torch.nn.functional.mse_loss(pred.float(), cached["noise"].float())

        step(loss, lora_opt)

    @torch.no_grad()
    def forward():
        noisy = scheduler.add_noise(cached["latents"], cached["noise"], cached["timesteps"])
        with autocast():
            unet(noisy.to(dtype), cached["timesteps"], encoder_hidden_states=cached["context"].to(dtype))

    train = Variant("hnkit step", hn_step, lambda: attached(unet, hn))
    train_no_memo = Variant("hnkit step, attn2 per layer", hn_step, lambda: attached(unet, hn, memo=False))
    train_lora = Variant(f"LoRA r={rank} step", lora_step)
    train_site = Variant("hnkit per-site step", site_step, lambda: attached(unet, hn_site))
    train_encoding = Variant("hnkit step + encoding", hn_step_encoding, lambda: attached(unet, hn))
    bare_forward = Variant("no-grad forward", forward)
    hn_forward = Variant("no-grad forward, hnkit", forward, lambda: attached(unet, hn))
    hn_forward_no_memo = Variant("no-grad forward, attn2 per layer", forward, lambda: attached(unet, hn, memo=False))
    variants = [train, train_no_memo, train_lora, train_site, train_encoding, bare_forward, hn_forward,
                hn_forward_no_memo]

    params = Table("setup", "trainable parameters", title="Trainable parameters")
    params.add_row("hnkit shared [1, 2, 1] linear, widths " + ", ".join(map(str, sorted(hn.keys()))),
                   f"{n_trainable(hn.parameters()):,}")
    hidden = sorted({hn_site[k][0].linear[0].out_features for k in hn_site.keys()})
    params.add_row(f"hnkit per-site [1, {fraction:.4f}, 1] relu (hidden {', '.join(map(str, hidden))})",
                   f"{n_trainable(hn_site.parameters()):,}")
    params.add_row(f"LoRA r={rank} on to_k, to_v", f"{n_trainable(lora_params):,}")
    console.print(params)

    measure(variants, args.warmup, args.steps, sync, console, "train")

    table = Table("figure", "hnkit", "baseline", "ratio", "rounds, middle half", "target", "met",
                  title=f"hnkit on the SD UNet vs same-run baselines (median of {args.steps} rounds; batch {b}, "
                        f"{latent} x {latent} latents; {device.type} {args.dtype}, {torch.get_num_threads()} threads)")

    def row(figure, v, base, target=None, speedup=False):
        r = ratio(base, v) if speedup else ratio(v, base)
        met = "" if target is None else ("[green]yes[/green]" if r <= target else "[red]no[/red]")
        table.add_row(figure, f"{v.median:.3f} s", f"{base.median:.3f} s", f"{r:.3f}" + (" x" if speedup else ""),
                      middle_half(base, v) if speedup else middle_half(v, base),
                      "" if target is None else f"<= {target:g}", met)

    row("1a attn2 once per call vs per layer: train step (speed-up)", train, train_no_memo, speedup=True)
    row("1b attn2 once per call vs per layer: no-grad forward (speed-up)", hn_forward, hn_forward_no_memo,
        speedup=True)
    row(f"2a train step: hnkit [1, 2, 1] vs LoRA r={rank} (same size)", train, train_lora, target=1.0)
    row(f"2b train step: hnkit per-site vs LoRA r={rank} (same size)", train_site, train_lora, target=1.0)
    row("3  cached latents + text vs encoding every step (speed-up)", train, train_encoding, speedup=True)
    row("4  train step vs no-grad forward", train, bare_forward, target=2.1)
    row("(ref) LoRA train step vs no-grad forward", train_lora, bare_forward, target=2.1)
    row("(ref) no-grad forward: hnkit attached vs bare", hn_forward, bare_forward)
    console.print(table)
    console.print("ratio = time / baseline time, the median of per-round ratios (their middle half beside it); "
                  "a speed-up is baseline / time (greater than 1: faster).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
