"""What box-domain pre-training adds: fine-tuning from (a) stage 1 alone vs (b) stage 1 + stage 2.

On the demo dataset, with the same seeds and the same fine-tuning schedule for both:

1. stage 1: a short supervised classification of the demo's object-centric set
   (64x64 one-digit images, ResNet-18), written here until train_image.py lands;
2. stage 2: ``train_box.py --init stage1`` on the training scenes without labels;
3. ``finetune.py`` from (a) the stage-1 backbone and (b) the stage-2 detector, at
   label fractions 1 %, 10 % and 100 % (2 folds at the low fractions); the
   low fractions train for a fixed number of iterations (as the paper does),
   with more epochs over their few images.

Prints an AP / AP50 table and writes a PNG of AP against fine-tuning epoch.

    python benchmarks/pretrain_gain.py                       # everything (about an hour on 2 CPU cores)
    python benchmarks/pretrain_gain.py --fractions 0.1       # one fraction
"""
import argparse
import json
import os
import subprocess
import sys
import time

import torch
import torch.nn.functional as F
import torchvision
from PIL import Image, ImageDraw
from torchvision.transforms import v2 as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.checkpoint import save_checkpoint  # noqa: E402
from aligndet.data.demo import ensure_demo  # noqa: E402

# Fine-tuning schedule per label fraction: (epochs, lr step epochs, evaluate every N epochs, folds).
# 100 % of the 2,000 scenes is 250 iterations per epoch at batch 8; the low fractions run ~500 iterations.
SCHEDULES = {1.0: (4, [3], 1, [0]), 0.1: (20, [15], 5, [0, 1]), 0.01: (160, [120], 40, [0, 1])}


def train_stage1(demo_root, out, epochs=8, batch_size=32, lr=2e-3, seed=0):
    """Supervised ResNet-18 on objects/train (AdamW, one-cycle schedule: from scratch it
    reaches ~0.86 val top-1 in 6 epochs, where SGD stays near chance that long).
    Returns val top-1; saves {"backbone": the ResNet's state dict without fc}."""
    torch.manual_seed(seed)
    to_input = T.Compose([T.ToImage(), T.ToDtype(torch.float32, scale=True),
                          T.Normalize([0.485, 0.456, 0.406], [0.229, 0.224, 0.225])])
    train = torchvision.datasets.ImageFolder(os.path.join(demo_root, "objects", "train"), to_input)
    val = torchvision.datasets.ImageFolder(os.path.join(demo_root, "objects", "val"), to_input)
    loader = torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, num_workers=1, drop_last=True)
    model = torchvision.models.resnet18(num_classes=len(train.classes))
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, lr, total_steps=epochs * len(loader), pct_start=0.15)
    for epoch in range(epochs):
        model.train()
        for images, labels in loader:
            loss = F.cross_entropy(model(images), labels)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            scheduler.step()
        print(f"stage 1 epoch {epoch}: loss {loss.item():.3f}", flush=True)
    model.eval()
    correct = 0
    with torch.no_grad():
        for images, labels in torch.utils.data.DataLoader(val, batch_size=256):
            correct += int((model(images).argmax(1) == labels).sum())
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("fc.")}
    save_checkpoint({"backbone": state, "stage": "image", "top1": correct / len(val)}, out)
    return correct / len(val)


