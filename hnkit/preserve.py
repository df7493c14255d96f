"""Prior preservation for the text task: keep the bare model's next-token distributions on neutral text.

While a style trains, each step also runs the attached model on a few neutral blocks (``--preserve-data``,
or text the bare model wrote itself: :mod:`hnkit.self_text`) and adds
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

import math

import torch
import torch.nn.functional as F

from .errors import HnkitError

TOP_K = 64
PROGRESS_LINES = 10  # progress lines while the teacher is computed, at most
WEIGHT = 0.3  # the KL term's default weight: more style than 1 at the same neutral cost (docs/benchmarks.md)


_MASK = -1e30  # fills the top-k logits when summing the rest: finite, so no gradient becomes NaN


def _log_rest(logp: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """log of the probability outside ``index``: a log-sum-exp over the other tokens, never ``1 - sum``
    (which cancels to 0 in fp32 once the top-k hold all but 1e-7 of the mass)."""
    return torch.logsumexp(logp.scatter(-1, index, _MASK), dim=-1)


class Teacher:
    """The bare model's top-``k`` next-token log-probabilities on ``blocks`` ``[n, T]`` and the log of
    the rest of the vocabulary's probability, kept on the CPU."""

    def __init__(self, model, blocks: torch.Tensor, k: int = TOP_K, batch_size: int = 8, say=None):
        """``say(line)``: where progress goes (at most :data:`PROGRESS_LINES` lines), or None."""
        if blocks.dim() != 2 or len(blocks) == 0:
            raise HnkitError("prior preservation needs at least one neutral block")
        self.blocks = blocks
        device = next(model.parameters()).device
        values, indices, rest = [], [], []
        n = len(blocks)
        every = math.ceil(math.ceil(n / batch_size) / PROGRESS_LINES)  # batches between progress lines
        with torch.no_grad():
            for j, i in enumerate(range(0, n, batch_size)):
                logits = model(input_ids=blocks[i:i + batch_size].to(device), use_cache=False).logits
                logp = F.log_softmax(logits.float(), dim=-1)
                top = logp.topk(min(k, logits.shape[-1]), dim=-1)
                values.append(top.values.cpu())
                indices.append(top.indices.cpu())
                rest.append(_log_rest(logp, top.indices).cpu())
                if say and ((j + 1) % every == 0 or i + batch_size >= n):
                    say(f"prior preservation: the bare model's next-token distributions on "
                        f"{min(i + batch_size, n)}/{n} neutral blocks")
        self.values, self.indices, self.rest = torch.cat(values), torch.cat(indices), torch.cat(rest)

    def __len__(self) -> int:
        return len(self.blocks)


def coarse_kl(teacher_logp: torch.Tensor, teacher_index: torch.Tensor, teacher_rest: torch.Tensor,
              logits: torch.Tensor) -> torch.Tensor:
    """Mean over positions of ``KL(p || q)``, ``p`` given by its top-k log-probabilities
    ``teacher_logp`` at vocabulary ids ``teacher_index`` (``[..., k]``) and the log of its remaining
    mass ``teacher_rest`` (``[...]``), ``q = softmax(logits)``; both coarsened to those k tokens plus
    one bucket for the rest."""
    logp = F.log_softmax(logits.float(), dim=-1)
    q_top = logp.gather(-1, teacher_index)
    top = (teacher_logp.exp() * (teacher_logp - q_top)).sum(-1)
    rest = teacher_rest.exp() * (teacher_rest - _log_rest(logp, teacher_index))
    return (top + rest).mean()
