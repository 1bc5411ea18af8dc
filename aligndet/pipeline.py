"""The whole AlignDet story on the demo dataset, in three scripts (what ``make demo`` runs).

    python -m aligndet.pipeline                  # 20-30 min on 2 CPU cores
    python -m aligndet.pipeline --out outputs/demo --label-fraction 0.1
    python -m aligndet.pipeline --detector fcos --out outputs/demo_fcos   # or retinanet
    python -m aligndet.pipeline --detector detr --out outputs/demo_detr
    python -m aligndet.pipeline --detector mask_rcnn --out outputs/demo_mask   # box and mask AP

Stages, each a plain script run as a subprocess (their own output shows):

1. ``train_image.py``: supervised ResNet-18 on the object-centric digits (stage 1);
2. ``python -m aligndet.data.proposals``: selective search on the training scenes;
   for DETR then ``python -m aligndet.data.proposals cluster``: the proposals'
   pseudo-classes, k-means of stage 1's RoI features (docs/method.md §3.9);
3. ``train_box.py --init stage 1``: box-domain pre-training of the detector (stage 2;
   Mask R-CNN's is Faster R-CNN's, as in the official code, and its mask head starts fresh);
4. ``finetune.py`` with 10 % of the labels from (a) stage 1 alone and
   (b) stage 1 + stage 2, same seed and schedule.

The two fine-tuning runs do not depend on each other and run side by side, each
on half of the cores with its output in ``<out>/finetune_a.log`` and ``finetune_b.log``
(``--no-side-by-side``: one after the other, on every core): two processes on one
core each finish sooner than one after the other on two, since a small model's
steps do not use two cores fully (benchmarks/RESULTS.md, "make demo").

Then prints one table (AP, AP50, minutes per stage) and writes the AP curves
to ``<out>/curves.png``, and a few val scenes with the ground truth and both detectors' boxes to
``<out>/detections.png``. Finished stages are recorded in ``<out>/stages.json``
with their commands and skipped when the command runs again; an interrupted
stage resumes from its last checkpoint. A stage whose command has changed
since (other flags, new defaults) stops the run rather than reuse results
that belong to the old command.
"""
import argparse
import json
import os
import subprocess
import sys
import time

from aligndet.atomic import atomic_write
from aligndet.visualize import CURVE_COLOURS, ap_curves_figure

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Fine-tuning on few labels: 20 epochs over 10 % of the 2,000 scenes is ~500 iterations at batch 8.
FINETUNE = dict(epochs=20, lr_steps=[15], eval_every=5)
# DETR learns slowly: it keeps finetune.py's own demo schedule (aligndet/presets.py) instead.
OWN_SCHEDULE = ("detr",)
# The demo cache's pseudo-classes for DETR (the paper clusters COCO into 256; 2,000 scenes need fewer).
DEMO_CACHE, DEMO_CLUSTERS = "data/demo/proposals/train", 32
RUNS = {"a": "(a) stage 1 only", "b": "(b) stage 1 + box-domain (AlignDet)"}
# A detector whose box-domain stage is another's (docs/method.md §3.10).
BOX_STAGE_OF = {"mask_rcnn": "faster_rcnn"}


def finetune_command(detector, init, out, fraction, seed, epochs, lr_steps, eval_every, fold=0):
    """``finetune.py`` argv: ``fraction`` of the labels (``fold``), from ``init`` (None: from scratch), resumable."""
    return ["finetune.py", "--detector", detector, "--label-fraction", str(fraction), "--fold", str(fold),
            "--seed", str(seed), "--epochs", str(epochs), "--lr-steps", *map(str, lr_steps),
            "--eval-every", str(eval_every), "--resume", *(["--init", init] if init else []), "--output-dir", out]


