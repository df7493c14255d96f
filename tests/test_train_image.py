"""`hnkit train-image` on tiny Stable Diffusion pipelines built from configs (hnkit.testing):
learning, exact resume, the v-prediction and SDXL paths, data and captions, templates and tags,
latent and text caches, previews and bad input."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

import hnkit
from hnkit.commands.cli import main
from hnkit.image import ImageTask, fixed_loss
from hnkit.image_data import caption_from_name, process_tags, read_image_folder, read_templates, render_prompt
from hnkit.sd_model import encode_images, encode_prompts, load_sd
from hnkit.testing import build_tiny_sd
from conftest import with_option

RES = 32  # the tiny VAE halves once: 16 x 16 latents


@pytest.fixture(scope="module")
def tiny_sd(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny_sd")
    return {kind: build_tiny_sd(root / kind, kind) for kind in ("sd1", "sd2v", "sdxl")}


def write_images(folder, n=6, size=(48, 40)):
    """Small non-square images, each a different colour pattern, with tag captions beside them."""
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        g = torch.Generator().manual_seed(i)
        base = torch.rand(3, 1, 1, generator=g) * 255
        ramp = torch.linspace(0, 1, size[0]).view(1, 1, -1) * torch.rand(3, 1, 1, generator=g) * 255
        pixels = (0.5 * base + 0.5 * ramp).expand(3, size[1], size[0]).clamp(0, 255).to(torch.uint8)
        Image.fromarray(pixels.permute(1, 2, 0).numpy()).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a painting of a cat, red, style {i}, blue")
    return folder


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_images(tmp_path_factory.mktemp("images") / "data")


def train_args(model, data, output, *extra):
    args = ["train-image", "--model", model, "--data", data, "--output", output, "--resolution", RES,
            "--batch-size", 2, "--log-every", 1, *extra]
    return [str(a) for a in args]


def run(*args):
    return main([str(a) for a in args])


def rows(output):
    return [json.loads(x) for x in (output / "metrics.jsonl").read_text().splitlines()]


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def make_task(sd, data, **kwargs):
    records = read_image_folder(data)
    encoded = encode_images(sd, records, RES, disk_cache=False)
    captions = {r.name: r.caption for r in records}
    hn = hnkit.Hypernetwork.for_model(sd.unet)
    task = ImageTask(sd, hn, encoded, [captions[n] for n in encoded.names], resolution=RES, **kwargs)
    task.prepare("cpu")
    return task


# -- training ------------------------------------------------------------------------------------
def test_loss_falls_and_outputs_are_written(tiny_sd, images, tmp_path):
    out = tmp_path / "run"
    assert run(*train_args(tiny_sd["sd1"], images, out, "--max-steps", 30, "--lr", "3e-3", "--eval-every", 15,
                           "--sample-every", 30, "--sample-steps", 3, "--save-pt", "--name", "ink")) == 0
    val = [(r["step"], r["val_loss"]) for r in rows(out) if "val_loss" in r]
    assert [s for s, _ in val] == [0, 15, 30] and not any("val_ppl" in r for r in rows(out))
    assert val[2][1] < val[0][1] - 0.05, val  # fixed images, noise and timesteps: only the network changed
    hn = hnkit.load(out / "ink.safetensors")
    assert hn.step == 30 and hn.family == "sd_unet" and hn.keyed_by == "width"
    assert sorted(hn.keys()) == [32, 48, 64]  # attn1 widths 32, 64 and the text context 48
    assert hn.config.layer_structure == [1, 2, 1] and hn.config.activation is None  # the web UI's defaults
    pt = hnkit.load(out / "ink.pt")  # the web UI's format, same weights
    for key in hn.keys():
        for a, b in zip(hn[key], pt[key]):
            assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    # the loss falls when measured independently too: the same fixed draws, bare vs attached
    sd = load_sd(str(tiny_sd["sd1"]))
    task = make_task(sd, images)
    before = fixed_loss(task)
    with hnkit.attach(sd.unet, hn):
        after = fixed_loss(task)
    assert after < before - 0.05, (before, after)
    # previews at strength 1, at fixed seeds, and the rest of the run's outputs
    previews = sorted((out / "samples").glob("step-0000030-*.png"))
    assert len(previews) == 2 and Image.open(previews[0]).size == (RES, RES)
    assert "a painting of a cat" in (out / "samples" / "prompts.txt").read_text()
    assert (out / "loss.png").stat().st_size > 1000
    assert (out / "checkpoints" / "step-0000030" / "trainer_state.json").exists()


def test_previews_use_the_hypernetwork_at_fixed_seeds(tiny_sd, images):
    sd = load_sd(str(tiny_sd["sd1"]))
    task = make_task(sd, images, sample_steps=2)
    hn = hnkit.Hypernetwork.for_model(sd.unet, hnkit.HypernetworkConfig(weight_init="XavierNormal"))
    def pixels(images):
        return [torch.from_numpy(np.asarray(im).copy()) for im in images]

    bare = pixels(task.generate(["a cat", "a dog"]))
    again = pixels(task.generate(["a cat", "a dog"]))
    with hnkit.attach(sd.unet, hn):
        styled = pixels(task.generate(["a cat", "a dog"]))
    assert all(torch.equal(a, b) for a, b in zip(bare, again))  # fixed seeds
    assert not torch.equal(bare[0], styled[0])


RESUME_OPTS = ("--max-steps", 6, "--lr", "3e-3", "--lr-schedule", "cosine", "--warmup-steps", 2,
               "--shuffle-tags", "--tag-dropout", "0.3", "--latent-sampling", "random", "--template", "style_filewords",
               "--activation", "relu", "--dropout-structure", "0,0.3,0", "--weight-init", "XavierNormal")


def test_resume_is_exact(tiny_sd, images, tmp_path):
    """Every random draw (template, tags, latent sample, noise, timestep, dropout) replays exactly."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    assert run(*train_args(tiny_sd["sd1"], images, straight, *RESUME_OPTS, "--save-every", 3, "--keep-last", 5)) == 0
    (resumed / "checkpoints").mkdir(parents=True)
    os.symlink(straight / "checkpoints" / "step-0000003", resumed / "checkpoints" / "step-0000003")
    assert run(*train_args(tiny_sd["sd1"], images, resumed, *RESUME_OPTS, "--resume", resumed)) == 0
    a, b = load_file(straight / "hypernetwork.safetensors"), load_file(resumed / "hypernetwork.safetensors")
    assert_same(a, b)
    start = load_file(straight / "checkpoints" / "step-0000003" / "hypernetwork.safetensors")
    assert not torch.equal(a["48.k.linear.0.weight"], start["48.k.linear.0.weight"])  # it did train on


