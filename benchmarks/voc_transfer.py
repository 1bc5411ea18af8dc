"""The paper's VOC transfer in miniature: the demo dataset written as a Pascal VOC tree, then fine-tuned
through ``finetune.py --voc-root`` from stage 1 alone (a) and from stage 1 + stage 2 (b), with the same
seed and schedule, and scored as the paper's VOC columns (AP, AP50, AP75 by COCOeval).

It shows the whole VOC path working (XML annotations, set lists, conversion, training, evaluation) on
data a CPU can train; its figures are the demo's, not the paper's VOC07+12 numbers, which need
``--preset voc`` (ResNet-50 at 480-800 px) on the real VOCdevkit.

    python benchmarks/voc_transfer.py                                  # stage 1 and 2 built in --workdir
    python benchmarks/voc_transfer.py --reuse outputs/pretrain_gain    # take its stage1_sup/ and stage2/

The demo's training scenes become VOC2007 ``trainval`` and its validation scenes VOC2007 ``test``
(PNG re-encoded as JPEG, quality 95, as VOC's images are JPEGs); classes are the digits
(``--voc-classes data``). Finished runs are reused.
"""
import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.data.demo import ensure_demo  # noqa: E402
from aligndet.data.voc import coco_to_voc  # noqa: E402
from aligndet.pipeline import Stages  # noqa: E402

RUNS = {"a": "(a) stage 1 (supervised)", "b": "(b) stage 1 + stage 2 (AlignDet)"}


def export_demo(demo_root, voc_root):
    """The demo's train / val scenes as VOC2007 trainval / test under ``voc_root`` (once)."""
    for split, name in (("train", "trainval"), ("val", "test")):
        listing = os.path.join(voc_root, "VOC2007", "ImageSets", "Main", f"{name}.txt")
        if not os.path.isfile(listing):
            count = coco_to_voc(os.path.join(demo_root, "annotations", f"instances_{split}.json"),
                                os.path.join(demo_root, split), voc_root, "2007", name)
            print(f"demo {split}: {count} scenes -> {listing}", flush=True)


def pretrained(stages, workdir, reuse, seed):
    """Checkpoints of stage 1 and stage 1 + 2: from ``reuse`` if given, else trained in ``workdir``."""
    if reuse:
        paths = {"a": os.path.join(reuse, "stage1_sup", "checkpoint.pth"),
                 "b": os.path.join(reuse, "stage2", "checkpoint.pth")}
        missing = [p for p in paths.values() if not os.path.isfile(p)]
        if missing:
            sys.exit(f"voc_transfer: --reuse {reuse} lacks {', '.join(missing)}")
        return paths
    seed_args = ["--seed", str(seed)]
    image, box = os.path.join(workdir, "stage1_sup"), os.path.join(workdir, "stage2")
    stages.run("stage1_sup", "stage 1 (supervised)", ["train_image.py", *seed_args, "--output-dir", image,
                                                      "--resume"], image + ".log")
    stages.run("stage2", "stage 2 (train_box.py)", ["train_box.py", "--init", os.path.join(image, "checkpoint.pth"),
                                                    *seed_args, "--output-dir", box, "--resume"], box + ".log")
    return {"a": os.path.join(image, "checkpoint.pth"), "b": os.path.join(box, "checkpoint.pth")}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="outputs/voc_transfer", help="the VOC tree and every run go here")
    p.add_argument("--reuse", help="a benchmarks/pretrain_gain.py workdir whose stage1_sup/ and stage2/ to take")
    p.add_argument("--demo-root", default="data/demo")
    p.add_argument("--detector", default="faster_rcnn", choices=["faster_rcnn", "retinanet", "fcos"])
    p.add_argument("--epochs", type=int, default=4, help="fine-tuning epochs over the 2,000 scenes")
    p.add_argument("--lr-steps", type=int, nargs="*", default=[3])
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    os.chdir(ROOT)
    ensure_demo(args.demo_root)
    voc_root = os.path.join(args.workdir, "VOCdevkit")
    export_demo(args.demo_root, voc_root)
    stages = Stages(args.workdir)
    inits = pretrained(stages, args.workdir, args.reuse, args.seed)
    results = {}
    for name, init in inits.items():
        out = os.path.join(args.workdir, f"ft_{name}_{args.detector}")
        argv = ["finetune.py", "--detector", args.detector, "--voc-root", voc_root, "--train-sets", "2007-trainval",
                "--val-set", "2007-test", "--voc-classes", "data", "--init", init, "--seed", str(args.seed),
                "--epochs", str(args.epochs), "--lr-steps", *map(str, args.lr_steps), "--eval-every", "1",
                "--output-dir", out, "--resume"]
        seconds = stages.run(os.path.basename(out), f"fine-tune {RUNS[name]}", argv, out + ".log")
        results[name] = json.load(open(os.path.join(out, "metrics.json")))
        print(f"{RUNS[name]}: {seconds / 60:.1f} min", flush=True)

    print(f"\n{args.detector}, demo as VOC2007 (trainval 2,000 -> test 500), {args.epochs} epochs, seed {args.seed}")
    print("| run | " + " | ".join(f"AP @ {m['epoch']}" for m in results["a"]) + " | AP50 | AP75 |")
    print("|---" * (len(results["a"]) + 3) + "|")
    for name, metrics in results.items():
        final = metrics[-1]
        print(f"| {RUNS[name]} | " + " | ".join(f"{m['AP']:.3f}" for m in metrics)
              + f" | {final['AP50']:.3f} | {final['AP75']:.3f} |")
    gains = [f"{(b['AP'] - a['AP']) * 100:+.1f}" for a, b in zip(results["a"], results["b"])]
    gains += [f"{(results['b'][-1][k] - results['a'][-1][k]) * 100:+.1f}" for k in ("AP50", "AP75")]
    print("| gain (b) - (a), points | " + " | ".join(gains) + " |")


if __name__ == "__main__":
    main()