def stage_commands(out, fraction, seed, detector="faster_rcnn"):
    """``[(stage name, description, argv)]`` in order."""
    image, box = os.path.join(out, "image"), os.path.join(out, "box")
    schedule = FINETUNE
    if detector in OWN_SCHEDULE:
        from aligndet.presets import finetune_defaults  # the models (torch) load only for this detector

        schedule = {key: finetune_defaults("demo", detector)[key] for key in FINETUNE}

    def finetune(init, name):
        return finetune_command(detector, init, os.path.join(out, name), fraction, seed, **schedule)

    clusters = [("clusters", "pseudo-classes of the proposals (k-means of stage-1 RoI features)",
                 ["-m", "aligndet.data.proposals", "cluster", "--cache", DEMO_CACHE, "--init",
                  os.path.join(image, "checkpoint.pth"), "--k", str(DEMO_CLUSTERS)])] if detector == "detr" else []
    return [
        ("stage1", "stage 1: train_image.py (supervised, object-centric digits)",
         ["train_image.py", "--output-dir", image, "--seed", str(seed), "--resume"]),
        ("proposals", "selective-search proposals of the training scenes",
         ["-m", "aligndet.data.proposals"]),
        *clusters,
        ("stage2", "stage 2: train_box.py (box-domain pre-training)",
         ["train_box.py", "--detector", BOX_STAGE_OF.get(detector, detector), "--init",
          os.path.join(image, "checkpoint.pth"), "--output-dir", box, "--seed", str(seed), "--resume"]),
        ("finetune_a", f"fine-tune {fraction:.0%} labels from {RUNS['a']}",
         finetune(os.path.join(image, "checkpoint.pth"), "ft_a")),
        ("finetune_b", f"fine-tune {fraction:.0%} labels from {RUNS['b']}",
         finetune(os.path.join(box, "checkpoint.pth"), "ft_b")),
    ]


