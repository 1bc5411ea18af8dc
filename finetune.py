"""Fine-tune a detector on COCO-format data and evaluate it with COCO AP.

The third AlignDet stage: the backbone from image-domain pre-training
(train_image.py) and the neck and heads from box-domain pre-training
(train_box.py) are loaded with --init, then the whole detector is trained on
labelled data. Without --init it is ordinary supervised training.

Runbook
  # Demo: builds the embedded demo dataset on first use, ResNet-18, 128 px, CPU, < 10 min
  python finetune.py

  # COCO, one GPU (torchvision's ImageNet ResNet-50, 1x schedule)
  python finetune.py --preset coco --train-images coco/train2017 \
      --train-json coco/annotations/instances_train2017.json --val-images coco/val2017 \
      --val-json coco/annotations/instances_val2017.json --output-dir outputs/frcnn_coco

  # Same on 8 GPUs (--batch-size is per process)
  torchrun --nproc_per_node 8 finetune.py --preset coco ...

  # The paper's recipe after AlignDet pre-training: 8 GPUs x 2 images, 1x schedule, lr x1.5 and
  # weight decay x0.5 for pre-trained models; here 10 % of the labels, fold 0
  torchrun --nproc_per_node 8 finetune.py --preset coco --lr 0.03 --weight-decay 5e-5 \
      --init outputs/box/checkpoint.pth --label-fraction 0.1 --fold 0 ...

  # RetinaNet or FCOS instead of Faster R-CNN: same flags, their own presets (lr 0.01 at 16 images on COCO)
  python finetune.py --detector retinanet
  python finetune.py --detector fcos --preset coco ...

  # Any other backbone: torchvision's names, or a MoCo / SwAV / DINO / DenseCL checkpoint
  python finetune.py --preset coco --init torchvision:ResNet50_Weights.IMAGENET1K_V2 ...
  python finetune.py --preset coco --init moco_v2_800ep_pretrain.pth.tar ...

  # Resume an interrupted run (same --output-dir)
  python finetune.py ... --resume

Learning rate: --lr is given for 16 images per step and scaled linearly to
the real batch (batch size x processes). The paper fine-tunes pre-trained
models with lr x1.5 and weight decay x0.5 (pass them explicitly).

Outputs in --output-dir: checkpoint.pth (latest, resumable),
log.jsonl (one JSON object per logged step / epoch), metrics.json (all 12 COCO
stats for every evaluation).
"""
import argparse
import inspect
import json
import os
import sys
import time

import torch

from aligndet import distributed as dist_utils
from aligndet.checkpoint import CheckpointError, args_to_dict, latest_checkpoint, load_checkpoint, load_pretrained, save_checkpoint
from aligndet.data.coco import CocoDetection, collate_fn
from aligndet.data.demo import DemoDataError, ensure_demo
from aligndet.data.splits import label_fraction_split
from aligndet.data.transforms import eval_transforms, train_transforms
from aligndet.engine import EpochBatches, NonFiniteLossError, add_run_arguments, evaluate, step_lr, train_one_epoch
from aligndet.evaluation import CocoEvaluator
from aligndet.models import DETECTORS, build_detector

