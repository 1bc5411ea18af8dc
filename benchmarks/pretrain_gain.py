"""What each pre-training stage adds, on the demo dataset, with the same seeds and
fine-tuning schedule for every run:

  (c) no pre-training: the whole detector randomly initialised;
  (a) stage 1: supervised ResNet-18 on the object-centric digits (``train_image.py``);
  (d) stage 1 by MoCo v2 on the same images without labels (``train_image.py --method mocov2``);
  (b) stage 1 + stage 2: (a)'s backbone, then ``train_box.py`` (AlignDet) on the training
      scenes without labels;
  (e) stage 1 by MoCo v2 + stage 2: (d)'s backbone, then ``train_box.py`` (the paper's
      self-supervised rows: no label is used before fine-tuning).

Each is fine-tuned with ``finetune.py`` at label fractions 1 %, 10 % and 100 %
(2 folds at the low fractions); the low fractions train for a fixed number of
iterations (as the paper does), with more epochs over their few images.
Expected order at 10 % labels: (c) < (a) < (b). Prints an AP / AP50 table and
writes a PNG of AP against fine-tuning epoch.

    python benchmarks/pretrain_gain.py --fractions 0.1           # the 10 % comparison (about 90 min on 2 cores)
    python benchmarks/pretrain_gain.py                           # every fraction (a few hours)
    python benchmarks/pretrain_gain.py --runs a b --fractions 0.1  # a subset of the runs
    python benchmarks/pretrain_gain.py --detector fcos --runs a b --fractions 0.1  # RetinaNet / FCOS
    python benchmarks/pretrain_gain.py --detector mask_rcnn --runs a b --fractions 0.1  # box and mask AP

Ablations: ``--tag NAME`` names a variant; its stage 2 and fine-tuning runs get
their own folders in the same workdir, next to the shared stage 1 and the
untagged (a) runs. ``--box-args`` changes stage 2 (then (a) is reused);
``--finetune-args`` changes fine-tuning of every run (then (a) is re-run under
the tag too); ``--transfer-args`` changes how (b) takes stage 2's weights
(``--init-skip``, ``--keep-heads``; (a) is reused). Each run appends a line to ``ablation.jsonl`` in the workdir:
tag, detector, per-fold AP of (a) and (b), gain, stage 2's final contrastive
top-1 and matched instances, and minutes.

    python benchmarks/pretrain_gain.py --detector retinanet --runs a b --fractions 0.1 \
        --tag samples256 --box-args="--num-samples 256"
    python benchmarks/pretrain_gain.py --detector retinanet --runs a b --fractions 0.1 \
        --tag recipe --finetune-args="--lr 0.03 --weight-decay 5e-5"
"""
import argparse
import json
import os
import shlex
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.pipeline import BOX_STAGE_OF, Stages, finetune_command  # noqa: E402
from aligndet.visualize import CURVE_COLOURS, ap_curves_figure  # noqa: E402

# Fine-tuning schedule per label fraction: (epochs, lr step epochs, evaluate every N epochs, folds).
# 100 % of the 2,000 scenes is 250 iterations per epoch at batch 8; every fraction runs ~1,000 iterations. At 10 %
# the stage-1 baseline has plateaued by epoch 40 (it had not at the 20 epochs of `make demo`, benchmarks/RESULTS.md).
SCHEDULES = {1.0: (4, [3], 1, [0]), 0.1: (40, [30], 5, [0, 1]), 0.01: (320, [240], 40, [0, 1])}
RUNS = {"c": "(c) no pre-training", "a": "(a) stage 1 (supervised)", "d": "(d) stage 1 (MoCo v2)",
        "b": "(b) stage 1 + stage 2 (AlignDet)", "e": "(e) MoCo v2 + stage 2 (AlignDet)"}


def finetune(stages, init, out, fraction, fold, seed, detector, extra=()):
    epochs, steps, every, _ = SCHEDULES[fraction]
    stages.run(os.path.basename(out), f"fine-tune {out}", finetune_command(detector, init, out, fraction, seed, epochs,
                                                                           steps, every, fold) + list(extra),
               out + ".log")
    return json.load(open(os.path.join(out, "metrics.json")))


def stage(stages, name, cmd, out, log_path):
    """Run a pre-training script once (resuming an interrupted run); a finished one is reused."""
    seconds = stages.run(os.path.basename(out), name, cmd + ["--output-dir", out, "--resume"], log_path)
    print(f"{name} in {seconds / 60:.1f} min", flush=True)
    return os.path.join(out, "checkpoint.pth")


