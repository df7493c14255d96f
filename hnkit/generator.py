"""A style generator: one example text becomes a hypernetwork style in one forward pass of the frozen
base model (docs/design.md, "Style generator").

The example is read by the base model itself. At each attention site the generator takes the mean of
the K/V input over the example's tokens, centred and scaled by the same statistics on neutral text
(``f``, one vector per site). From those it writes, for every site and for K and V, a two-layer linear
network ``x + U diag(g) (W1 x + b1) + b2`` with

- ``W1, b1, U``: learned, the same for every style (a basis of feature detectors and directions);
- ``g = C e + c0``: a gate per hidden unit from ``e = tanh(sum_l Q_l f_l / sqrt(L))``, one embedding of
  the whole example;
- ``b2 = p * f + A (B f) + b0``: a shift of the input from the site's own features.

``C, c0, p, A`` and ``b0`` start at zero, so an untrained generator writes the identity. What it
writes is an ordinary per-site hypernetwork of form "mlp" (``[1, m, 1]``, no activation): ``attach``,
``Stack``, ``fuse``, ``save``, ``hnkit export`` (PEFT, llama.cpp) and ``hnkit serve`` take it like a trained
style. (Like every per-site style it has no web UI ``.pt`` form: that file keys networks by width.)

A generator file is a ``.safetensors`` whose metadata entry ``hnkit_generator`` (JSON) holds its
options, the sites it was made for and the fingerprint of the base model; nothing runs on load.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as st_save
from torch import nn

from .errors import HnkitError, first_line
from .hypernetwork import MAX_SITE_KEYS, Hypernetwork, HypernetworkConfig
from .safe_load import parse_metadata
from .targets import find_target, model_name
from .util import atomic_write

FORMAT = "hnkit-style-generator"
FORMAT_VERSION = 1
META_KEY = "hnkit_generator"
MIN_EXAMPLE_CHARS = 200  # below this a mean activation says little of a style
MAX_EXAMPLE_CHARS = 16_000  # the target case is <= 2 KB; only the first `max_tokens` tokens are read
SHIPPED = Path(__file__).parent / "generators" / "smollm2-135m-instruct.safetensors"


@dataclass
class GeneratorConfig:
    hidden_mult: float = 0.0625  # hidden units of a generated module per input unit ([1, m, 1])
    embed: int = 64  # width of the example's embedding e
    rank: int = 16  # rank of the bias map A B
    max_tokens: int = 256  # tokens of the example that are read

    @classmethod
    def from_dict(cls, d: dict) -> "GeneratorConfig":
        names = {f.name for f in fields(cls)}
        if not isinstance(d, dict) or set(d) - names:
            raise ValueError(f"unknown generator option(s): {sorted(set(d) - names) if isinstance(d, dict) else d}")
        c = cls(**d)
        ints = (c.embed, c.rank, c.max_tokens)
        if not all(isinstance(v, int) and not isinstance(v, bool) and 0 < v <= 8192 for v in ints):
            raise ValueError("embed, rank and max_tokens must be integers from 1 to 8192")
        if not isinstance(c.hidden_mult, (int, float)) or not 0 < c.hidden_mult <= 4:
            raise ValueError("hidden_mult must be a number above 0 and at most 4")
        return c


def fingerprint(model) -> str:
    """A short hash of what makes a base model itself: its sites and its token embeddings' first rows
    (two checkpoints of one architecture differ there)."""
    family, sites = find_target(model).family, find_target(model).sites
    h = hashlib.sha256(json.dumps([family, [[s.key, s.width] for s in sites]]).encode())
    emb = model.get_input_embeddings().weight.detach()
    h.update(emb[:16].float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class StyleGenerator(nn.Module):
    """Writes a per-site hypernetwork from an example text; see the module docstring."""

    def __init__(self, config: GeneratorConfig, sites: list, *, family: str, base_model: str | None,
                 fingerprint: str, name: str = "style-generator", info: dict | None = None):
        super().__init__()
        widths = {w for _, w in sites}
        if len(widths) != 1:
            raise HnkitError("a style generator needs attention sites of one width (a text model's); "
                             f"this model has {sorted(widths)}")
        self.config, self.sites = config, [(str(k), int(w)) for k, w in sites]
        self.family, self.base_model, self.fingerprint, self.name = family, base_model, fingerprint, name
        self.info = dict(info or {})  # how it was trained (command, time, data), kept in the file
        self.sha256: str | None = None  # of the file it was loaded from
        n, d = len(sites), widths.pop()
        h, e, r = int(d * config.hidden_mult), config.embed, config.rank
        if h < 1:
            raise HnkitError(f"hidden_mult {config.hidden_mult} leaves no hidden unit at width {d}")
        self.width, self.hidden = d, h
        z = torch.zeros
        self.mu, self.sigma = nn.Parameter(z(n, d), requires_grad=False), nn.Parameter(torch.ones(n, d),
                                                                                        requires_grad=False)
        self.q = nn.Parameter(torch.randn(n, e, d) / math.sqrt(d))
        self.w1 = nn.Parameter(torch.randn(n, 2, h, d) / math.sqrt(d))
        self.b1 = nn.Parameter(z(n, 2, h))
        self.u = nn.Parameter(torch.randn(n, 2, d, h) / math.sqrt(h))
        self.c, self.c0 = nn.Parameter(z(n, 2, h, e)), nn.Parameter(z(n, 2, h))
        self.p, self.b0 = nn.Parameter(z(n, 2, d)), nn.Parameter(z(n, 2, d))
        self.a, self.b = nn.Parameter(z(n, 2, d, r)), nn.Parameter(torch.randn(n, 2, r, d) / math.sqrt(d))

    # -- construction --------------------------------------------------------------------------
    @classmethod
    def for_model(cls, model, config: GeneratorConfig | None = None, **kwargs) -> "StyleGenerator":
        """An untrained generator (it writes the identity) for ``model``'s attention sites."""
        target = find_target(model)
        name = model_name(model)
        if name and Path(name).is_dir():  # a local folder: its name, not where it lies on this machine
            name = Path(name).name
        return cls(config or GeneratorConfig(), [(s.key, s.width) for s in target.sites], family=target.family,
                   base_model=name, fingerprint=fingerprint(model), **kwargs)

    @classmethod
    def load(cls, path: str | os.PathLike | None = None) -> "StyleGenerator":
        """The generator in ``path``, or without one the generator hnkit ships (for SmolLM2-135M-Instruct)."""
        return load_generator(Path(path) if path is not None else SHIPPED)

    def save(self, path: str | os.PathLike, dtype: torch.dtype = torch.float16) -> Path:
        """Writes the generator (weights in ``dtype``; the neutral statistics in float32)."""
        path = Path(path)
        tensors = {n: t.detach().to(torch.float32 if n in ("mu", "sigma") else dtype).contiguous().cpu()
                   for n, t in self.named_parameters()}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "name": self.name, "config": asdict(self.config),
                "sites": self.sites, "family": self.family, "base_model": self.base_model,
                "fingerprint": self.fingerprint, "info": self.info}
        atomic_write(path, lambda f: f.write(st_save(tensors, metadata={META_KEY: json.dumps(meta)})))
        return path

    # -- reading an example --------------------------------------------------------------------
    def check_model(self, model) -> None:
        """Refuse a model other than the one the generator was made for, naming both."""
        mine = fingerprint(model)
        if mine != self.fingerprint:
            raise HnkitError(f"style generator {self.name!r} was made for {self.base_model or 'another model'} "
                             f"(fingerprint {self.fingerprint}); this model is {model_name(model) or 'unnamed'} "
                             f"(fingerprint {mine})")

    def token_ids(self, tokenizer, text: str, context: int | None = None) -> torch.Tensor:
        """The example's first ``max_tokens`` token ids (at most ``context``, the model's), ``[1, T]``."""
        check_example(text)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"][: min(self.config.max_tokens, context or 1 << 30)]
        return torch.tensor([ids], dtype=torch.long)

    @torch.no_grad()
    def read(self, model, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """The mean K/V input of each site over each row's tokens, ``[B, L, D]`` (``mask``: 1 = a token)."""
        target = find_target(model)
        device = next(model.parameters()).device
        ids = ids.to(device)
        mask = torch.ones_like(ids) if mask is None else mask.to(device)
        weights = (mask / mask.sum(1, keepdim=True)).unsqueeze(-1).float()
        means = [None] * len(target.sites)

        def recorder(i):
            def kernel(x, which):
                if which == 0:
                    means[i] = (x.float() * weights).sum(1)
                return x
            return kernel

        undo = [site.install(recorder(i)) for i, site in enumerate(target.sites)]
        try:
            backbone = getattr(model, getattr(model, "base_model_prefix", ""), model)  # no LM head: not needed
            backbone(input_ids=ids, attention_mask=mask, use_cache=False)
        finally:
            for u in reversed(undo):
                u()
        return torch.stack(means, 1).to(self.mu.device)

    # -- writing a style -----------------------------------------------------------------------
    def features(self, means: torch.Tensor) -> torch.Tensor:
        """Site means ``[..., L, D]`` centred and scaled by the neutral text's: what the generator reads."""
        return (means - self.mu) / self.sigma

    def codes(self, means: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Gates ``g [B, L, 2, H]`` and shifts ``b2 [B, L, 2, D]`` for examples' site means ``[B, L, D]``."""
        f = self.features(means)
        e = torch.tanh(torch.einsum("nld,led->ne", f, self.q) / math.sqrt(len(self.sites)))
        g = torch.einsum("ne,ljhe->nljh", e, self.c) + self.c0
        low = torch.einsum("nljr,ljdr->nljd", torch.einsum("nld,ljrd->nljr", f, self.b), self.a)
        return g, self.p * f.unsqueeze(2) + low + self.b0

    def residual(self, x: torch.Tensor, layer: int, which: int, g: torch.Tensor, b2: torch.Tensor) -> torch.Tensor:
        """The generated residual at one site for rows ``x [B, T, D]`` with their own codes
        ``g [B, H]``, ``b2 [B, D]`` (training: a different style per row)."""
        h = x @ self.w1[layer, which].T + self.b1[layer, which]
        return (h * g.unsqueeze(1)) @ self.u[layer, which].T + b2.unsqueeze(1)

    @torch.no_grad()
    def write(self, means: torch.Tensor, name: str = "generated-style", extra: dict | None = None) -> Hypernetwork:
        """The hypernetwork for one example's site means ``[L, D]``."""
        g, b2 = self.codes(means.unsqueeze(0))
        config = HypernetworkConfig(layer_structure=[1, hidden_multiplier(self.hidden, self.width), 1],
                                    activation="linear", per_site=True)
        keys = [k for k, _ in self.sites]
        hn = Hypernetwork(config, keys, widths=dict(self.sites), name=name, family=self.family,
                          base_model=self.base_model, extra=extra)
        for i, key in enumerate(keys):
            for j, module in enumerate(hn[key]):
                first, second = module.linear[0], module.linear[-1]
                first.weight.copy_(self.w1[i, j])
                first.bias.copy_(self.b1[i, j])
                second.weight.copy_(self.u[i, j] * g[0, i, j])
                second.bias.copy_(b2[0, i, j])
        return hn

    def make_style(self, model, text: str, tokenizer=None, name: str | None = None) -> Hypernetwork:
        """The style of ``text`` for ``model`` (the one this generator was made for), as a Hypernetwork
        whose ``extra["generated"]`` names the generator and the example's sha256. ``tokenizer``: the
        model's (loaded from the model's folder when not given)."""
        self.check_model(model)
        if tokenizer is None:
            from transformers import AutoTokenizer
            tokenizer = AutoTokenizer.from_pretrained(model_name(model))
        from .text import context_length

        ids = self.token_ids(tokenizer, text, context_length(model))
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
        extra = {"generated": {"generator": self.name, "generator_sha256": self.sha256, "example_sha256": digest,
                               "example_tokens": int(ids.shape[1])}}
        return self.write(self.read(model, ids)[0], name=name or f"style-{digest[:8]}", extra=extra)


def check_example(text) -> None:
    """Refuse an example that is not text, too short or too long (one line)."""
    if not isinstance(text, str):
        raise HnkitError(f"the example must be text, not {type(text).__name__}")
    if "\x00" in text:
        raise HnkitError("the example is binary (it holds NUL bytes), not text")
    n = len(text.strip())
    if n < MIN_EXAMPLE_CHARS:
        raise HnkitError(f"the example is too short: {n} characters; a style needs at least {MIN_EXAMPLE_CHARS}")
    if len(text) > MAX_EXAMPLE_CHARS:
        raise HnkitError(f"the example is too long: {len(text):,} characters; at most {MAX_EXAMPLE_CHARS:,} "
                         f"(about 2 KB is what a style needs)")


def hidden_multiplier(hidden: int, width: int) -> float:
    """The layer-structure number ``m`` with ``int(width * m) == hidden`` (how a module sizes its layer)."""
    m = hidden / width
    while int(width * m) < hidden:
        m = math.nextafter(m, math.inf)
    return m


def load_generator(path: Path) -> StyleGenerator:
    """A generator file, checked as every file hnkit reads: metadata bounded and parsed as JSON, the
    declared shapes built on the meta device and compared with the tensors before anything is kept."""
    if not path.is_file():
        raise HnkitError(f"{path}: no such style generator file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            if META_KEY not in meta:
                raise HnkitError(f"{path}: not a style generator (no {META_KEY} metadata)")
            m = parse_metadata(meta[META_KEY], path)
            gen = _declared(m, path)
            expected = dict(gen.named_parameters())
            if set(f.keys()) != set(expected):
                raise HnkitError(f"{path}: its tensors {sorted(f.keys())[:4]} do not match a generator's")
            for n, p in expected.items():  # shapes first: nothing is read that the declaration does not need
                if list(f.get_slice(n).get_shape()) != list(p.shape):
                    raise HnkitError(f"{path}: tensor {n} has shape {f.get_slice(n).get_shape()}, "
                                     f"expected {list(p.shape)}")
            tensors = {n: f.get_tensor(n) for n in expected}
    except SafetensorError as exc:
        raise HnkitError(f"{path}: corrupt or truncated safetensors file ({first_line(exc)})") from None
    except OSError as exc:
        raise HnkitError(f"{path}: cannot read ({first_line(exc)})") from None
    for n, t in tensors.items():
        if not t.is_floating_point() or not torch.isfinite(t).all():
            raise HnkitError(f"{path}: tensor {n} holds values that are not finite floating point numbers")
    gen = _declared(m, path, device="cpu")
    with torch.no_grad():
        for n, p in gen.named_parameters():
            p.copy_(tensors[n].float())
    gen.sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    return gen.eval()


def _declared(m, path: Path, device: str = "meta") -> StyleGenerator:
    """The generator the metadata declares, built on ``device`` (meta: no memory)."""
    try:
        if not isinstance(m, dict) or m.get("format") != FORMAT:
            raise HnkitError("not a style generator file")
        if m.get("format_version", 0) > FORMAT_VERSION:
            raise HnkitError(f"format version {m['format_version']} is newer than this hnkit reads; upgrade hnkit")
        sites = m["sites"]
        if not (isinstance(sites, list) and 0 < len(sites) <= MAX_SITE_KEYS and all(
                isinstance(s, list) and len(s) == 2 and isinstance(s[0], str) and isinstance(s[1], int)
                and 0 < s[1] <= 65536 for s in sites)):
            raise ValueError(f"'sites' must be 1 to {MAX_SITE_KEYS} [name, width] pairs")
        config = GeneratorConfig.from_dict(m["config"])
        with torch.device(device):
            return StyleGenerator(config, sites, family=str(m["family"]), base_model=m.get("base_model"),
                                  fingerprint=str(m["fingerprint"]), name=str(m.get("name", path.stem)),
                                  info=m.get("info") if isinstance(m.get("info"), dict) else {})
    except HnkitError as exc:
        raise HnkitError(f"{path}: {exc}") from None
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise HnkitError(f"{path}: bad style generator metadata ({first_line(exc)})") from None


__all__ = ["GeneratorConfig", "StyleGenerator", "check_example", "fingerprint"]
