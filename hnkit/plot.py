"""A small line chart written with Pillow (already installed with diffusers): loss curves, sweeps."""

from __future__ import annotations

from pathlib import Path

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]


def line_plot(series: dict, path: str | Path, title: str = "", size=(800, 480)) -> Path:
    """``series``: name -> [(x, y), ...]. Writes a PNG with axes, ticks and a legend."""
    from PIL import Image, ImageDraw

    width, height = size
    left, right, top, bottom = 70, 20, 40, 50
    points = [p for pts in series.values() for p in pts]
    img = Image.new("RGB", size, "white")
    draw = ImageDraw.Draw(img)
    draw.text((left, 12), title, fill="black")
    if points:
        x0, x1 = min(p[0] for p in points), max(p[0] for p in points)
        y0, y1 = min(p[1] for p in points), max(p[1] for p in points)
        x1, y1 = (x1 if x1 > x0 else x0 + 1), (y1 if y1 > y0 else y0 + 1e-6)

        def to_px(x, y):
            return (left + (x - x0) / (x1 - x0) * (width - left - right),
                    height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom))

        draw.rectangle([left, top, width - right, height - bottom], outline="black")
        for i in range(5):
            fx, fy = x0 + (x1 - x0) * i / 4, y0 + (y1 - y0) * i / 4
            px, _ = to_px(fx, y0)
            _, py = to_px(x0, fy)
            draw.line([px, height - bottom, px, height - bottom + 5], fill="black")
            draw.text((px - 12, height - bottom + 8), f"{fx:.3g}", fill="black")
            draw.line([left - 5, py, left, py], fill="black")
            draw.text((5, py - 6), f"{fy:.3g}", fill="black")
        for n, (name, pts) in enumerate((k, v) for k, v in series.items() if v):
            color = COLORS[n % len(COLORS)]
            xy = [to_px(x, y) for x, y in sorted(pts)]
            if len(xy) > 1:
                draw.line(xy, fill=color, width=2)
            for x, y in xy:
                draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
            # A drawn line sample: PIL's default bitmap font has no dash glyph (it showed a box).
            lx, ly = width - right - 160, top + 8 + 14 * n
            draw.line([lx, ly + 6, lx + 12, ly + 6], fill=color, width=2)
            draw.text((lx + 16, ly), name, fill=color)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path)
    return path
