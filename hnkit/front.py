"""Style gain against neutral cost: the Pareto front of a strength sweep, and the strength to use.

For a sweep of factors on a style's strength with held-out perplexities on the style corpus and
on a neutral one, each factor is a point: its *style gain* ``1 - style / style_bare`` (how much
better the model predicts the style) and its *neutral cost* ``neutral / neutral_bare - 1`` (how
much worse it predicts everything else). The front keeps the points no other point beats on both.
"""

from __future__ import annotations


def points(factors, style, neutral, bare_style: float, bare_neutral: float) -> list[tuple[float, float, float]]:
    """``[(factor, style gain, neutral cost)]`` against the bare model's perplexities."""
    return [(f, 1 - s / bare_style, n / bare_neutral - 1) for f, s, n in zip(factors, style, neutral)]


def pareto_front(pts) -> list[tuple[float, float, float]]:
    """The points that no other point beats (at least the gain at no more cost, better in one),
    sorted by cost."""
    front = [p for p in pts if not any(q[1] >= p[1] and q[2] <= p[2] and (q[1] > p[1] or q[2] < p[2]) for q in pts)]
    return sorted(front, key=lambda p: (p[2], p[1]))


def recommend(pts, max_cost: float = 0.03) -> tuple[float, float, float]:
    """The point with the largest style gain whose neutral cost is at most ``max_cost`` (the
    smallest factor among equals); factor 0 if none (the bare model costs nothing)."""
    allowed = [p for p in pts if p[2] <= max_cost] or [(0.0, 0.0, 0.0)]
    return max(allowed, key=lambda p: (p[1], -abs(p[0])))