# Settings each preset fills in unless given on the command line: the backbone, image sizes and schedule
# here; what is particular to a detector in DETECTOR_PRESETS, which takes precedence.
PRESETS = {
    # Small and fast: the demo dataset on a laptop CPU, ResNet-18 at 128 px, trained from scratch in a few minutes
    # on 2 cores.
    "demo": dict(backbone="resnet18", backbone_weights=None, norm="bn", trainable_layers=5, fpn_channels=32,
                 min_size=[128], max_size=128, epochs=4, batch_size=8, lr=0.04, weight_decay=1e-4,
                 warmup_iters=100, lr_steps=[3], eval_every=2),
    # The standard COCO 1x recipe (R50-FPN, 12 epochs, steps at 8 and 11).
    "coco": dict(backbone="resnet50", backbone_weights="imagenet", norm="frozen_bn", trainable_layers=3,
                 fpn_channels=256, min_size=[800], max_size=1333, epochs=12, batch_size=2, lr=0.02,
                 weight_decay=1e-4, warmup_iters=500, lr_steps=[8, 11], eval_every=1),
}
DETECTOR_PRESETS = {
    # The RoI-align backward pass dominates on a CPU, hence 64 sampled RoIs per image in the demo.
    ("faster_rcnn", "demo"): dict(representation_size=256, anchor_sizes=[16, 32, 64, 128, 256],
                                  rpn_pre_nms_top_n_train=600, rpn_post_nms_top_n_train=300,
                                  rpn_pre_nms_top_n_test=300, rpn_post_nms_top_n_test=150,
                                  rpn_batch_size_per_image=128, box_batch_size_per_image=64),
    ("faster_rcnn", "coco"): dict(representation_size=1024, anchor_sizes=[32, 64, 128, 256, 512],
                                  rpn_pre_nms_top_n_train=2000, rpn_post_nms_top_n_train=2000,
                                  rpn_pre_nms_top_n_test=1000, rpn_post_nms_top_n_test=1000,
                                  rpn_batch_size_per_image=256, box_batch_size_per_image=512),
    # Anchors of half the COCO sizes on P3-P7 for 20-56 px digits in 128 px scenes. GroupNorm in the towers: without
    # it a small RetinaNet barely starts learning in 500 iterations (benchmarks/RESULTS.md); 64 FPN channels, as
    # GroupNorm(32) needs more than one value per group on the 1x1 P7 map of a 128 px image.
    ("retinanet", "demo"): dict(anchor_sizes=[16, 32, 64, 128, 256], head_norm="gn", fpn_channels=64, lr=0.02),
    # The one-stage detectors' lr is half Faster R-CNN's, as in torchvision's and the paper's recipes.
    ("retinanet", "coco"): dict(anchor_sizes=[32, 64, 128, 256, 512], head_norm="none", lr=0.01),
    # 64 FPN channels for FCOS's GroupNorm too.
    ("fcos", "demo"): dict(anchor_sizes=[8, 16, 32, 64, 128], fpn_channels=64, lr=0.02),
    ("fcos", "coco"): dict(anchor_sizes=[8, 16, 32, 64, 128], lr=0.01),
}
# Command-line options that are build_detector options; each detector takes those its build function names.
MODEL_OPTIONS = ("backbone_weights", "norm", "trainable_layers", "fpn_channels", "min_size", "max_size",
                 "anchor_sizes", "head_norm", "representation_size", "rpn_pre_nms_top_n_train", "rpn_post_nms_top_n_train",
                 "rpn_pre_nms_top_n_test", "rpn_post_nms_top_n_test", "rpn_batch_size_per_image",
                 "box_batch_size_per_image")


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default and the runbook as written."""


def get_args_parser():
    p = argparse.ArgumentParser("finetune.py", description=__doc__[:__doc__.index("Runbook")].strip(),
                                epilog=__doc__[__doc__.index("Runbook"):], formatter_class=HelpFormatter)
    d = p.add_argument_group("data (default: the embedded demo dataset, built on first use)")
    d.add_argument("--train-json", help="COCO instances json of the training set")
    d.add_argument("--train-images", help="folder the training json's file_names are relative to")
    d.add_argument("--val-json", help="COCO instances json of the validation set")
    d.add_argument("--val-images", help="folder of the validation images")
    d.add_argument("--demo-root", default="data/demo", help="where the demo dataset lives / is built")
    d.add_argument("--label-fraction", type=float, default=1.0,
                   help="fine-tune on this fraction of the training images (0 < f <= 1), see aligndet/data/splits.py")
    d.add_argument("--fold", type=int, default=0, help="which random subset for --label-fraction (seed)")
    d.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")

    m = p.add_argument_group("model (unset values come from --preset)")
    m.add_argument("--preset", choices=sorted(PRESETS), default="demo", help="model, schedule and image-size preset")
    m.add_argument("--detector", choices=sorted(DETECTORS), default="faster_rcnn",
                   help="options marked (faster_rcnn) apply to that detector only")
    m.add_argument("--backbone", help="resnet18 / resnet34 / resnet50 / resnet101")
    m.add_argument("--backbone-weights", help="'imagenet' (torchvision's DEFAULT, downloads once), torchvision:<Enum>.<NAME>, "
                   "a file path, or 'none'")
    m.add_argument("--norm", choices=["frozen_bn", "bn", "sync_bn"], help="backbone normalisation")
    m.add_argument("--trainable-layers", type=int, help="backbone stages trained, 0-5 (from the top)")
    m.add_argument("--fpn-channels", type=int)
    m.add_argument("--head-norm", choices=["none", "gn"], help="norm in the towers (retinanet; fcos always has gn)")
    m.add_argument("--representation-size", type=int, help="width of the box head's two fc layers (faster_rcnn)")
    m.add_argument("--min-size", type=int, nargs="+", help="short side(s); several = multi-scale training")
    m.add_argument("--max-size", type=int, help="long-side cap")
    m.add_argument("--anchor-sizes", type=int, nargs="+", help="one anchor size per pyramid level: P2-P6 for faster_rcnn, P3-P7 for retinanet "
                   "(3 octave scales each) and fcos (the point's size for centre sampling and scale ranges)")
    m.add_argument("--rpn-pre-nms-top-n-train", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-post-nms-top-n-train", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-pre-nms-top-n-test", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-post-nms-top-n-test", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-batch-size-per-image", type=int, help="anchors sampled per image for the RPN loss (faster_rcnn)")
    m.add_argument("--box-batch-size-per-image", type=int, help="RoIs sampled per image for the box-head loss (faster_rcnn)")
    m.add_argument("--init", nargs="+", default=[], metavar="WEIGHTS",
                   help="initialise from these, in order: a box-domain (train_box.py) or any detector checkpoint "
                        "(final output layers re-initialised), or backbone weights: train_image.py's checkpoint, "
                        "torchvision:<Enum>.<NAME> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2), or a "
                        "MoCo / SwAV / DINO / DenseCL checkpoint")
    m.add_argument("--keep-heads", action="store_true", help="with --init, keep the final output layers too")

    o = p.add_argument_group("optimisation (unset values come from --preset)")
    o.add_argument("--epochs", type=int)
    o.add_argument("--batch-size", type=int, help="images per process per step")
    o.add_argument("--lr", type=float, help="SGD learning rate for 16 images per step (scaled to the real batch)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-iters", type=int, help="linear warm-up iterations")
    o.add_argument("--lr-steps", type=int, nargs="*", help="epochs at which lr is multiplied by 0.1")

    r = add_run_arguments(p, "outputs/finetune")
    r.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always after the last)")
    r.add_argument("--eval-only", action="store_true", help="only evaluate (use with --init or --resume)")
    r.add_argument("--max-val-images", type=int, default=None, help="evaluate on the first N val images only")
    return p


def fill_presets(args, presets, detector_presets):
    """Set every option still None in ``args`` from ``detector_presets[(detector, preset)]``,
    then from ``presets[preset]`` (train_box.py passes its own two tables)."""
    for preset in (detector_presets.get((args.detector, args.preset), {}), presets[args.preset]):
        for key, value in preset.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    return args


def apply_preset(args):
    """Fill every unset option from the detector's preset, then from the general one."""
    fill_presets(args, PRESETS, DETECTOR_PRESETS)
    if args.backbone_weights in ("none", "None", ""):
        args.backbone_weights = None
    return args


