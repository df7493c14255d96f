"""The Stable Diffusion side of the image task: a pipeline's parts (``SDModel``, ``load_sd``),
images as VAE latents and prompts as text-encoder outputs, and generating images for previews.

Latents are encoded once per run, and kept on disk (``$HNKIT_CACHE/image/<key>.safetensors``)
keyed by the image files (path, size, mtime), the resolution and a fingerprint of the VAE, so a
second run does not decode or encode an image again. The cache holds the VAE's distribution (mean
and std), so every ``--latent-sampling`` mode uses the same file.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

from .errors import HnkitError, first_line
from .image_data import ImageRecord, load_image, warn
from .util import atomic_write, cache_root, model_source


# -- model -------------------------------------------------------------------------------------
@dataclass
class SDModel:
    """The parts of a Stable Diffusion pipeline that training needs."""

    name: str
    unet: torch.nn.Module
    vae: torch.nn.Module
    text_encoders: list
    tokenizers: list
    noise_scheduler: object  # a DDPMScheduler with the model's own schedule and prediction type

    @property
    def is_sdxl(self) -> bool:
        """SDXL-style conditioning: pooled text embeddings and size/crop ids besides the context."""
        return getattr(self.unet.config, "addition_embed_type", None) == "text_time"

    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type


def load_sd(name: str) -> SDModel:
    """UNet, VAE, text encoder(s), tokenizer(s) and noise scheduler of a diffusers pipeline (a local
    folder or a hub id); one-line errors."""
    import transformers
    from diffusers import AutoencoderKL, DDPMScheduler, DiffusionPipeline, UNet2DConditionModel

    source = model_source(name, "model_index.json", "diffusers pipeline")
    try:
        index = DiffusionPipeline.load_config(source)
    except (OSError, ValueError) as exc:
        raise HnkitError(f"{name}: could not read the pipeline's model_index.json ({first_line(exc)})") from None
    missing = [part for part in ("unet", "vae", "text_encoder", "tokenizer", "scheduler")
               if not (isinstance(index.get(part), list) and index[part][-1])]
    if "unet" in missing:
        raise HnkitError(f"{name}: this pipeline has no UNet (model_index.json lists no 'unet'); "
                         "hnkit train-image needs a Stable Diffusion UNet")
    if missing:
        raise HnkitError(f"{name}: not a Stable Diffusion pipeline (no {', '.join(missing)})")
    unet_folder = Path(source) / "unet"
    if os.path.isdir(source) and not (unet_folder / "config.json").is_file():
        raise HnkitError(f"{name}: the pipeline lists a UNet but {unet_folder} holds no config.json")
    try:
        unet = UNet2DConditionModel.from_pretrained(source, subfolder="unet")
        vae = AutoencoderKL.from_pretrained(source, subfolder="vae")
        text_encoders, tokenizers = [], []
        for suffix in ("", "_2"):
            if isinstance(index.get("text_encoder" + suffix), list) and index["text_encoder" + suffix][-1]:
                cls = getattr(transformers, index["text_encoder" + suffix][-1])
                text_encoders.append(cls.from_pretrained(source, subfolder="text_encoder" + suffix))
                tok_cls = getattr(transformers, index["tokenizer" + suffix][-1], transformers.AutoTokenizer)
                tokenizers.append(tok_cls.from_pretrained(source, subfolder="tokenizer" + suffix))
        noise_scheduler = DDPMScheduler.from_pretrained(source, subfolder="scheduler")
    except (OSError, ValueError, KeyError, AttributeError, TypeError) as exc:
        raise HnkitError(f"{name}: could not load the pipeline ({first_line(exc)})") from None
    sd = SDModel(name, unet, vae, text_encoders, tokenizers, noise_scheduler)
    if sd.prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise HnkitError(f"{name}: unsupported prediction type {sd.prediction_type!r}")
    if sd.is_sdxl:
        c = unet.config
        pooled = getattr(text_encoders[-1].config, "projection_dim", None)
        if len(text_encoders) != 2 or c.projection_class_embeddings_input_dim != 6 * c.addition_time_embed_dim + pooled:
            raise HnkitError(f"{name}: an SDXL-style UNet whose conditioning is not SDXL base's (two text "
                             "encoders, 6 size/crop ids); refiner-style models are not supported")
    for module in (unet, vae, *text_encoders):
        module.requires_grad_(False).eval()
    return sd


def vae_fingerprint(vae) -> str:
    """Identifies a VAE's weights without hashing all of them: config plus two small tensors (not
    where it was loaded from, so a moved model folder keeps its cache)."""
    config = {k: v for k, v in vae.config.items() if not k.startswith("_")}
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for t in (vae.encoder.conv_in.weight, vae.quant_conv.weight if vae.quant_conv is not None else None):
        if t is not None:
            h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()[:16]


@dataclass
class EncodedImages:
    """The readable images of a data folder as VAE latent distributions, already multiplied by the
    VAE's scaling factor; ``sizes`` rows are SDXL's (original h, w, crop top, left)."""

    mean: torch.Tensor
    std: torch.Tensor
    sizes: torch.Tensor
    names: list[str]
    skipped: list[str] = field(default_factory=list)  # "name (reason)"

    def __len__(self) -> int:
        return len(self.names)


def _latent_cache_key(records: list[ImageRecord], resolution: int, vae) -> str:
    h = hashlib.sha256()
    for r in records:
        st = r.path.stat()
        h.update(f"{r.path.resolve()}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    h.update(f"{resolution}|{vae_fingerprint(vae)}".encode())
    return h.hexdigest()[:24]


@torch.no_grad()
def encode_images(sd: SDModel, records: list[ImageRecord], resolution: int, device=None,
                  batch_size: int = 4, disk_cache: bool = True) -> EncodedImages:
    """Decode, resize and VAE-encode every image once (fp32); unreadable files are skipped with a
    warning that names them, and none readable is an error. Cached on disk unless ``disk_cache``
    is off."""
    cache = cache_root() / "image" / f"{_latent_cache_key(records, resolution, sd.vae)}.safetensors"
    if disk_cache and cache.is_file():
        encoded = _read_latents(cache)
    else:
        encoded = _encode_with_vae(sd.vae, records, resolution, torch.device(device or "cpu"), batch_size)
        if disk_cache and len(encoded):
            _write_latents(cache, encoded)
    for s in encoded.skipped:
        warn(f"skipped unreadable image {s}")
    if not len(encoded):
        root = records[0].path.parents[len(Path(records[0].name).parts) - 1]
        raise HnkitError(f"{root}: none of the {len(records)} images could be read (first: {encoded.skipped[0]})")
    return encoded


def _read_latents(cache: Path) -> EncodedImages:
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(cache), framework="pt") as f:
        meta = json.loads(f.metadata()["hnkit"])
    t = load_file(str(cache))
    return EncodedImages(t["mean"], t["std"], t["sizes"], meta["names"], meta["skipped"])


def _write_latents(cache: Path, encoded: EncodedImages) -> None:
    from safetensors.torch import save

    tensors = {"mean": encoded.mean.contiguous(), "std": encoded.std.contiguous(), "sizes": encoded.sizes}
    blob = save(tensors, metadata={"hnkit": json.dumps({"names": encoded.names, "skipped": encoded.skipped})})
    cache.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(cache, lambda f: f.write(blob))


def _encode_with_vae(vae, records: list[ImageRecord], resolution: int, device: torch.device,
                     batch_size: int) -> EncodedImages:
    """The readable ``records`` through ``vae`` in fp32 on ``device``, ``batch_size`` at a time;
    the VAE goes back to its device and dtype afterwards."""
    original = next(vae.parameters()).device, next(vae.parameters()).dtype
    vae.to(device, torch.float32)
    means, stds, sizes, names, skipped = [], [], [], [], []
    try:
        for batch in _readable_batches(records, resolution, batch_size, skipped):
            dist = vae.encode(torch.stack([p for p, _, _ in batch]).to(device)).latent_dist
            means.append(dist.mean.float().cpu().contiguous())  # as the disk cache holds them: a cold run
            # and a warm one then compute on the same layout, bit for bit (a VAE may return channels-last)
            stds.append(dist.std.float().cpu().contiguous())
            sizes += [size for _, size, _ in batch]
            names += [name for _, _, name in batch]
    finally:
        vae.to(*original)
    if not names:
        return EncodedImages(torch.zeros(0), torch.zeros(0), torch.zeros(0, 4, dtype=torch.long), [], skipped)
    shift = getattr(vae.config, "shift_factor", None) or 0.0
    scale = vae.config.scaling_factor
    return EncodedImages((torch.cat(means) - shift) * scale, torch.cat(stds) * scale,
                         torch.tensor(sizes, dtype=torch.long), names, skipped)


def _readable_batches(records: list[ImageRecord], resolution: int, batch_size: int, skipped: list):
    """Lists of up to ``batch_size`` ``(pixels, size, name)``; each unreadable file is added to
    ``skipped`` as "name (reason)" instead."""
    batch = []
    for r in records:
        try:
            pixels, size = load_image(r.path, resolution)
        except Exception as exc:  # PIL raises many types for a damaged or foreign file
            skipped.append(f"{r.name} ({first_line(exc)})")
            continue
        batch.append((pixels, size, r.name))
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch:
        yield batch


# -- text encoding -----------------------------------------------------------------------------
@torch.no_grad()
def encode_prompts(sd: SDModel, prompts: list[str]) -> dict:
    """What the UNet is conditioned on: ``context`` (B, 77, width), and for SDXL ``pooled``.
    SD1/SD2: the last hidden state of the text encoder. SDXL: the penultimate hidden states of both
    encoders side by side, and the second encoder's projected pooled output."""
    if not sd.is_sdxl:
        ids = _token_ids(sd.tokenizers[0], prompts, sd.text_encoders[0])
        return {"context": sd.text_encoders[0](ids)[0]}
    hidden = []
    for tokenizer, encoder in zip(sd.tokenizers, sd.text_encoders):
        out = encoder(_token_ids(tokenizer, prompts, encoder), output_hidden_states=True)
        hidden.append(out.hidden_states[-2])
    return {"context": torch.cat(hidden, dim=-1), "pooled": out.text_embeds}


