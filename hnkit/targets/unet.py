"""Stable Diffusion UNet (diffusers ``UNet2DConditionModel``: SD 1.x, SD 2.x, SDXL).

Sites are the ``Attention`` modules of the transformer blocks, ``...transformer_blocks.j.attn1``
(self-attention) and ``...attn2`` (cross-attention), with separate ``to_k`` / ``to_v`` projections.
diffusers' processors call ``attn.to_k(context)`` and ``attn.to_v(context)`` with the tensor alone,
where ``context`` is the hidden state for attn1 and the text embeddings for attn2: exactly the
tensor the web UI feeds its hypernetwork (``k = to_k(hn_k(context))``), so a forward pre-hook on
each projection is all it takes, whatever processor diffusers installs.

One UNet forward hands the same text-embedding tensor to every attn2, so their hypernetwork
modules would compute the same result once per layer (16 times in SD 1.x, 70 in SDXL).
:class:`ContextMemo` computes it once per UNet call instead. It also multiplies a linear module's
weights together once per UNet call where the module's sites see enough rows in total for that to
pay (``HypernetworkModule.keep_collapsed``), e.g. the web UI's ``[1, 2, 1]`` at SD 1.x's 1280-wide
sites, which see 256 rows each at 512 px, six times per call.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn

from ..errors import HnkitError
from .base import matching_modules, separate_kv_site

FAMILY = "sd_unet"
MODEL_TYPES = (FAMILY,)

# The transformer blocks of down, mid and up blocks; the key is this tail of the module name.
_SITE_PATTERN = r"(?:(?:down|up)_blocks\.\d+|mid_block)\.attentions\.\d+\.transformer_blocks\.\d+\.attn[12]"


def is_unet(model) -> bool:
    """A diffusers UNet: it has no ``config.model_type``, so it is recognised by its block layout."""
    return isinstance(model, nn.Module) and all(
        isinstance(getattr(model, name, None), nn.Module) for name in ("down_blocks", "up_blocks", "mid_block"))


def is_pipeline(obj) -> bool:
    """A diffusers pipeline (not a module itself) that holds a UNet: attach to ``pipe.unet``."""
    return not isinstance(obj, nn.Module) and is_unet(getattr(obj, "unet", None))


def sites(model):
    memo = ContextMemo(model)
    found = []
    for key, attn in matching_modules(model, _SITE_PATTERN):
        if getattr(attn, "fused_projections", False):
            raise HnkitError(f"{key} has fused QKV projections (fuse_qkv_projections()); hypernetworks need "
                             "separate to_k/to_v: call unet.unfuse_qkv_projections() first")
        site = separate_kv_site(key, attn.to_k, attn.to_v, attn.to_k.in_features)
        if getattr(attn, "is_cross_attention", False):
            install = memo.memoized_install(site.install, site.width)
        else:
            install = memo.counted_install(site.install, _level(model, key))
        found.append(dataclasses.replace(site, install=install))
    return found


def _level(unet, key: str) -> int:
    """How many times the latent was halved before this site: down block i works at level i, the
    middle block at the lowest, up block j at ``len(up_blocks) - 1 - j``."""
    block, _, rest = key.partition(".")
    if block == "mid_block":
        return len(unet.down_blocks) - 1
    i = int(rest.split(".", 1)[0])
    return i if block == "down_blocks" else len(unet.up_blocks) - 1 - i


def _modules(transform):
    for _, pair in getattr(transform, "pairs", ()):
        yield from pair


class MemoizedTransform:
    """A site's transform, answered from the UNet's :class:`ContextMemo` when the input is the very
    tensor the memo computed for, and computed directly otherwise. Same results either way."""

    def __init__(self, transform, memo: "ContextMemo"):
        self.transform = transform
        self.memo = memo

    def __call__(self, x: torch.Tensor, which: int) -> torch.Tensor:
        hit = self.memo.entries.get((self.transform, which))
        if hit is not None and hit[0] is x:
            return hit[1]
        return self.transform(x, which)


class ContextMemo:
    """The cross-attention transforms of one UNet, computed once per UNet call.

    A forward pre-hook on the UNet root (one per attachment, shared by all its attn2 sites) clears
    the memo and computes ``transform(context, which)`` for each distinct transform and for K and
    V, where ``context`` is the ``encoder_hidden_states`` the UNet was called with. The attn2 hooks
    then get the stored result whenever their input *is* that tensor.

    Why at the root and not lazily at the first attn2: under gradient checkpointing each block's
    forward runs again during backward, and the recomputation must perform the same operations as
    the original forward. Had the first block computed and cached the result, its recomputation
    would find the cache filled and skip operations whose saved tensors autograd expects. Computed
    at the root, outside every checkpointed block, the result is a plain input to all of them, both
    times. Clearing per call keeps it exact in training, where weights change between steps while
    the same cached text-embedding tensor may be fed again, and when strengths change between calls.

    A transform whose modules have active dropout (training mode) is never memoized: each layer
    draws its own dropout mask, as the web UI does.

    The same hook also counts the rows each module will see in this call, from the latent's size
    and each self-attention site's level (cross-attention: the context's rows, once), and has
    every linear module whose total passes its threshold keep its collapsed product for the call
    (``HypernetworkModule.keep_collapsed``), the others forget theirs. Computed at the root for
    the same reason as the context: a checkpointed block's recomputation then finds it too.
    """

    def __init__(self, unet: nn.Module):
        self.unet = unet
        self.entries: dict = {}  # (transform, which) -> (context, result)
        self._registered: dict = {}  # transform -> [width, number of sites using it]
        self._levels: list = []  # [(transform, level)] per self-attention site
        self._hook = None

    def memoized_install(self, install, width: int):
        """Wrap a site's ``install(transform)`` so the site reads from this memo."""

        def memo_install(transform):
            self._register(transform, width)
            undo = install(MemoizedTransform(transform, self))

            def remove():
                undo()
                self._unregister(transform)

            return remove

        return memo_install

    def counted_install(self, install, level: int):
        """Wrap a self-attention site's ``install(transform)`` so this memo counts its rows."""

        def counted(transform):
            entry = (transform, level)
            self._levels.append(entry)
            self._hook_on()
            undo = install(transform)

            def remove():
                undo()
                self._levels.remove(entry)
                self._hook_off(transform)

            return remove

        return counted

    def _register(self, transform, width: int) -> None:
        entry = self._registered.setdefault(transform, [width, 0])
        entry[1] += 1
        self._hook_on()

    def _unregister(self, transform) -> None:
        entry = self._registered[transform]
        entry[1] -= 1
        if entry[1] == 0:
            del self._registered[transform]
        self._hook_off(transform)

    def _hook_on(self) -> None:
        if self._hook is None:
            self._hook = self.unet.register_forward_pre_hook(self._fill, with_kwargs=True)

    def _hook_off(self, transform) -> None:
        for module in _modules(transform):
            module.forget_collapsed()
        if not self._registered and not self._levels and self._hook is not None:
            self._hook.remove()
            self._hook = None
            self.entries.clear()

    def _fill(self, module, args, kwargs) -> None:
        self.entries.clear()
        context = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        sample = kwargs.get("sample", args[0] if args else None)
        self._keep_products(sample, context)
        if not isinstance(context, torch.Tensor):
            return None
        self._fill_context(context)
        return None

    def _keep_products(self, sample, context) -> None:
        transforms = [transform for transform, _ in self._levels] + list(self._registered)
        rows = {m: 0 for transform in transforms for m in _modules(transform)}
        if isinstance(sample, torch.Tensor) and sample.dim() == 4:
            batch, _, height, width = sample.shape
            for transform, level in self._levels:
                h, w = height, width
                for _ in range(level):
                    h, w = (h + 1) // 2, (w + 1) // 2
                for m in _modules(transform):
                    rows[m] += batch * h * w
        if isinstance(context, torch.Tensor):
            for transform in self._registered:  # memoized: the context's rows once per call
                for m in _modules(transform):
                    rows[m] += context.shape[:-1].numel()
        for m, n in rows.items():
            if not m.pays_to_collapse(n):
                m.forget_collapsed()
            # With gradients, a new product (and graph) per call; without, the kept one serves
            # every call until a weight changes: the steps of a pipeline's denoising loop.
            elif torch.is_grad_enabled() or m._kept_collapsed() is None:
                m.keep_collapsed()

    def _fill_context(self, context: torch.Tensor) -> None:
        for transform, (width, _) in self._registered.items():
            if width == context.shape[-1] and not _draws_random_numbers(transform):
                for which in (0, 1):
                    self.entries[(transform, which)] = (context, transform(context, which))


def _draws_random_numbers(transform) -> bool:
    """True when running ``transform`` consumes random numbers (dropout in training mode), or when
    its modules cannot be seen (then memoizing is not known to be safe)."""
    pairs = getattr(transform, "pairs", None)
    if pairs is None:
        return True
    return any(module.dropout_active for _, modules in pairs for module in modules)