def resolve_data(args):
    """Fill in the demo dataset's paths when no data is given (rank 0 builds it)."""
    given = [args.train_json, args.train_images, args.val_json, args.val_images]
    if all(given):
        return args
    if any(given):
        sys.exit("finetune.py: give all of --train-json, --train-images, --val-json and --val-images, "
                 "or none of them for the demo dataset")
    if dist_utils.is_main_process():
        ensure_demo(args.demo_root)
    dist_utils.barrier()
    root = args.demo_root
    args.train_json = os.path.join(root, "annotations", "instances_train.json")
    args.val_json = os.path.join(root, "annotations", "instances_val.json")
    args.train_images = os.path.join(root, "train")
    args.val_images = os.path.join(root, "val")
    return args


def model_options(args):
    """The build_detector options set in ``args`` (after ``apply_preset``); an option
    given for a detector that does not have it is an error, not silently ignored."""
    accepted = inspect.signature(DETECTORS[args.detector]).parameters
    opts = {}
    for key in MODEL_OPTIONS:
        value = getattr(args, key, None)
        if key not in accepted:
            if value is not None:
                raise ValueError(f"--{key.replace('_', '-')} does not apply to {args.detector}")
            continue
        if value is not None or key == "backbone_weights":
            opts[key] = tuple(value) if isinstance(value, list) else value
    return opts