def print_table(rows, runs, fractions):
    """AP / AP50 per fraction and fold, the mean over folds, and when (b) reaches (a)'s final AP."""
    print("\n| labels | fold | " + " | ".join(f"{RUNS[r]} AP / AP50" for r in runs) + " |")
    print("|---|---|" + "---|" * len(runs))
    for fraction, fold, results in rows:
        print(f"| {fraction:.0%} | {fold} | " + " | ".join(
            f"{results[r][-1]['AP']:.4f} / {results[r][-1]['AP50']:.4f}" for r in runs) + " |")
    for fraction in fractions:
        chosen = [results for f, _, results in rows if f == fraction]
        means = {r: sum(res[r][-1]["AP"] for res in chosen) / len(chosen) for r in runs}
        print(f"| {fraction:.0%} | mean | " + " | ".join(f"{means[r]:.4f}" for r in runs) + " |")
    if "a" in runs and "b" in runs:
        for fraction, fold, results in rows:
            final_a = results["a"][-1]["AP"]
            reach = next((m["epoch"] for m in results["b"] if m["AP"] >= final_a), None)
            print(f"{fraction:.0%} fold {fold}: (b) reaches (a)'s final AP at epoch "
                  f"{reach if reach is not None else '(not reached)'} of {results['a'][-1]['epoch']}")


def mean_gain(folds):
    """Mean AP gain (b) - (a) over ``folds`` = {fold: {"a": AP, "b": AP}}."""
    return sum(v["b"] - v["a"] for v in folds.values()) / len(folds)


def record_ablation(workdir, args, rows, stage2_dir):
    """One line of ablation.jsonl: the variant, its gains per fold and stage 2's last epoch."""
    log = os.path.join(stage2_dir, "log.jsonl")
    epochs = [json.loads(line) for line in open(log) if '"epoch_time"' in line] if os.path.exists(log) else []
    last = epochs[-1] if epochs else {}
    for fraction in args.fractions:
        folds = {fold: {"a": res["a"][-1]["AP"], "b": res["b"][-1]["AP"]} for f, fold, res in rows if f == fraction}
        record = {"tag": args.tag or "default", "detector": args.detector, "fraction": fraction,
                  "box_args": args.box_args, "finetune_args": args.finetune_args,
                  "transfer_args": args.transfer_args,
                  "folds": folds, "gain": mean_gain(folds),
                  "contrastive_top1": last.get("train_contrastive_accuracy"),
                  "matched_instances": last.get("train_matched_instances"),
                  "stage2_minutes": sum(e["epoch_time"] for e in epochs) / 60, "date": time.strftime("%Y-%m-%d")}
        with open(os.path.join(workdir, "ablation.jsonl"), "a") as f:
            f.write(json.dumps(record) + "\n")
        print(f"ablation {record['tag']} ({args.detector}, {fraction:.0%}): gain {record['gain'] * 100:+.1f} AP, "
              f"contrastive top-1 {record['contrastive_top1']}, stage 2 {record['stage2_minutes']:.1f} min", flush=True)


def print_ablation(workdir):
    """The ablation table: one row per (tag, detector, fraction) of ablation.jsonl, with every fold it was run on
    (a fold run twice counts its last run)."""
    path = os.path.join(workdir, "ablation.jsonl")
    if not os.path.exists(path):
        sys.exit(f"pretrain_gain.py: no {path} yet: run a variant with --runs a b first")
    records = {}
    for line in open(path):
        r = json.loads(line)
        key = (r["tag"], r["detector"], r["fraction"])
        if key in records:  # the same variant on other folds (e.g. the held-out fold 2): one row, every fold
            r["folds"] = {**records[key]["folds"], **r["folds"]}
            r["gain"] = mean_gain(r["folds"])
        records[key] = r
    print("| candidate | detector | labels | AP (a) → (b) per fold | gain | contrastive top-1 | matched instances "
          "| stage 2 min |")
    print("|---|---|---|---|---|---|---|---|")
    for (tag, detector, fraction), r in sorted(records.items(), key=lambda kv: (kv[0][1], kv[0][0] != "default")):
        folds = ", ".join(f"{v['a']:.3f} → {v['b']:.3f}" for _, v in sorted(r["folds"].items()))
        top1 = "" if r["contrastive_top1"] is None else f"{r['contrastive_top1']:.3f}"
        matched = "" if r["matched_instances"] is None else f"{r['matched_instances']:.0f}"
        args = " ".join(r["box_args"] + r["finetune_args"] + r.get("transfer_args", []))
        print(f"| {tag}{f' (`{args}`)' if args else ''} | {detector} | {fraction:.0%} | {folds} | "
              f"{r['gain'] * 100:+.1f} | {top1} | {matched} | {r['stage2_minutes']:.1f} |")


