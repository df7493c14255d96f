"""Small helpers around transformers and diffusers models that every task needs."""

from __future__ import annotations

import sys


def enable_gradient_checkpointing(model) -> None:
    """Turn on activation checkpointing, non-reentrant (gradients reach the hypernetwork even though
    no base parameter needs them). transformers 5 renamed the method; both names are handled.

    transformers checkpoints a layer only while that layer is in training mode. The frozen base is
    trained in eval mode (no dropout), so the checkpointed layers alone - not their children, whose
    dropout stays off - get ``training = True``. A diffusers model (the SD UNet) checkpoints
    non-reentrantly by default and in any mode."""
    diffusers = sys.modules.get("diffusers")  # a diffusers model implies diffusers is imported
    if diffusers is not None and isinstance(model, diffusers.ModelMixin):
        model.enable_gradient_checkpointing()
        return
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    from transformers import PreTrainedModel

    for module in model.modules():
        if getattr(module, "gradient_checkpointing", False) is True and not isinstance(module, PreTrainedModel):
            module.training = True  # the layer itself only: a non-recursive flag