def test_gradient_checkpointing_gives_the_same_weights(tiny_sd, images, tmp_path):
    plain, ckpt = tmp_path / "plain", tmp_path / "ckpt"
    opts = ("--max-steps", 2, "--lr", "1e-3", "--activation", "relu", "--weight-init", "XavierNormal")
    assert run(*train_args(tiny_sd["sd1"], images, plain, *opts)) == 0
    assert run(*train_args(tiny_sd["sd1"], images, ckpt, *opts, "--gradient-checkpointing")) == 0
    a, b = load_file(plain / "hypernetwork.safetensors"), load_file(ckpt / "hypernetwork.safetensors")
    # The gradients agree to float rounding (test_unet checks them); AdamW's first steps divide a
    # gradient by its own size, so an entry whose gradient is ~1e-9 moves by lr * g / (|g| + eps)
    # and rounding there shows up to ~1e-5 of lr 1e-3. A tenth of one step still tells a broken
    # checkpointing (no gradient: the weight stays; a wrong one: it moves elsewhere) apart.
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=1e-4)


def test_v_prediction_target(tiny_sd, images):
    sd = load_sd(str(tiny_sd["sd2v"]))
    assert sd.prediction_type == "v_prediction"
    task = make_task(sd, images)
    torch.manual_seed(0)
    batch = task.collate([task.train_dataset[i] for i in range(3)])
    x0, eps, t = batch["latents"], batch["noise"], batch["timesteps"]
    abar = sd.noise_scheduler.alphas_cumprod[t].view(-1, 1, 1, 1)
    noisy = abar.sqrt() * x0 + (1 - abar).sqrt() * eps
    pred = sd.unet(noisy, t, encoder_hidden_states=batch["context"]).sample
    velocity = abar.sqrt() * eps - (1 - abar).sqrt() * x0  # v = sqrt(abar) eps - sqrt(1 - abar) x0
    expected = torch.nn.functional.mse_loss(pred, velocity)
    torch.testing.assert_close(task.loss(batch), expected, rtol=1e-5, atol=1e-6)
    assert abs(torch.nn.functional.mse_loss(pred, eps) - expected) > 1e-3  # not the epsilon target