def epoch_losses(log_path):
    """{epoch: mean of each logged ``loss_*`` term over its logged steps} of a finetune.py log.jsonl."""
    steps = {}
    for r in map(json.loads, open(log_path)):
        if "iter" in r:
            steps.setdefault(r["epoch"], []).append(r)
    means = {}
    for epoch, rs in steps.items():
        terms = sorted({k for r in rs for k in r if k.startswith("loss_")})
        means[epoch] = {k: sum(r[k] for r in rs) / len(rs) for k in terms}
    return means


LOSS_TERMS = ("loss_classifier", "loss_box_reg", "loss_centerness")


def _losses_cell(losses):
    return " / ".join(f"{losses[n]:.3f}" if n in losses else "–" for n in LOSS_TERMS)


def print_losses(workdir):
    """Fine-tuning losses of every run in the workdir, first and last epoch: which part of the
    detector a pre-training helps (box regression) or slows (classification)."""
    runs = sorted(d for d in os.listdir(workdir) if d.startswith("ft_")
                  and os.path.isfile(os.path.join(workdir, d, "log.jsonl")))
    if not runs:
        sys.exit(f"pretrain_gain.py: no fine-tuning runs in {workdir}")
    print("| run | epochs | first epoch: cls / box / ctr | last epoch: cls / box / ctr | last AP |")
    print("|---|---|---|---|---|")
    for run in runs:
        per_epoch = epoch_losses(os.path.join(workdir, run, "log.jsonl"))
        if not per_epoch:  # started, no step logged yet
            continue
        metrics = os.path.join(workdir, run, "metrics.json")
        ap = ""
        if os.path.isfile(metrics):
            last_eval = json.load(open(metrics))[-1]
            ap = f"{last_eval['AP']:.4f} (epoch {last_eval['epoch']})"
        print(f"| {run} | {max(per_epoch) + 1} | {_losses_cell(per_epoch[min(per_epoch)])} | "
              f"{_losses_cell(per_epoch[max(per_epoch)])} | {ap} |")


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--workdir", default="outputs/pretrain_gain", help="all runs go here; finished runs are reused")
    p.add_argument("--fractions", type=float, nargs="+", default=sorted(SCHEDULES, reverse=True))
    p.add_argument("--runs", nargs="+", choices=sorted(RUNS), default=list(RUNS), help="which initialisations")
    p.add_argument("--detector", choices=["faster_rcnn", "mask_rcnn", "retinanet", "fcos"], default="faster_rcnn",
                   help="stage 2 and fine-tuning of this detector; stage 1 is shared by all in one --workdir "
                   "(mask_rcnn: fine-tuning only, from faster_rcnn's stage 2, which it shares)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--backbone", help="another trunk for every stage (train_image.py --arch, then --backbone), e.g. "
                   "mobilenet_v2; give it its own --workdir")
    p.add_argument("--box-args", type=shlex.split, default=[],
                   help='extra train_box.py arguments, one quoted string: --box-args="--num-samples 2048"')
    p.add_argument("--image-args", type=shlex.split, default=[],
                   help="more train_image.py flags for the supervised stage 1, e.g. --image-args='--epochs 32'")
    p.add_argument("--moco-args", type=shlex.split, default=[],
                   help="extra train_image.py arguments for the MoCo v2 stage 1 of (d) and (e), one quoted string "
                   "(with --tag: its own stage 1 and runs)")
    p.add_argument("--finetune-args", type=shlex.split, default=[],
                   help="extra finetune.py arguments for every run, one quoted string")
    p.add_argument("--transfer-args", type=shlex.split, default=[],
                   help="extra finetune.py arguments for the (b) runs only, on how stage 2's weights transfer: "
                   '--transfer-args="--init-skip head.classification_head." ((a) has no stage-2 weights)')
    p.add_argument("--folds", type=int, nargs="+", default=None,
                   help="label folds to fine-tune on (default: the schedule's, folds 0 and 1 at the low fractions)")
    p.add_argument("--tag", default="", help="name of this variant: its runs get their own folders")
    p.add_argument("--summary", action="store_true", help="print the table of ablation.jsonl and stop")
    p.add_argument("--losses", action="store_true",
                   help="print every fine-tuning run's first- and last-epoch losses in --workdir and stop")
    args = p.parse_args()
    if args.summary or args.losses:
        (print_ablation if args.summary else print_losses)(args.workdir)
        return
    os.makedirs(args.workdir, exist_ok=True)
    os.chdir(ROOT)
    w, seed = args.workdir, ["--seed", str(args.seed)]
    trunk = ["--backbone", args.backbone] if args.backbone else []
    arch = ["--arch", args.backbone] if args.backbone else []
    args.finetune_args = trunk + args.finetune_args
    stages = Stages(w)
    suffix = "" if args.detector == "faster_rcnn" else "_" + args.detector  # one workdir holds every detector
    box_detector = BOX_STAGE_OF.get(args.detector, args.detector)
    box_suffix = "" if box_detector == "faster_rcnn" else "_" + box_detector
    tag = f"_{args.tag}" if args.tag else ""
    box_tag = tag if args.box_args else ""  # a variant of fine-tuning only reuses the untagged stage 2
    inits = {"c": None}
    if {"a", "b"} & set(args.runs):
        inits["a"] = stage(stages, "stage 1 (supervised)", ["train_image.py", *seed, *arch, *args.image_args],
                           os.path.join(w, "stage1_sup"),
                           os.path.join(w, "stage1_sup.log"))
        top1 = json.load(open(os.path.join(w, "stage1_sup", "metrics.json")))[-1]["top1"]
        print(f"stage 1 (supervised): val top-1 {top1:.3f}", flush=True)
    moco_tag = tag if args.moco_args else ""
    if {"d", "e"} & set(args.runs):
        moco = os.path.join(w, f"stage1_moco{moco_tag}")
        inits["d"] = stage(stages, "stage 1 (MoCo v2)", ["train_image.py", "--method", "mocov2", *seed, *arch,
                                                         *args.moco_args], moco, moco + ".log")
        knn = json.load(open(os.path.join(moco, "metrics.json")))[-1]["knn_top1"]
        print(f"stage 1 (MoCo v2): val k-NN top-1 {knn:.3f}", flush=True)
    if "b" in args.runs:
        inits["b"] = stage(stages, "stage 2 (train_box.py)",
                           ["train_box.py", "--detector", box_detector, "--init", inits["a"], *seed, *trunk,
                            *args.box_args],
                           os.path.join(w, f"stage2{box_suffix}{box_tag}"),
                           os.path.join(w, f"stage2{box_suffix}{box_tag}.log"))
    if "e" in args.runs:
        box_moco = os.path.join(w, f"stage2_moco{box_suffix}{box_tag or moco_tag}")
        inits["e"] = stage(stages, "stage 2 on MoCo v2 (train_box.py)",
                           ["train_box.py", "--detector", box_detector, "--init", inits["d"], *seed, *trunk,
                            *args.box_args],
                           box_moco, box_moco + ".log")

    runs = [r for r in RUNS if r in args.runs]
    rows, panels = [], {}
    for fraction in args.fractions:
        folds = args.folds if args.folds is not None and fraction < 1 else SCHEDULES[fraction][3]
        for fold in folds:
            results = {}
            for name in runs:
                # A run is shared with the untagged one unless the tag changes it.
                changed = (args.finetune_args or (name in "be" and (args.box_args or args.transfer_args))
                           or (name in "de" and args.moco_args))
                out = os.path.join(w, f"ft_{name}_{fraction:g}_fold{fold}{suffix}{tag if changed else ''}")
                extra = args.finetune_args + (args.transfer_args if name in "be" else [])
                results[name] = finetune(stages, inits[name], out, fraction, fold, args.seed, args.detector, extra)
                final = results[name][-1]
                masks = f", mask AP {final['mask_AP']:.4f}" if "mask_AP" in final else ""
                print(f"fraction {fraction:g} fold {fold} {RUNS[name]}: AP {final['AP']:.4f}{masks}", flush=True)
                if fold == folds[0]:
                    title = f"{args.detector}, {fraction:.0%} labels, fold {fold}: AP vs fine-tuning epoch"
                    panels.setdefault(title, {})[RUNS[name]] = [(m["epoch"], m["AP"]) for m in results[name]]
            rows.append((fraction, fold, results))

    print_table(rows, runs, args.fractions)
    if "a" in runs and "b" in runs:
        record_ablation(w, args, rows, os.path.join(w, f"stage2{box_suffix}{box_tag}"))
    png = os.path.join(w, f"ap_curves{suffix}.png")
    colours = dict(zip(RUNS.values(), [CURVE_COLOURS[i] for i in (0, 1, 3, 2, 4)]))  # (b) orange, as in make demo
    ap_curves_figure(panels, width=max(900, 450 * len(panels)), colours=colours).save(png)
    print(f"\ncurves: {png}")


if __name__ == "__main__":
    main()
