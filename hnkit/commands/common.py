"""What several commands share: reading styles and strength factors, checking styles fit a model,
telling whether two corpora are the same text."""

from __future__ import annotations

from pathlib import Path

from ..errors import HnkitError


def parse_factors(text: str, option: str = "--strengths") -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``: comma-separated finite factors on the styles' strengths."""
    from ..util import parse_strength

    expected = "comma-separated numbers such as 0,0.5,1"
    items = [item.strip() for item in text.split(",")]
    if "" in items:
        raise HnkitError(f"{option} {text!r}: expected {expected}")
    return [parse_strength(item, f"{option} {text!r}", expected) for item in items]


def parse_styles(specs: list[str], factors: list[float] | None = None, *, option: str = "--hypernetwork",
                 factor_option: str = "--strengths", bounded: bool = True) -> list[tuple[Path, float]]:
    """``[(path, strength)]`` from ``FILE[:STRENGTH]`` arguments (:func:`hnkit.util.parse_style_arg`),
    nothing read yet. With ``bounded``, each strength applied (times each of ``factors``) must be
    within ``hnkit serve``'s bound, MAX_STRENGTH; errors name ``option`` and ``factor_option``."""
    from ..steer import check_strength
    from ..util import parse_style_arg

    parsed = [parse_style_arg(spec) for spec in specs]
    for spec, (_, strength) in zip(specs, parsed):
        if bounded:
            check_strength(strength, f"{option} {spec}")
            for f in factors or []:
                check_strength(strength * f, f"{option} {spec} with {factor_option} factor {f:g}")
    return [(Path(path), strength) for path, strength in parsed]


def load_styles(specs: list[str], factors: list[float] | None = None, **options):
    """``[(Hypernetwork, strength)]`` from ``FILE[:STRENGTH]`` arguments, the one way every command
    reads its styles: all of them checked by :func:`parse_styles` (``options`` are its keywords)
    before any file is read, then each read safely with :func:`hnkit.checkpoint.load`."""
    from ..checkpoint import load

    return [(load(path), strength) for path, strength in parse_styles(specs, factors, **options)]


def check_styles_fit(model, styles, fuse: bool = False) -> None:
    """Refuse, before any generation, styles whose widths fit no attention layer of ``model``."""
    from ..attach import check_fits
    from ..fuse import require_linear
    from ..targets import find_sites

    family, sites = find_sites(model)
    for hn, _ in styles:
        check_fits(hn, sites, family)
        if fuse:
            require_linear(hn, "fused")


def same_corpus(a: Path, b: Path) -> bool:
    """Whether two corpora (files or folders) are the same text: one path, or the same bytes."""
    import filecmp

    if a.resolve() == b.resolve():
        return True
    sizes_a, sizes_b = _file_sizes(a), _file_sizes(b)
    return sizes_a == sizes_b and all(filecmp.cmp(a / rel, b / rel, shallow=False) for rel in sizes_a)


def _file_sizes(path: Path) -> dict:
    if path.is_dir():
        return {p.relative_to(path): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}
    return {Path(): path.stat().st_size}