def test_sdxl_conditioning_and_a_training_run(tiny_sd, images, tmp_path):
    sd = load_sd(str(tiny_sd["sdxl"]))
    assert sd.is_sdxl and len(sd.text_encoders) == 2
    task = make_task(sd, images)
    batch = task.collate([task.train_dataset[i] for i in range(2)])
    assert batch["context"].shape == (2, 77, 80)  # 32 + 48: both encoders' penultimate states
    assert batch["pooled"].shape == (2, 32)  # the second encoder's projection
    # original size (h, w) = (40, 48), resized to 32 x 38 and cropped 3 px from the left, target 32 x 32
    assert batch["time_ids"].tolist()[0] == [40.0, 48.0, 0.0, 3.0, 32.0, 32.0]
    assert torch.isfinite(task.loss(batch))
    out = tmp_path / "xl"
    args = train_args(tiny_sd["sdxl"], images, out, "--max-steps", 2, "--sample-every", 2, "--sample-steps", 2)
    assert run(*args) == 0
    hn = hnkit.load(out / "hypernetwork.safetensors")
    assert 80 in hn.keys() and hn.step == 2
    assert len(list((out / "samples").glob("step-0000002-*.png"))) == 2


# -- data and captions -----------------------------------------------------------------------
def test_captions_from_sidecars_metadata_and_names(tmp_path):
    folder = tmp_path / "mixed"
    folder.mkdir()
    for name in ("a.png", "00012-a red fox.jpg", "sub/b.png"):
        (folder / name).parent.mkdir(exist_ok=True)
        Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / name)
    (folder / "a.txt").write_text("a sidecar caption\n")
    (folder / "sub" / "b.txt").write_text("ignored: metadata wins")
    (folder / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/b.png", "text": "from metadata"}) + "\n")
    got = {r.name: r.caption for r in read_image_folder(folder)}
    assert got == {"a.png": "a sidecar caption", "00012-a red fox.jpg": "a red fox", "sub/b.png": "from metadata"}
    assert caption_from_name(folder / "3-1 cat.png") == "cat"


def test_templates_and_tag_shuffle_dropout_are_deterministic():
    assert read_templates("filewords") == ["[filewords]"]
    style = read_templates("style_filewords")
    assert len(style) > 3 and all("[filewords]" in t and "[name]" in t for t in style)
    prompt = render_prompt("[filewords], in the style of [name]", "a cat, red", "ink")
    assert prompt == "a cat, red, in the style of ink"
    caption = ", ".join(f"tag{i}" for i in range(12))

    def draw(seed, shuffle=True, dropout=0.25):
        return process_tags(caption, shuffle, dropout, torch.Generator().manual_seed(seed))

    assert draw(1) == draw(1) and draw(1) != draw(2)  # a function of the seed alone
    shuffled = draw(3, dropout=0.0).split(", ")
    assert sorted(shuffled) == sorted(caption.split(", ")) and shuffled != caption.split(", ")
    kept = [len(draw(s, shuffle=False).split(", ")) for s in range(200)]
    assert 8.0 < sum(kept) / len(kept) < 10.0  # 12 tags x 0.75 kept
    assert process_tags(caption, False, 0.0, None) == caption


def test_batch_draws_follow_the_global_seed(tiny_sd, images):
    sd = load_sd(str(tiny_sd["sd1"]))
    task = make_task(sd, images, shuffle_tags=True, tag_dropout=0.2, templates=read_templates("style_filewords"))
    examples = [task.train_dataset[i] for i in range(4)]

    def collate(seed):
        torch.manual_seed(seed)
        return task.collate(examples)

    a, b, c = collate(5), collate(5), collate(6)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["noise"], c["noise"]) and not torch.equal(a["context"], c["context"])
    g = task.batch_generator()
    prompts = {task.prompt(0, g) for _ in range(20)}
    assert len(prompts) > 5 and all("hypernetwork" in p for p in prompts)  # [name] filled in