def run(cmd, log_path):
    """Run a script of this repository, its output to a log file; stop on failure."""
    start = time.time()
    with open(log_path, "w") as log:
        code = subprocess.call([sys.executable, *cmd], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    if code != 0:
        sys.exit(f"failed ({code}): {' '.join(cmd)}; see {log_path}")
    return time.time() - start


def finetune(init, out, fraction, fold, seed, workdir):
    epochs, steps, every, _ = SCHEDULES[fraction]
    metrics_file = os.path.join(out, "metrics.json")
    if not os.path.isfile(metrics_file) or json.load(open(metrics_file))[-1]["epoch"] != epochs:
        cmd = ["finetune.py", "--init", init, "--label-fraction", str(fraction), "--fold", str(fold),
               "--epochs", str(epochs), "--lr-steps", *map(str, steps), "--eval-every", str(every),
               "--seed", str(seed), "--output-dir", out]
        run(cmd, out + ".log")
    return json.load(open(metrics_file))


def plot(curves, path, width=900, height=520):
    """AP vs fine-tuning epoch, one panel per fraction; (a) dashed grey-blue, (b) solid orange."""
    fractions = sorted({f for f, _ in curves})
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    panel_w = width // len(fractions)
    top_ap = max(max(ap for _, ap in c) for c in curves.values()) * 1.1 or 1.0
    colours = {"a": (70, 110, 170), "b": (230, 120, 20)}
    for p, fraction in enumerate(fractions):
        x0, y0, x1, y1 = p * panel_w + 50, 40, (p + 1) * panel_w - 15, height - 50
        draw.rectangle([x0, y0, x1, y1], outline="black")
        max_epoch = max(e for (f, _), c in curves.items() if f == fraction for e, _ in c)
        draw.text((x0, 15), f"{fraction:.0%} labels: AP vs fine-tuning epoch", fill="black")
        for tick in range(5):
            value = top_ap * tick / 4
            y = y1 - (y1 - y0) * tick / 4
            draw.line([x0 - 4, y, x0, y], fill="black")
            draw.text((x0 - 45, y - 6), f"{value:.3f}", fill="black")
        draw.text((x1 - 60, y1 + 5), f"epoch {max_epoch}", fill="black")
        for (f, run_name), curve in curves.items():
            if f != fraction:
                continue
            points = [(x0 + (x1 - x0) * e / max_epoch, y1 - (y1 - y0) * ap / top_ap) for e, ap in [(0, 0.0)] + curve]
            draw.line(points, fill=colours[run_name[0]], width=3)
            for x, y in points[1:]:
                draw.ellipse([x - 3, y - 3, x + 3, y + 3], fill=colours[run_name[0]])
    draw.text((60, height - 20), "(a) stage 1 only", fill=colours["a"])
    draw.text((220, height - 20), "(b) stage 1 + box-domain pre-training (AlignDet)", fill=colours["b"])
    image.save(path)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="outputs/pretrain_gain", help="all runs go here; finished runs are reused")
    p.add_argument("--fractions", type=float, nargs="+", default=sorted(SCHEDULES, reverse=True))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--box-args", nargs=argparse.REMAINDER, default=[], help="extra train_box.py arguments")
    args = p.parse_args()
    os.makedirs(args.workdir, exist_ok=True)
    os.chdir(ROOT)
    ensure_demo("data/demo")
    stage1 = os.path.join(args.workdir, "stage1.pth")
    if not os.path.isfile(stage1):
        start = time.time()
        top1 = train_stage1("data/demo", stage1, seed=args.seed)
        print(f"stage 1: val top-1 {top1:.3f} in {time.time() - start:.0f} s", flush=True)
    stage2_dir = os.path.join(args.workdir, "stage2")
    stage2 = os.path.join(stage2_dir, "checkpoint.pth")
    if not os.path.isfile(stage2):
        seconds = run(["train_box.py", "--init", stage1, "--output-dir", stage2_dir, "--seed", str(args.seed),
                       *args.box_args], stage2_dir + ".log")
        print(f"stage 2 (train_box.py) in {seconds / 60:.1f} min", flush=True)

    rows, curves = [], {}
    for fraction in args.fractions:
        for fold in SCHEDULES[fraction][3]:
            results = {}
            for name, init in (("a", stage1), ("b", stage2)):
                out = os.path.join(args.workdir, f"ft_{name}_{fraction:g}_fold{fold}")
                metrics = finetune(init, out, fraction, fold, args.seed, args.workdir)
                results[name] = metrics
                curves[(fraction, f"{name}{fold}")] = [(m["epoch"], m["AP"]) for m in metrics]
                print(f"fraction {fraction:g} fold {fold} ({name}): AP {metrics[-1]['AP']:.4f}", flush=True)
            rows.append((fraction, fold, results["a"], results["b"]))

    print("\n| labels | fold | (a) stage 1: AP | AP50 | (b) + stage 2: AP | AP50 | gain AP | epochs for (b) to reach (a)'s final AP |")
    print("|---|---|---|---|---|---|---|---|")
    for fraction, fold, a, b in rows:
        final_a = a[-1]["AP"]
        reach = next((m["epoch"] for m in b if m["AP"] >= final_a), None)
        print(f"| {fraction:.0%} | {fold} | {final_a:.4f} | {a[-1]['AP50']:.4f} | {b[-1]['AP']:.4f} | "
              f"{b[-1]['AP50']:.4f} | {b[-1]['AP'] - final_a:+.4f} | "
              f"{reach if reach is not None else 'not reached'} of {a[-1]['epoch']} |")
    png = os.path.join(args.workdir, "ap_curves.png")
    plot(curves, png)
    print(f"\ncurves: {png}")


if __name__ == "__main__":
    main()