def build_datasets(args):
    """Training set (optionally a --label-fraction subset) and validation set."""
    train_set = CocoDetection(args.train_images, args.train_json, train_transforms(), remove_empty=True)
    if args.label_fraction < 1.0:
        ids = label_fraction_split(train_set.ids, args.label_fraction, args.fold)
        train_set = CocoDetection(args.train_images, args.train_json, train_transforms(), image_ids=ids,
                                  remove_empty=True)
    val_set = CocoDetection(args.val_images, args.val_json, eval_transforms())
    if args.max_val_images:
        val_set = CocoDetection(args.val_images, args.val_json, eval_transforms(),
                                image_ids=val_set.ids[: args.max_val_images])
    if train_set.label_to_cat != val_set.label_to_cat:
        sys.exit("finetune.py: the training and validation jsons list different categories")
    if len(train_set) == 0:
        sys.exit(f"finetune.py: no usable training images. {train_set.report()}")
    return train_set, val_set


def main(args):
    info = dist_utils.init_distributed(device=args.device)
    device, rank, world = info["device"], info["rank"], info["world_size"]
    main_proc = dist_utils.is_main_process()
    apply_preset(args)
    resolve_data(args)
    torch.manual_seed(args.seed + rank)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.amp != "none" and device.type != "cuda":
        print(f"--amp {args.amp} needs CUDA; running in float32 on {device}")
        args.amp = "none"

    train_set, val_set = build_datasets(args)
    if main_proc:
        print(train_set.report())
        print(val_set.report())

    options = model_options(args)
    if args.init:  # every --init source carries a backbone: skip the preset's (a download for coco)
        options["backbone_weights"] = None
    model = build_detector(args.detector, train_set.num_classes, backbone=args.backbone, **options)
    for path in args.init:
        load_pretrained(model, path, keep_heads=args.keep_heads, log=print if main_proc else (lambda *a: None),
                        detector=args.detector)
    model.to(device)
    model_without_ddp = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    total_batch = args.batch_size * world
    base_lr = args.lr * total_batch / 16
    params = [p for p in model_without_ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None

    train_batches = EpochBatches(train_set, args.batch_size, args.workers, rank, world, args.seed, shuffle=True,
                                 collate_fn=collate_fn)
    val_batches = EpochBatches(val_set, args.batch_size, args.workers, rank, world, args.seed, shuffle=False,
                               collate_fn=collate_fn)
    iters_per_epoch = len(train_batches) if args.max_iters is None else min(len(train_batches), args.max_iters)

    def lr_at(it):
        return step_lr(it, base_lr, iters_per_epoch, args.warmup_iters, steps=args.lr_steps)

    start_epoch, start_iter, metrics = 0, 0, []
    resume = latest_checkpoint(args.output_dir) if args.resume == "auto" else args.resume
    if args.resume == "auto" and resume is None and main_proc:
        print(f"--resume: no checkpoint in {args.output_dir}; starting fresh")
    if resume:
        ckpt = load_checkpoint(resume)
        model_without_ddp.load_state_dict(ckpt["model"])
        if not args.eval_only:
            optimizer.load_state_dict(ckpt["optimizer"])
            if scaler is not None and "scaler" in ckpt:
                scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_iter = ckpt["epoch"], ckpt.get("iteration", 0)
        metrics = ckpt.get("metrics", [])
        if main_proc:
            print(f"resumed from {resume}: epoch {start_epoch}, iteration {start_iter}")

    def save(epoch, iteration):
        if main_proc:
            save_checkpoint({"model": model_without_ddp.state_dict(), "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else {},
                             "epoch": epoch, "iteration": iteration, "args": args_to_dict(args),
                             "metrics": metrics, "label_to_cat": val_set.label_to_cat,
                             "class_names": val_set.class_names, "stage": "finetune"},
                            os.path.join(args.output_dir, "checkpoint.pth"))

    def run_eval(epoch):
        evaluator = CocoEvaluator(val_set.coco, val_set.label_to_cat)
        stats = evaluate(model_without_ddp, val_batches.loader(), evaluator, device, args.amp,
                         total=len(val_batches), verbose=main_proc)
        metrics.append({"epoch": epoch, "images": len(evaluator.results), **stats})
        if main_proc:
            with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
                json.dump(metrics, f, indent=1)
            print(json.dumps({"epoch": epoch, "images": len(evaluator.results), "AP": round(stats["AP"], 4),
                              "AP50": round(stats["AP50"], 4)}))
        return stats

    if args.eval_only:
        run_eval(start_epoch)
        dist_utils.cleanup()
        return metrics

    log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a") if main_proc else None
    if main_proc:
        print(f"training {args.detector} ({args.backbone}) on {len(train_set)} images, {world} process(es), "
              f"batch {total_batch}, lr {base_lr:g}, {args.epochs} epochs of {iters_per_epoch} iterations")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()

        def on_iteration(it, epoch=epoch):
            if args.checkpoint_every and (it + 1) % args.checkpoint_every == 0 and it + 1 < iters_per_epoch:
                save(epoch, it + 1)

        means = train_one_epoch(model, optimizer, train_batches.loader(epoch, start_iter), device, epoch, lr_at,
                                start_iter=start_iter, iters_per_epoch=iters_per_epoch, amp=args.amp,
                                scaler=scaler, log_file=log_file, print_freq=args.print_freq,
                                on_iteration=on_iteration, max_iters=args.max_iters)
        start_iter = 0
        save(epoch + 1, 0)  # before evaluating, so a crash there loses no training
        if epoch + 1 == args.epochs or (epoch + 1) % args.eval_every == 0:
            run_eval(epoch + 1)
            save(epoch + 1, 0)
        if main_proc:
            log_file.write(json.dumps({"epoch": epoch, "epoch_time": round(time.time() - t0, 1),
                                       **{f"train_{k}": v for k, v in means.items()}}) + "\n")
            log_file.flush()
    if main_proc:
        log_file.close()
        if metrics:
            print(f"final COCO AP on {args.val_json}: {metrics[-1]['AP']:.4f} (AP50 {metrics[-1]['AP50']:.4f})")
    dist_utils.cleanup()
    return metrics


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, CheckpointError, DemoDataError, NonFiniteLossError, ValueError) as e:
        # Bad input (paths, json, checkpoints, demo parts) or a diverged run: say what, not where in torch.
        sys.exit(f"finetune.py: error: {e}")
