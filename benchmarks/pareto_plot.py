"""Recall@0.5 against seconds per image, one panel per image set, for ``benchmarks/proposals.py``.

Our settings are grey dots, their Pareto front (no other setting is both faster and at a higher
recall) a blue line with its settings named, SoCo a red diamond, ``--preset coco`` a green ring.
"""
import math

from PIL import Image, ImageDraw, ImageFont

PANEL = (620, 440)
MARGIN = dict(left=50, right=20, top=45, bottom=55)


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def pareto_front(rows):
    """Rows on the front: sorted by time, each with a higher recall@0.5 than every faster one."""
    front, best = [], -1.0
    for r in sorted(rows, key=lambda r: (r["seconds"], -r["r50"])):
        if r["r50"] > best:
            front.append(r)
            best = r["r50"]
    return front


def _panel(name, rows, preset):
    image = Image.new("RGB", PANEL, "white")
    draw = ImageDraw.Draw(image)
    small, text = _font(11), _font(13)
    x0, y0 = MARGIN["left"], MARGIN["top"]
    x1, y1 = PANEL[0] - MARGIN["right"], PANEL[1] - MARGIN["bottom"]
    seconds = [r["seconds"] for r in rows]
    lo, hi = math.floor(math.log10(min(seconds))), math.ceil(math.log10(max(seconds)))
    hi = max(hi, lo + 1)
    r_lo = max(0.0, math.floor(min(r["r50"] for r in rows) * 10 - 1) / 10)

    def xy(r):
        x = x0 + (math.log10(r["seconds"]) - lo) / (hi - lo) * (x1 - x0)
        return x, y1 - (r["r50"] - r_lo) / (1.0 - r_lo) * (y1 - y0)

    draw.rectangle([x0, y0, x1, y1], outline="black")
    for e in range(lo, hi + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo <= math.log10(v) <= hi:
                x = x0 + (math.log10(v) - lo) / (hi - lo) * (x1 - x0)
                draw.line([x, y0, x, y1], fill=(235, 235, 235) if m > 1 else (210, 210, 210))
                draw.text((x, y1 + 6), f"{v:g}", fill="black", font=small, anchor="mt")
    steps = round((1.0 - r_lo) * 10)
    for i in range(steps + 1):
        v = r_lo + i / 10
        y = y1 - (v - r_lo) / (1.0 - r_lo) * (y1 - y0)
        draw.line([x0, y, x1, y], fill=(225, 225, 225))
        draw.text((x0 - 6, y), f"{v:.1f}", fill="black", font=small, anchor="rm")
    draw.text(((x0 + x1) / 2, y1 + 26), "seconds per image, one core (log scale)", fill="black", font=text,
              anchor="mt")
    draw.text((x0, y0 - 6), "recall@0.5", fill="black", font=text, anchor="lb")
    draw.text(((x0 + x1) / 2, 8), name, fill="black", font=text, anchor="mt")

    ours = [r for r in rows if not r["soco"]]
    for r in ours:
        x, y = xy(r)
        draw.ellipse([x - 2.5, y - 2.5, x + 2.5, y + 2.5], fill=(150, 150, 150))
    front = pareto_front(ours)
    draw.line([xy(r) for r in front], fill=(30, 90, 200), width=2)
    for r in front:
        x, y = xy(r)
        draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=(30, 90, 200))
        label = r["setting"] + (f" top {r['top_k']}" if r["top_k"] else "")
        if x > x1 - 110:  # near the right edge: the label goes to the left of the point
            draw.text((x - 6, y + 2), label, fill=(30, 90, 200), font=small, anchor="rt")
        else:
            draw.text((x + 6, y + 2), label, fill=(30, 90, 200), font=small, anchor="lt")
    for r in rows:
        x, y = xy(r)
        if r["soco"]:
            draw.polygon([(x, y - 7), (x + 7, y), (x, y + 7), (x - 7, y)], fill=(210, 40, 40))
            draw.text((x - 9, y), "SoCo", fill=(210, 40, 40), font=text, anchor="rm")
        elif r.get("search") == preset and r["top_k"] == 0:
            draw.ellipse([x - 8, y - 8, x + 8, y + 8], outline=(20, 150, 60), width=2)
            draw.text((x, y - 10), "coco preset", fill=(20, 150, 60), font=small, anchor="mb")
    return image


def pareto_figure(results, presets, path):
    """``results``: set name -> benchmark rows (with recall); ``presets``: set name -> the search
    setting to mark. Writes one PNG with a panel per set."""
    panels = [_panel(name, rows, presets.get(name)) for name, rows in results.items()]
    if not panels:
        return None
    figure = Image.new("RGB", (PANEL[0] * len(panels), PANEL[1]), "white")
    for i, panel in enumerate(panels):
        figure.paste(panel, (i * PANEL[0], 0))
    figure.save(path)
    return path