class Stages:
    """The stages of one run folder: each a script of this repository run as a subprocess,
    recorded in ``<out>/stages.json`` when it finishes and skipped when asked again, so an
    interrupted run continues (each script resumes itself with ``--resume``). Each record
    keeps the command, and a stage asked for again with another command (new defaults, other
    flags) stops the program: its folder holds the results of the old one."""

    def __init__(self, out):
        os.makedirs(out, exist_ok=True)
        self.path = os.path.join(out, "stages.json")
        self.records = self._read()

    def _read(self):
        """{name: {"seconds", "argv"}}; a record of an older version is its seconds alone, without a command."""
        saved = json.load(open(self.path)) if os.path.isfile(self.path) else {}
        return {name: r if isinstance(r, dict) else {"seconds": r} for name, r in saved.items()}

    @property
    def done(self):
        """{name: seconds} of every finished stage."""
        return {name: r["seconds"] for name, r in self.records.items()}

    @property
    def wall_seconds(self):
        """Wall-clock seconds of the finished stages: those run side by side count once, as their longest."""
        groups = {}
        for name, r in self.records.items():
            key = r.get("group") or name
            groups[key] = max(groups.get(key, 0.0), r["seconds"])
        return sum(groups.values())

    def _finished(self, name, description, argv):
        """True (and says so) if ``name`` is done with this command; stops the program if it was done
        with another."""
        if name not in self.records:
            return False
        record = self.records[name]
        if record.get("argv", argv) != argv:
            sys.exit(f"pipeline: {name} in {self.path} was run as\n  {' '.join(record['argv'])}\nnot as\n  "
                     f"{' '.join(argv)}\nso its results belong to another command: use another output folder, "
                     f"or delete the stage's folder and its entry in {self.path}")
        print(f"== {description}: done in an earlier run ({record['seconds'] / 60:.1f} min)", flush=True)
        return True

    def _record(self, name, seconds, argv, group=None):
        # Another runner may share this folder (two ablations at once): merge with what it recorded meanwhile.
        record = {"seconds": seconds, "argv": argv, **({"group": group} if group else {})}
        self.records = {**self._read(), **self.records, name: record}
        atomic_write(self.path, lambda f: f.write(json.dumps(self.records, indent=1).encode()))

    def run_side_by_side(self, stages, threads, log_dir):
        """Runs the unfinished ``[(name, description, argv)]`` at once, each with ``threads`` torch
        threads and its output in ``<log_dir>/<name>.log``; waits for all of them and stops the
        program if one failed (the others' results are recorded). Returns {name: seconds}."""
        stages = [(name, description, [str(a) for a in argv]) for name, description, argv in stages]
        todo = [stage for stage in stages if not self._finished(*stage)]
        if len(todo) < 2:
            return {name: self.run(name, description, argv) for name, description, argv in todo}
        group = "+".join(name for name, _, _ in todo)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
        running = []
        for name, description, argv in todo:
            log_path = os.path.join(log_dir, f"{name}.log")
            print(f"== {description}\n   {os.path.basename(sys.executable)} {' '.join(argv)}\n   side by side, "
                  f"{threads} thread(s); output in {log_path}", flush=True)
            log = open(log_path, "w")
            running.append((name, argv, log_path, log, time.time(),
                            subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdout=log,
                                             stderr=subprocess.STDOUT)))
        failed, seconds = [], {}
        for name, argv, log_path, log, start, process in running:
            code = process.wait()
            log.close()
            if code != 0:
                failed.append(f"{name} failed (exit {code}); see {log_path}")
                continue
            seconds[name] = round(time.time() - start, 1)
            self._record(name, seconds[name], argv, group)
            print(f"== {name} finished in {seconds[name] / 60:.1f} min", flush=True)
        if failed:
            sys.exit(f"pipeline: {'; '.join(failed)}; run the same command again to resume")
        return seconds

    def run(self, name, description, argv, log_path=None):
        """Runs ``python argv`` from the repository root (output to ``log_path`` if given,
        else shown) unless ``name`` is done; stops the program if it fails. Returns its seconds."""
        argv = [str(a) for a in argv]
        if self._finished(name, description, argv):
            return self.records[name]["seconds"]
        print(f"== {description}\n   {os.path.basename(sys.executable)} {' '.join(argv)}", flush=True)
        start = time.time()
        if log_path is None:
            code = subprocess.call([sys.executable, *argv], cwd=ROOT)
        else:
            with open(log_path, "w") as log:
                code = subprocess.call([sys.executable, *argv], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
        if code != 0:
            where = f"; see {log_path}" if log_path else ""
            sys.exit(f"pipeline: {name} failed (exit {code}){where}; run the same command again to resume it")
        seconds = round(time.time() - start, 1)
        self._record(name, seconds, argv)
        return seconds


def cores():
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def run_stages(out, fraction, seed, detector="faster_rcnn", side_by_side=True):
    """Runs every stage not yet recorded as finished, the fine-tuning runs side by side on a
    machine of two cores or more (``side_by_side``); returns ``{stage: seconds}``."""
    stages = Stages(out)
    commands, available = stage_commands(out, fraction, seed, detector), cores()
    together = [c for c in commands if c[0].startswith("finetune_")] if side_by_side and available >= 2 else []
    for stage in commands:
        if stage not in together:
            stages.run(*stage)
    if together:
        stages.run_side_by_side(together, max(1, available // len(together)), out)
    return stages.done


DETECTOR_NAMES = {"faster_rcnn": "Faster R-CNN R18-FPN", "retinanet": "RetinaNet R18-FPN", "fcos": "FCOS R18-FPN",
                  "detr": "DETR R18", "mask_rcnn": "Mask R-CNN R18-FPN"}


def report(out, seconds, fraction, detector="faster_rcnn", total_seconds=None):
    """The table (printed and returned as text) and the curves PNG; ``total_seconds``: the
    wall-clock time of all stages (default: the sum of ``seconds``)."""
    image_metrics = json.load(open(os.path.join(out, "image", "metrics.json")))
    results = {k: json.load(open(os.path.join(out, f"ft_{k}", "metrics.json"))) for k in RUNS}
    minutes = {k: v / 60 for k, v in seconds.items()}
    clusters = minutes.get("clusters", 0.0)  # DETR's pseudo-classes, part of its stage 2
    masks = "mask_AP" in results["a"][-1]  # Mask R-CNN: mask AP next to box AP

    def row(key, pretraining):
        final = results[key][-1]
        mask = f" {final['mask_AP']:.3f} | {final['mask_AP50']:.3f} |" if masks else ""
        return (f"| {RUNS[key]} | {final['AP']:.3f} | {final['AP50']:.3f} |{mask} {pretraining:.1f} | "
                f"{minutes['finetune_' + key]:.1f} |")

    lines = [
        f"AlignDet on the demo dataset: {DETECTOR_NAMES[detector]} fine-tuned on {fraction:.0%} of the labels",
        "",
        f"| fine-tuned from | AP | AP50 |{' mask AP | mask AP50 |' if masks else ''} pre-training min | "
        "fine-tuning min |",
        f"|---|---|---|{'---|---|' if masks else ''}---|---|",
        row("a", minutes["stage1"]),
        row("b", minutes["stage1"] + minutes["proposals"] + clusters + minutes["stage2"]),
        "",
        f"stage 1 val top-1 {image_metrics[-1]['top1']:.3f}; minutes: stage 1 {minutes['stage1']:.1f}, "
        f"proposals {minutes['proposals']:.1f}, {f'clusters {clusters:.1f}, ' if 'clusters' in minutes else ''}"
        f"stage 2 {minutes['stage2']:.1f}, fine-tuning "
        f"{minutes['finetune_a']:.1f} + {minutes['finetune_b']:.1f}"
        f"{' (side by side)' if total_seconds is not None and total_seconds < sum(seconds.values()) else ''}; "
        f"total {(sum(seconds.values()) if total_seconds is None else total_seconds) / 60:.1f}",
    ]
    panels = {f"{fraction:.0%} labels: AP vs fine-tuning epoch":
              {RUNS[k]: [(m["epoch"], m["AP"]) for m in v] for k, v in results.items()}}
    if masks:
        panels[f"{fraction:.0%} labels: mask AP vs fine-tuning epoch"] = {
            RUNS[k]: [(m["epoch"], m["mask_AP"]) for m in v] for k, v in results.items()}
    png = os.path.join(out, "curves.png")
    ap_curves_figure(panels, colours={RUNS["a"]: CURVE_COLOURS[1], RUNS["b"]: CURVE_COLOURS[2]}).save(png)
    lines.append(f"curves: {png}")
    text = "\n".join(lines)
    print("\n" + text)
    atomic_write(os.path.join(out, "results.md"), lambda f: f.write((text + "\n").encode()))
    return text


def detections_picture(out, val_json, val_images, count=4, threshold=0.5):
    """``<out>/detections.png``: the first ``count`` validation scenes, each with its ground truth, then the
    detections (score >= ``threshold``, boxes only) of the (a) and (b) fine-tuned detectors side by side."""
    from aligndet.checkpoint import load_finetuned_detector
    from aligndet.data.images import list_coco_images, read_rgb
    from aligndet.predict import label_texts, predict
    from aligndet.visualize import detections_figure

    with open(val_json) as f:
        coco = json.load(f)
    names = {c["id"]: c["name"] for c in coco["categories"]}
    records = list_coco_images(val_json, val_images)[:count]  # sorted by id
    found = []  # per run: (its detections by image id, its class names)
    for run in ("ft_a", "ft_b"):
        model, class_names, _ = load_finetuned_detector(os.path.join(out, run, "checkpoint.pth"))
        found.append((predict(model, records, score_threshold=threshold, progress=False)[0], class_names))
    rows = []
    for r in records:
        anns = [a for a in coco["annotations"] if a["image_id"] == r.image_id and not a.get("iscrowd", 0)]
        sets = [([[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                 [names[a["category_id"]] for a in anns])]
        sets += [label_texts(outputs[r.image_id], class_names, threshold)[:2] for outputs, class_names in found]
        rows.append((read_rgb(r.path), sets))
    png = os.path.join(out, "detections.png")
    detections_figure(rows, ["ground truth", RUNS["a"], RUNS["b"]]).save(png)
    return png


def main(argv=None):
    p = argparse.ArgumentParser("python -m aligndet.pipeline", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="outputs/demo", help="every stage's output folder goes here")
    p.add_argument("--label-fraction", type=float, default=0.1, help="labelled share of the scenes for fine-tuning")
    p.add_argument("--detector", choices=sorted(DETECTOR_NAMES), default="faster_rcnn")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--side-by-side", action=argparse.BooleanOptionalAction, default=True,
                   help="run the two fine-tuning runs at once, each on half of the cores (default: on)")
    args = p.parse_args(argv)
    args.out = os.path.abspath(args.out)  # the stages run from the repository root
    seconds = run_stages(args.out, args.label_fraction, args.seed, args.detector, args.side_by_side)
    report(args.out, seconds, args.label_fraction, args.detector, total_seconds=Stages(args.out).wall_seconds)
    print("detections:", detections_picture(args.out, "data/demo/annotations/instances_val.json", "data/demo/val"))


if __name__ == "__main__":
    main()