def _token_ids(tokenizer, prompts, encoder) -> torch.Tensor:
    ids = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    return ids.to(encoder.device)


# -- generating --------------------------------------------------------------------------------
def sd_pipeline(sd: SDModel):
    """A diffusers pipeline made of the loaded parts (nothing copied), sampling with DPM-Solver++."""
    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionXLPipeline

    scheduler = DPMSolverMultistepScheduler.from_config(sd.noise_scheduler.config)
    with warnings.catch_warnings():  # notices about older scheduler configs, fixed up by diffusers
        warnings.simplefilter("ignore", FutureWarning)
        if sd.is_sdxl:
            pipe = StableDiffusionXLPipeline(
                vae=sd.vae, text_encoder=sd.text_encoders[0], text_encoder_2=sd.text_encoders[1],
                tokenizer=sd.tokenizers[0], tokenizer_2=sd.tokenizers[1], unet=sd.unet, scheduler=scheduler,
                add_watermarker=False)
        else:
            pipe = StableDiffusionPipeline(
                vae=sd.vae, text_encoder=sd.text_encoders[0], tokenizer=sd.tokenizers[0], unet=sd.unet,
                scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@torch.no_grad()
def generate_images(sd: SDModel, prompts, resolution: int, steps: int = 20, guidance: float = 7.0,
                    seed: int = 0) -> list:
    """One PIL image per prompt, prompt i from seed + i (a CPU generator: the same on any device),
    with whatever is attached to the UNet. The VAE decodes in fp32."""
    pipe = sd_pipeline(sd)
    images = []
    for i, prompt in enumerate(prompts):
        latents = pipe(prompt, height=resolution, width=resolution, num_inference_steps=steps,
                       guidance_scale=guidance, output_type="latent",
                       generator=torch.Generator().manual_seed(seed + i)).images
        images.append(decode_latents(sd.vae, latents)[0])
    return images


@torch.no_grad()
def decode_latents(vae, latents: torch.Tensor) -> list:
    """Latents as the UNet sees them (scaled) -> PIL images; the VAE runs in fp32."""
    from PIL import Image

    shift = getattr(vae.config, "shift_factor", None) or 0.0
    z = latents.to(next(vae.parameters()).device, torch.float32) / vae.config.scaling_factor + shift
    pixels = vae.decode(z.to(next(vae.parameters()).dtype)).sample.float()
    pixels = ((pixels.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(p) for p in pixels]
