"""Prior preservation for the text task: keep the bare model's next-token distributions on neutral text.

While a style trains, each step also runs the attached model on a few neutral blocks and adds
``weight * KL(bare || attached)`` to the loss, so the style changes what it must and leaves ordinary
language alone. The base is frozen, so the bare model's distributions never change: they are
computed once, before training, and kept as the top-``k`` log-probabilities per position
(:class:`Teacher`). The KL is taken between the two distributions coarsened to those ``k`` tokens
plus one bucket for the rest of the vocabulary: an exact KL of the coarsened distributions, a lower
bound of the full one, and equal to it when ``k`` is the vocabulary size
(``tests/test_preserve.py``). A step then costs one forward and backward over the style and the
neutral blocks together, never a second forward of the bare model.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import HnkitError

TOP_K = 64


class Teacher:
    """The bare model's top-``k`` next-token log-probabilities on ``blocks`` ``[n, T]``, on the CPU."""

    def __init__(self, model, blocks: torch.Tensor, k: int = TOP_K, batch_size: int = 8):
        if blocks.dim() != 2 or len(blocks) == 0:
            raise HnkitError("prior preservation needs at least one neutral block")
        self.blocks = blocks
        device = next(model.parameters()).device
        values, indices = [], []
        with torch.no_grad():
            for i in range(0, len(blocks), batch_size):
                logits = model(input_ids=blocks[i:i + batch_size].to(device), use_cache=False).logits
                top = F.log_softmax(logits.float(), dim=-1).topk(min(k, logits.shape[-1]), dim=-1)
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
        self.values, self.indices = torch.cat(values), torch.cat(indices)

    def __len__(self) -> int:
        return len(self.blocks)


def coarse_kl(teacher_logp: torch.Tensor, teacher_index: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p || q)`` where ``p`` is given by its top-k log-probabilities
    ``teacher_logp`` at vocabulary ids ``teacher_index`` (``[..., k]``), ``q = softmax(logits)``, both
    coarsened to those k tokens plus one bucket for the rest."""
    logits = logits.float()
    q_logp = logits.gather(-1, teacher_index) - torch.logsumexp(logits, dim=-1, keepdim=True)  # no full log_softmax
    p = teacher_logp.exp()
    top = (p * (teacher_logp - q_logp)).sum(-1)
    p_rest = (1 - p.sum(-1)).clamp_min(0)
    q_rest = (1 - q_logp.exp().sum(-1)).clamp_min(1e-12)
    rest = torch.where(p_rest > 0, p_rest * (p_rest.clamp_min(1e-12).log() - q_rest.log()), torch.zeros_like(p_rest))
    return (top + rest).mean()
