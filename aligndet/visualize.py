"""Pictures of what pre-training sees (an image's proposals and its two views) and
of what it gives (AP against fine-tuning epoch, ``ap_curves_figure``).

    # a demo training scene: its proposals, then the two augmented views, where each
    # instance id has the same colour in the original and in both views
    python -m aligndet.visualize proposals --out proposals.png

    # your own images and proposal cache
    python -m aligndet.visualize proposals --images my_images/ --cache my_images_proposals/ \\
        --index 3 --max-proposals 20 --out proposals.png

The PNG has three panels side by side, magnified alike (the original to
``--height`` pixels): the original image with the kept proposals, view 1 and view 2 (official
views: photometric op, random short side, flip; ``--crop`` adds the
random-crop ablation). A proposal that left a view is missing from that panel only.
"""
import argparse
import colorsys
import math
import os
import sys
import zlib

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont
from torchvision.utils import draw_bounding_boxes, draw_segmentation_masks

from aligndet.data.images import list_images, read_rgb
from aligndet.data.proposal_cache import ProposalCache, ProposalCacheError
from aligndet.data.views import COCO_VIEW, DEMO_VIEW, TwoViewDataset, build_view_transform


def id_colours(ids):
    """A distinct, saturated RGB colour per instance id (golden-ratio hue steps)."""
    colours = []
    for i in ids:
        r, g, b = colorsys.hsv_to_rgb((0.618034 * int(i)) % 1.0, 0.9, 1.0)
        colours.append((int(255 * r), int(255 * g), int(255 * b)))
    return colours


def draw_panel(image, boxes, ids, scale=3.0, labels=True):
    """image: float [3, H, W] in [0, 1] or uint8 [H, W, 3]; boxes [N, 4] xyxy pixels;
    returns a PIL image magnified by ``scale`` with the boxes in their id colours."""
    if isinstance(image, np.ndarray):
        image = torch.from_numpy(image).permute(2, 0, 1)
    else:
        image = (image.clamp(0, 1) * 255).round().to(torch.uint8)
    height, width = max(1, round(image.shape[1] * scale)), max(1, round(image.shape[2] * scale))
    pil = Image.fromarray(image.permute(1, 2, 0).numpy()).resize((width, height), Image.NEAREST)
    canvas = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    boxes = torch.as_tensor(boxes, dtype=torch.float32).reshape(-1, 4) * scale
    if len(boxes):
        canvas = draw_bounding_boxes(canvas, boxes, labels=[str(int(i)) for i in ids] if labels else None,
                                     colors=id_colours(ids), width=2)
    return Image.fromarray(canvas.permute(1, 2, 0).numpy())


def detections_figure(rows, columns, scale=3.0, gap=8):
    """A grid of scenes (rows) by box sets (columns), each panel magnified by ``scale``.

    ``rows``: ``[(image uint8 [H, W, 3], [(boxes [N, 4] xyxy, texts [N]) per column])]``; ``columns``: the
    column titles. Boxes take the colour of their text's first word (the class name).
    """
    title_h = 24
    font = _font(13)
    panels = [[draw_labelled(image, boxes, texts, scale) for boxes, texts in sets] for image, sets in rows]
    width = max(sum(p.width for p in row) + gap * (len(row) - 1) for row in panels)
    height = title_h + sum(max(p.height for p in row) for row in panels) + gap * (len(panels) - 1)
    figure = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(figure)
    y = title_h
    for r, row in enumerate(panels):
        x = 0
        for c, panel in enumerate(row):
            if r == 0:
                draw.text((x + panel.width / 2, title_h / 2), columns[c], fill="black", font=font, anchor="mm")
            figure.paste(panel, (x, y))
            x += panel.width + gap
        y += max(p.height for p in row) + gap
    return figure


def draw_labelled(image, boxes, texts, scale=3.0, masks=None):
    """uint8 [H, W, 3] image magnified by ``scale`` with ``boxes`` labelled by ``texts``; ``masks``
    (bool [N, H, W], optional) are laid over it, half transparent, in their box's colour."""
    height, width = max(1, round(image.shape[0] * scale)), max(1, round(image.shape[1] * scale))
    pil = Image.fromarray(image).resize((width, height), Image.NEAREST)
    canvas = torch.from_numpy(np.asarray(pil).copy()).permute(2, 0, 1)
    boxes = torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * scale
    if len(boxes):
        colours = id_colours([zlib.crc32(t.split()[0].encode()) for t in texts])  # one colour per class, anywhere
        if masks is not None and len(masks):
            big = torch.nn.functional.interpolate(torch.as_tensor(masks)[:, None].float(), size=(height, width),
                                                  mode="nearest")[:, 0] > 0.5
            canvas = draw_segmentation_masks(canvas, big, alpha=0.45, colors=colours)
        canvas = draw_bounding_boxes(canvas, boxes, colors=colours, width=2)
    picture = Image.fromarray(canvas.permute(1, 2, 0).numpy())
    draw, font = ImageDraw.Draw(picture), _font(12)
    for (x1, y1, _, _), text, colour in zip(boxes.tolist(), texts, colours if len(boxes) else []):
        box = draw.textbbox((x1 + 1, y1 + 1), text, font=font)
        draw.rectangle(box, fill=colour)
        draw.text((x1 + 1, y1 + 1), text, fill="black", font=font)
    return picture


