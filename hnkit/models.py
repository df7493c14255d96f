"""Small helpers around transformers models that every task needs."""

from __future__ import annotations


def enable_gradient_checkpointing(model) -> None:
    """Turn on activation checkpointing, non-reentrant (gradients reach the hypernetwork even though
    no base parameter needs them). transformers 5 renamed the method; both names are handled."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