def test_unreadable_images_are_skipped_by_name(tiny_sd, images, tmp_path, capsys):
    data = write_images(tmp_path / "data", n=3)
    (data / "broken.png").write_bytes(b"this is no image")
    good = (data / "img0.png").read_bytes()
    (data / "truncated.png").write_bytes(good[: len(good) // 2])
    out = tmp_path / "run"
    assert run(*train_args(tiny_sd["sd1"], data, out, "--max-steps", 1)) == 0
    captured = capsys.readouterr()
    assert "hnkit: warning: skipped unreadable image broken.png (" in captured.err
    assert "hnkit: warning: skipped unreadable image truncated.png (" in captured.err
    assert "1 steps in" in captured.out and ", 3 images;" in captured.out


def test_bad_input_gives_one_line_and_exit_2(tiny_sd, images, tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    junk = tmp_path / "junk"
    junk.mkdir()
    (junk / "a.png").write_bytes(b"not a png")
    (junk / "b.jpg").write_bytes(b"\xff\xd8 not a jpeg either")
    no_unet = tmp_path / "no_unet"
    no_unet.mkdir()
    index = {"_class_name": "AudioLDMPipeline", "vae": ["diffusers", "AutoencoderKL"]}
    (no_unet / "model_index.json").write_text(json.dumps(index))
    cases = [
        (["--data", tmp_path / "missing"], "missing: no such folder"),
        (["--data", empty], "empty: no images in this folder"),
        (["--data", junk], "junk: none of the 2 images could be read (first: a.png"),
        (["--model", tmp_path / "no_model"], "no_model: no such model folder"),
        (["--model", images], "not a diffusers pipeline folder (no model_index.json)"),
        (["--model", no_unet], "this pipeline has no UNet"),
        (["--resolution", 30], "--resolution 30: must be a positive multiple of 8"),
        (["--latent-sampling", "sometimes"], "unknown latent sampling 'sometimes'"),
        (["--template", "nonesuch"], "nonesuch: no such template file"),
    ]
    for i, (override, message) in enumerate(cases):
        args = with_option(train_args(tiny_sd["sd1"], images, tmp_path / f"out{i}", "--max-steps", 1), *override)
        assert main(args) == 2, message
        err = capsys.readouterr().err
        lines = [line for line in err.splitlines() if not line.startswith("hnkit: warning:")]
        assert len(lines) == 1 and message in lines[0], err
        assert not (tmp_path / f"out{i}").exists()
    # the network's options are refused before the pipeline loads (a missing model is not the first error)
    for extra, message in (([], "--form lowrank --rank None"),
                           (["--rank", "2", "--save-pt"], "--save-pt: a 'lowrank' hypernetwork cannot be written")):
        args = [*train_args(tmp_path / "no_model", images, tmp_path / "lr", "--form", "lowrank"), *extra]
        assert main([str(a) for a in args]) == 2, message
        assert message in capsys.readouterr().err
    out = tmp_path / "done"  # an existing run is never overwritten
    assert run(*train_args(tiny_sd["sd1"], images, out, "--max-steps", 1)) == 0
    before = (out / "hypernetwork.safetensors").read_bytes()
    assert run(*train_args(tiny_sd["sd1"], images, out, "--max-steps", 1)) == 2
    assert "already holds a training run" in capsys.readouterr().err
    assert (out / "hypernetwork.safetensors").read_bytes() == before


# -- caches ----------------------------------------------------------------------------------
def test_latents_are_cached_on_disk_and_sampled_per_mode(tiny_sd, tmp_path, monkeypatch):
    from hnkit import sd_model as image_mod
    from hnkit.util import cache_root

    sd = load_sd(str(tiny_sd["sd1"]))
    data = write_images(tmp_path / "data", n=4)
    records = read_image_folder(data)
    cached = lambda: set((cache_root() / "image").glob("*.safetensors"))  # noqa: E731
    before = cached()
    first = encode_images(sd, records, RES)
    assert len(cached() - before) == 1
    with monkeypatch.context() as m:
        m.setattr(image_mod, "load_image", lambda *a: pytest.fail("decoded again despite the cache"))
        again = encode_images(sd, records, RES)
        assert torch.equal(first.mean, again.mean) and torch.equal(first.std, again.std)
        # the same memory layout cold and warm, so training computes bit for bit alike after either
        assert first.mean.stride() == again.mean.stride() and first.std.stride() == again.std.stride()
        assert first.names == again.names and first.mean.shape == (4, 4, 16, 16) and (first.std > 0).all()
        os.utime(data / "img1.png", ns=(1, 1))  # a changed file is encoded again
        with pytest.raises(pytest.fail.Exception):
            encode_images(sd, read_image_folder(data), RES)
    torch.testing.assert_close(encode_images(sd, records, RES, disk_cache=False).mean, first.mean)

    def latents(mode, seed):
        task = ImageTask(sd, None, first, ["x"] * 4, latent_sampling=mode, resolution=RES)
        torch.manual_seed(seed)
        return task.collate([task.train_dataset[i] for i in range(4)])["latents"]

    assert torch.equal(latents("deterministic", 0), first.mean)
    once = latents("once", 0)
    assert torch.equal(once, latents("once", 1)) and not torch.equal(once, first.mean)  # one draw, kept
    r0, r1 = latents("random", 0), latents("random", 1)
    assert not torch.equal(r0, r1) and torch.equal(r0, latents("random", 0))  # a new draw per step, seeded
    z = (r0 - first.mean) / first.std
    assert 0.8 < z.std().item() < 1.2  # drawn from the VAE's distribution


def test_text_encoder_outputs_are_cached_only_when_captions_are_static(tiny_sd, images, monkeypatch):
    from hnkit import image as image_mod

    sd = load_sd(str(tiny_sd["sd1"]))
    static = make_task(sd, images, templates=["[filewords], by [name]"])
    assert static.captions_are_static and static.text_cache is not None
    expected = encode_prompts(sd, [static.prompt(1)])["context"]
    with monkeypatch.context() as m:
        m.setattr(image_mod, "encode_prompts", lambda *a: pytest.fail("encoded again despite the cache"))
        batch = static.collate([static.train_dataset[1]])
    torch.testing.assert_close(batch["context"], expected)
    for kwargs in ({"shuffle_tags": True}, {"tag_dropout": 0.1}, {"templates": read_templates("style_filewords")}):
        task = make_task(sd, images, **kwargs)
        assert not task.captions_are_static and task.text_cache is None, kwargs
        calls = []
        with monkeypatch.context() as m:
            m.setattr(image_mod, "encode_prompts", lambda sd, prompts: calls.append(prompts) or
                      encode_prompts(sd, prompts))
            task.collate([task.train_dataset[0], task.train_dataset[1]])
        assert len(calls) == 1 and len(calls[0]) == 2  # encoded at this step


def test_latents_are_kept_contiguous_even_when_the_vae_returns_channels_last(tiny_sd, tmp_path, monkeypatch):
    """The disk cache holds contiguous tensors; the in-memory ones of a cold run must have the same
    layout, or training after a cold and after a warm cache differs in the last bits."""
    sd = load_sd(str(tiny_sd["sd1"]))
    real_encode = sd.vae.encode

    def channels_last_encode(pixels):
        out = real_encode(pixels)
        dist = out.latent_dist
        dist.mean = dist.mean.contiguous(memory_format=torch.channels_last)
        dist.std = dist.std.contiguous(memory_format=torch.channels_last)
        return out

    monkeypatch.setattr(sd.vae, "encode", channels_last_encode)
    records = read_image_folder(write_images(tmp_path / "data", n=2))
    cold = encode_images(sd, records, RES, disk_cache=False)
    assert cold.mean.is_contiguous() and cold.std.is_contiguous()