def proposals_figure(dataset, index, height=384, labels=True, gap=8):
    """Three panels (original with proposals, view 1, view 2) of ``dataset[index]``
    (a ``TwoViewDataset``) side by side, as one PIL image. The original is
    ``height`` pixels tall; the views are magnified alike, so their sizes compare."""
    item = dataset[index]
    if item is None:
        raise ValueError(f"image {dataset.records[index].key} cannot be shown: it is unreadable or has "
                         f"no proposals")
    record, k = dataset.records[index], item["num_proposals"]
    scale = height / item["orig_size"][0]
    panels = [draw_panel(read_rgb(record.path), item["proposals"], range(k), scale, labels)]
    panels += [draw_panel(v["image"], v["boxes"], v["ids"].tolist(), scale, labels) for v in item["views"]]
    figure = Image.new("RGB", (sum(p.width for p in panels) + gap * (len(panels) - 1),
                               max(p.height for p in panels)), "white")
    x = 0
    for panel in panels:
        figure.paste(panel, (x, 0))
        x += panel.width + gap
    return figure


# Colours of the curves, in the order runs are given: grey, blue, orange, green, purple.
CURVE_COLOURS = [(150, 150, 150), (70, 110, 170), (230, 120, 20), (60, 160, 90), (170, 60, 150)]


def _font(size):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: one fixed size
        return ImageFont.load_default()


def _nice_step(span, ticks=6):
    """A 1 / 2 / 5 x 10^k step that cuts ``span`` into about ``ticks`` parts."""
    raw = span / ticks
    power = 10 ** math.floor(math.log10(raw))
    return next(m * power for m in (1, 2, 5, 10) if m * power >= raw)


