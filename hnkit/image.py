"""The image task: a Stable Diffusion UNet (SD1.x, SD2.x, SDXL) learns a style from captioned images.

    image folder -> (file, caption) records -> resized, center-cropped pixels -> VAE latents (cached)
    caption -> prompt template, tag shuffle / dropout -> text-encoder outputs (cached when static)
    loss = MSE(unet(noisy latents, t, text), noise or velocity), the model's own noise scheduler

Randomness: the draws of one batch (template, tag order and dropout, latent sample, noise,
timesteps) all come from one generator seeded by a number drawn from torch's global RNG (which
the trainer seeds and accelerate saves and restores with a checkpoint) and the process index, so
a resumed run draws exactly what the straight run would have. Evaluation batches use fixed
per-image seeds instead, so their loss only changes when the hypernetwork does.

Reading the folder, captions and templates lives in :mod:`hnkit.image_data`; loading the model,
encoding images (latents cached on disk) and prompts, and generating previews in :mod:`hnkit.sd_model`.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from .errors import HnkitError
from .image_data import process_tags, render_prompt
from .sd_model import EncodedImages, SDModel, encode_prompts, generate_images

LATENT_SAMPLING = ("once", "deterministic", "random")


# -- the task ----------------------------------------------------------------------------------
class _Examples:
    """A dataset of image indices; ``fixed`` examples (evaluation) have their own noise seeds."""

    def __init__(self, indices, fixed: bool = False):
        self.indices, self.fixed = list(indices), fixed

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i) -> dict:
        return {"index": self.indices[i], "fixed": self.fixed, "draw": 0}


class ImageTask:
    """Noise-prediction loss of the UNet with the hypernetwork attached (by the trainer)."""

    loss_is_token_cross_entropy = False  # the trainer logs no perplexity for an MSE

    def __init__(self, sd: SDModel, hypernetwork, images: EncodedImages, captions: list[str], *,
                 name: str = "hypernetwork", templates=("[filewords]",), shuffle_tags: bool = False,
                 tag_dropout: float = 0.0, latent_sampling: str = "once", seed: int = 0,
                 train_indices=None, eval_indices=None, resolution: int = 512, sample_prompts=(),
                 sample_steps: int = 20, sample_guidance: float = 7.0):
        if latent_sampling not in LATENT_SAMPLING:
            raise HnkitError(f"unknown latent sampling {latent_sampling!r}; use {', '.join(LATENT_SAMPLING)}")
        if not 0.0 <= tag_dropout < 1.0:
            raise HnkitError(f"--tag-dropout {tag_dropout}: must be at least 0 and below 1")
        self.sd, self.hypernetwork, self.images, self.captions = sd, hypernetwork, images, list(captions)
        self.model = sd.unet
        self.name, self.templates = name, list(templates)
        self.shuffle_tags, self.tag_dropout = shuffle_tags, tag_dropout
        self.latent_sampling, self.seed, self.resolution = latent_sampling, seed, resolution
        self.sample_prompts = list(sample_prompts)
        self.sample_steps, self.sample_guidance = sample_steps, sample_guidance
        n = len(images)
        self.train_dataset = _Examples(range(n) if train_indices is None else train_indices)
        self.eval_dataset = _Examples(range(n) if eval_indices is None else eval_indices, fixed=True)
        if latent_sampling == "once":  # one draw from each image's distribution, kept for the run
            noise = torch.randn(images.mean.shape, generator=torch.Generator().manual_seed(seed))
            self.latents = images.mean + images.std * noise
        else:
            self.latents = images.mean
        self.text_cache = None

    # -- set-up --------------------------------------------------------------------------------
    @property
    def captions_are_static(self) -> bool:
        """Whether every example's prompt is the same at every step (then its encoding is cached)."""
        return len(self.templates) == 1 and not self.shuffle_tags and not self.tag_dropout

    def prepare(self, device) -> None:
        """Move the frozen VAE and text encoders next to the UNet (in its dtype; the VAE stays fp32)
        and encode the prompts once if they never change. Call after the UNet is on its device."""
        dtype = next(self.model.parameters()).dtype
        for encoder in self.sd.text_encoders:
            encoder.to(device, dtype)
        self.sd.vae.to(device, torch.float32)
        self.text_cache = None
        if self.captions_are_static:
            prompts = [self.prompt(i) for i in range(len(self.images))]
            parts = [encode_prompts(self.sd, prompts[i:i + 16]) for i in range(0, len(prompts), 16)]
            self.text_cache = {k: torch.cat([p[k] for p in parts]).cpu() for k in parts[0]}

    # -- data ----------------------------------------------------------------------------------
    def prompt(self, index: int, generator: torch.Generator | None = None) -> str:
        """The prompt of image ``index``: a template (random with ``generator``, else the first)
        around its caption, tags shuffled and dropped when asked and a generator is given."""
        if generator is None:
            return render_prompt(self.templates[0], self.captions[index], self.name)
        template = self.templates[torch.randint(len(self.templates), (), generator=generator).item()]
        caption = process_tags(self.captions[index], self.shuffle_tags, self.tag_dropout, generator)
        return render_prompt(template, caption, self.name)

    def batch_generator(self) -> torch.Generator:
        """This batch's generator: one draw from the global RNG (restored on resume) and the process."""
        from accelerate import PartialState

        draw = torch.randint(2**62, ()).item()
        return torch.Generator().manual_seed(draw + 7919 * PartialState().process_index)

    def collate(self, examples) -> dict:
        idx = [e["index"] for e in examples]
        fixed = examples[0]["fixed"]
        T = self.sd.noise_scheduler.config.num_train_timesteps
        if fixed:  # evaluation: every image (and draw number) has its own fixed draws
            gens = [torch.Generator().manual_seed(self.seed * 1_000_003 + 104_729 + 7919 * e["draw"] + e["index"])
                    for e in examples]
        else:
            gens = [self.batch_generator()] * len(idx)
        shape = self.images.mean.shape[1:]
        if self.latent_sampling == "random" and not fixed:
            noise = torch.stack([torch.randn(shape, generator=g) for g in gens])
            latents = self.images.mean[idx] + self.images.std[idx] * noise
        else:
            latents = self.latents[idx]
        batch = {
            "latents": latents,
            "noise": torch.stack([torch.randn(shape, generator=g) for g in gens]),
            "timesteps": torch.cat([torch.randint(0, T, (1,), generator=g) for g in gens]),
        }
        if self.text_cache is not None:
            batch.update({k: v[idx] for k, v in self.text_cache.items()})
        else:
            prompts = [self.prompt(i, None if fixed else g) for i, g in zip(idx, gens)]
            batch.update(encode_prompts(self.sd, prompts))
        if self.sd.is_sdxl:
            r = self.resolution
            batch["time_ids"] = torch.cat([self.images.sizes[idx], torch.tensor([[r, r]] * len(idx))], 1).float()
        return batch

    # -- the loss ------------------------------------------------------------------------------
    def loss(self, batch) -> torch.Tensor:
        unet, scheduler = self.model, self.sd.noise_scheduler
        latents, noise, t = batch["latents"], batch["noise"], batch["timesteps"]
        noisy = scheduler.add_noise(latents, noise, t)
        if self.sd.prediction_type == "epsilon":
            target = noise
        elif self.sd.prediction_type == "v_prediction":
            target = scheduler.get_velocity(latents, noise, t)
        else:  # "sample"
            target = latents
        dtype = unet.dtype
        extra = {}
        if self.sd.is_sdxl:
            extra["added_cond_kwargs"] = {"text_embeds": batch["pooled"].to(dtype),
                                          "time_ids": batch["time_ids"].to(dtype)}
        pred = unet(noisy.to(dtype), t, encoder_hidden_states=batch["context"].to(dtype), **extra).sample
        return F.mse_loss(pred.float(), target.float())

    # -- previews ------------------------------------------------------------------------------
    def generate(self, prompts, seed: int | None = None) -> list:
        """PIL images of ``prompts`` at fixed seeds, with whatever is attached to the UNet."""
        return generate_images(self.sd, prompts, self.resolution, self.sample_steps, self.sample_guidance,
                               self.seed if seed is None else seed)

    def sample(self, step: int, folder: Path) -> None:
        """Previews at strength 1 (the trainer keeps the hypernetwork attached while it calls this)."""
        if not self.sample_prompts:
            return
        folder.mkdir(parents=True, exist_ok=True)
        listing = folder / "prompts.txt"
        if not listing.exists():
            lines = [f"{i:02d} seed {self.seed + i}: {p}\n" for i, p in enumerate(self.sample_prompts)]
            listing.write_text("".join(lines), encoding="utf-8")
        for i, image in enumerate(self.generate(self.sample_prompts)):
            image.save(folder / f"step-{step:07d}-{i:02d}.png")


@torch.no_grad()
def fixed_loss(task: ImageTask, indices=None, draws: int = 4) -> float:
    """Mean loss over ``indices`` (default: all images) x ``draws`` fixed noise/timestep draws, with
    whatever is attached to the UNet: the same number before and after training means no change."""
    indices = range(len(task.images)) if indices is None else indices
    total, n = 0.0, 0
    for d in range(draws):
        examples = [{"index": i, "fixed": True, "draw": d} for i in indices]
        batch = task.collate(examples)
        device = next(task.model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        total, n = total + task.loss(batch).item() * len(examples), n + len(examples)
    return total / n