def ap_curves_figure(panels, width=900, height=520, colours=None):
    """A PIL image of metric-vs-epoch curves, to be read without the numbers beside it.

    ``panels``: ``{title: {run name: [(epoch, value), ...]}}``, one panel per
    title side by side, one coloured line per run (the same run name has the
    same colour in every panel), each point marked and labelled with its value.
    The x axis has a tick at every evaluated epoch; the y axis is named after
    the title's "<metric> vs ..." part (AP otherwise). A legend of the runs sits
    below. ``colours``: ``{run name: (r, g, b)}``; others take ``CURVE_COLOURS`` in turn.
    """
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    title_font, font, small = _font(15), _font(13), _font(11)
    names = list(dict.fromkeys(n for runs in panels.values() for n in runs))
    colour = {n: (colours or {}).get(n, CURVE_COLOURS[i % len(CURVE_COLOURS)]) for i, n in enumerate(names)}
    panel_w = width // max(len(panels), 1)
    legend_h = 20 * len(names) + 10
    for p, (title, runs) in enumerate(panels.items()):
        x0, y0, x1, y1 = p * panel_w + 62, 42, (p + 1) * panel_w - 20, height - 48 - legend_h
        values = [v for curve in runs.values() for _, v in curve]
        step = _nice_step(max(max(values, default=0.0), 1e-6) * 1.15)
        top = step * math.ceil(max(max(values, default=0.0), 1e-6) * 1.15 / step)
        epochs = sorted({e for curve in runs.values() for e, _ in curve})
        last = max(epochs, default=1) or 1
        to_x = lambda e: x0 + (x1 - x0) * e / last  # noqa: E731
        to_y = lambda v: y1 - (y1 - y0) * v / top  # noqa: E731
        draw.text(((x0 + x1) / 2, 12), title, fill="black", font=title_font, anchor="mt")
        for i in range(round(top / step) + 1):  # y grid, ticks and values
            y = to_y(i * step)
            draw.line([x0, y, x1, y], fill=(228, 228, 228))
            draw.text((x0 - 6, y), f"{i * step:.{max(0, -math.floor(math.log10(step)))}f}", fill="black",
                      font=small, anchor="rm")
        shown = epochs if len(epochs) <= 12 else epochs[::math.ceil(len(epochs) / 12)]
        for e in [0] + epochs:  # a tick at every evaluation, labelled unless they crowd
            draw.line([to_x(e), y1, to_x(e), y1 + 4], fill="black")
            if e == 0 or e in shown:
                draw.text((to_x(e), y1 + 6), str(e), fill="black", font=small, anchor="mt")
        draw.rectangle([x0, y0, x1, y1], outline="black")
        draw.text(((x0 + x1) / 2, y1 + 22), "fine-tuning epoch", fill="black", font=font, anchor="mt")
        metric = title.split(":")[-1].split(" vs ")[0].strip() if " vs " in title else "AP"
        draw.text((x0 - 4, y0 - 6), metric, fill="black", font=font, anchor="rb")
        at, labels = {}, []  # epoch -> values of every run there; value labels, drawn last
        for curve in runs.values():
            for e, v in curve:
                at.setdefault(e, []).append(v)
        for r, (name, curve) in enumerate(runs.items()):
            points = [(to_x(e), to_y(v)) for e, v in curve]
            if len(points) > 1:
                draw.line(points, fill=colour[name], width=3)
            for (x, y), (e, v) in zip(points, curve):
                draw.ellipse([x - 3.5, y - 3.5, x + 3.5, y + 3.5], fill=colour[name])
                # a value goes above its point when the run is the highest there, below otherwise, so two close
                # curves keep their labels apart
                above = v > max(at[e]) - 1e-12 and (v > min(at[e]) or r == 0)
                labels.append(((x, y - 6 if above else y + 6), f"{v:.3f}", colour[name], "mb" if above else "mt"))
        for xy, text, fill, anchor in labels:  # after every line, on a white patch, so no line crosses a value
            draw.rectangle(draw.textbbox(xy, text, font=small, anchor=anchor), fill="white")
            draw.text(xy, text, fill=fill, font=small, anchor=anchor)
    for i, name in enumerate(names):
        y = height - legend_h + 20 * i
        draw.line([62, y + 7, 96, y + 7], fill=colour[name], width=3)
        draw.ellipse([75.5, y + 3.5, 82.5, y + 10.5], fill=colour[name])
        draw.text((106, y + 7), name, fill="black", font=font, anchor="lm")
    return image


def get_args_parser():
    p = argparse.ArgumentParser("python -m aligndet.visualize", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    v = sub.add_parser("proposals", help="an image's proposals and its two views",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    v.add_argument("--images", default="data/demo/train", help="image folder (or the folder of --json's files)")
    v.add_argument("--json", help="COCO json listing the images (annotations ignored)")
    v.add_argument("--cache", default="data/demo/proposals/train", help="proposal cache folder")
    v.add_argument("--index", type=int, default=0, help="which image, in the cache's order")
    v.add_argument("--max-proposals", type=int, default=12, help="proposals shown (random subset); 0 = all")
    v.add_argument("--view-preset", choices=["demo", "coco"], help="view sizes (default: demo for the demo data)")
    v.add_argument("--crop", action="store_true", help="add the random-crop ablation to the views")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--height", type=int, default=384, help="height of the original's panel in pixels")
    v.add_argument("--no-labels", action="store_true", help="do not write the ids")
    v.add_argument("--out", default="proposals.png")
    return p


def main(argv=None):
    args = get_args_parser().parse_args(argv)
    demo = args.images == "data/demo/train"
    try:
        if demo and not os.path.isdir(args.cache):
            from aligndet.data.proposals import main as build_proposals
            build_proposals([])  # the demo dataset and its training-set proposals
        cache = ProposalCache(args.cache)
        records = [r for r in list_images(args.images, args.json) if r.key in cache]
        if not records:
            raise ValueError(f"none of the images in {args.images} is in the cache {args.cache}")
        if not 0 <= args.index < len(records):
            raise ValueError(f"--index must be in 0..{len(records) - 1}")
        preset = DEMO_VIEW if (args.view_preset or ("demo" if demo else "coco")) == "demo" else COCO_VIEW
        dataset = TwoViewDataset(records, cache, build_view_transform(**preset, crop=args.crop),
                                 max_proposals=args.max_proposals or None, seed=args.seed)
        figure = proposals_figure(dataset, args.index, args.height, labels=not args.no_labels)
    except (ValueError, FileNotFoundError, ProposalCacheError) as e:
        sys.exit(f"error: {e}")
    figure.save(args.out)
    print(f"wrote {args.out}: {records[args.index].key}, {dataset[args.index]['num_proposals']} proposals, "
          f"original | view 1 | view 2")


if __name__ == "__main__":
    main()
