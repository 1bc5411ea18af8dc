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
  # On the demo their classification tower is not taken from a train_box.py checkpoint (docs/method.md
  # §7); --box-init-skip with no prefix transfers it too, as the official code does
  python finetune.py --detector fcos --init outputs/box_fcos/checkpoint.pth --box-init-skip

  # DETR (AdamW, backbone lr x0.1, gradients clipped at 0.1); on COCO the official AlignDet schedule, 150 epochs
  python finetune.py --detector detr
  torchrun --nproc_per_node 8 finetune.py --detector detr --preset coco ...
  # ... or evaluate / fine-tune the published DETR weights (the reference release's layout is read as it is)
  python finetune.py --detector detr --preset coco --init detr-r50-e632da11.pth --keep-heads --eval-only ...

  # Any other backbone: torchvision's names, or a MoCo / SwAV / DINO / DenseCL checkpoint
  python finetune.py --preset coco --init torchvision:ResNet50_Weights.IMAGENET1K_V2 ...
  python finetune.py --preset coco --init moco_v2_800ep_pretrain.pth.tar ...

  # Pascal VOC, the paper's transfer (VOC07+12 trainval -> VOC07 test, AP / AP50 / AP75 by COCOeval; difficult
  # objects ignored): the official recipe, multi-scale 480-800 and 12k iterations of 16 images (DETR: 100 epochs)
  torchrun --nproc_per_node 8 finetune.py --preset voc --voc-root VOCdevkit --init outputs/box/checkpoint.pth
  python finetune.py --preset voc --voc-root VOCdevkit --train-sets 2007-trainval --val-set 2007-test ...

  # Resume an interrupted run (same --output-dir)
  python finetune.py ... --resume

Learning rate: --lr is given for 16 images per step and scaled linearly to
the real batch (batch size x processes); so are --iterations and
--lr-step-iterations, inversely (the same images seen). The paper fine-tunes pre-trained
models with lr x1.5 and weight decay x0.5 (pass them explicitly). Every
default shown by --help is the one the chosen --preset and --detector give.

Outputs in --output-dir: checkpoint.pth (latest, resumable),
log.jsonl (one JSON object per logged step / epoch), metrics.json (all 12 COCO
stats for every evaluation).
"""
import argparse
import json
import os
import sys
import time

from aligndet import distributed as dist_utils
from aligndet.atomic import atomic_write
from aligndet.checkpoint import CheckpointError, RunCheckpoint, load_pretrained
from aligndet.cli import (WORKERS_HELP, add_run_arguments, add_step_schedule_arguments, runbook_parser,
                          workers_count)
from aligndet.data.coco import CocoDetection, collate_fn
from aligndet.data.demo import DemoDataError, ensure_demo
from aligndet.data.splits import label_fraction_split
from aligndet.data.voc import VOC_CLASSES, format_report, voc_to_coco
from aligndet.data.transforms import eval_transforms, train_transforms
from aligndet.engine import (EpochBatches, JsonLog, NonFiniteLossError, evaluate, grad_scaler, iteration_epochs,
                             scaled_iterations, start_run, step_schedule_optimizer, train_one_epoch)
from aligndet.evaluation import CocoEvaluator
from aligndet.models import DETECTORS, build_detector
from aligndet.models.backbone import BACKBONES
from aligndet.presets import PRESET_NAMES, finetune_defaults, model_options

def get_args_parser():
    p = runbook_parser("finetune.py", __doc__, preset_keys=("preset", "detector"), presets=finetune_defaults)
    d = p.add_argument_group("data (default: the embedded demo dataset, built on first use)")
    d.add_argument("--train-json", help="COCO instances json of the training set")
    d.add_argument("--train-images", help="folder the training json's file_names are relative to")
    d.add_argument("--val-json", help="COCO instances json of the validation set")
    d.add_argument("--val-images", help="folder of the validation images")
    d.add_argument("--voc-root", help="Pascal VOC instead: the VOCdevkit folder (holding VOC2007, VOC2012, ...), "
                   "converted to COCO json in --output-dir (aligndet/data/voc.py)")
    d.add_argument("--train-sets", nargs="+", default=["2007-trainval", "2012-trainval"], metavar="YEAR-SPLIT",
                   help="with --voc-root: the VOC sets to train on, joined")
    d.add_argument("--val-set", default="2007-test", metavar="YEAR-SPLIT", help="with --voc-root: the VOC set "
                   "to evaluate on")
    d.add_argument("--voc-classes", choices=["standard", "data"], default="standard", help="with --voc-root: "
                   "the 20 VOC classes in their standard order, or the names found in the sets, sorted")
    d.add_argument("--demo-root", default="data/demo", help="where the demo dataset lives / is built")
    d.add_argument("--label-fraction", type=float, default=1.0,
                   help="fine-tune on this fraction of the training images (0 < f <= 1), see aligndet/data/splits.py")
    d.add_argument("--fold", type=int, default=0, help="which random subset for --label-fraction (seed)")
    d.add_argument("--workers", type=workers_count, default="auto", help=WORKERS_HELP)

    m = p.add_argument_group("model (defaults: --preset's for --detector; None = the detector has no such option)")
    m.add_argument("--preset", choices=PRESET_NAMES, default="demo", help="model, schedule and image-size preset")
    m.add_argument("--detector", choices=sorted(DETECTORS), default="faster_rcnn",
                   help="options marked (faster_rcnn) apply to it and to mask_rcnn (which extends it) only")
    m.add_argument("--backbone", choices=BACKBONES, metavar="NAME", help="a torchvision trunk: "
                   + " / ".join(BACKBONES))
    m.add_argument("--backbone-weights", help="'imagenet' (torchvision's DEFAULT, downloads once), "
                   "torchvision:<Enum>.<NAME>, a file path, or 'none'")
    m.add_argument("--norm", choices=["frozen_bn", "bn", "sync_bn"], help="backbone normalisation")
    m.add_argument("--trainable-layers", type=int, help="backbone stages trained, 0-5 (from the top)")
    m.add_argument("--fpn-channels", type=int, help="width of the FPN levels and of the heads")
    m.add_argument("--head-norm", choices=["none", "gn"], help="norm in the towers (retinanet; fcos always has gn)")
    m.add_argument("--representation-size", type=int, help="width of the box head's two fc layers (faster_rcnn)")
    m.add_argument("--min-size", type=int, nargs="+", help="short side(s); several = multi-scale training")
    m.add_argument("--max-size", type=int, help="long-side cap")
    m.add_argument("--anchor-sizes", type=int, nargs="+", help="one anchor size per pyramid level: P2-P6 for "
                   "faster_rcnn, P3-P7 for retinanet (3 octave scales each) and fcos (the point's size for centre "
                   "sampling and scale ranges)")
    m.add_argument("--rpn-pre-nms-top-n-train", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-post-nms-top-n-train", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-pre-nms-top-n-test", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-post-nms-top-n-test", type=int, help="(faster_rcnn)")
    m.add_argument("--rpn-batch-size-per-image", type=int, help="anchors sampled per image for the RPN loss "
                   "(faster_rcnn)")
    m.add_argument("--box-batch-size-per-image", type=int, help="RoIs sampled per image for the box-head loss "
                   "(faster_rcnn)")
    m.add_argument("--mask-layers", type=int, nargs="+", help="widths of the mask head's 3x3 convs (mask_rcnn)")
    m.add_argument("--mask-hidden", type=int, help="width of the mask head's 2x upsampling conv (mask_rcnn)")
    m.add_argument("--num-queries", type=int, help="object queries (detr)")
    m.add_argument("--enc-layers", type=int, help="transformer encoder layers (detr)")
    m.add_argument("--dec-layers", type=int, help="transformer decoder layers (detr)")
    m.add_argument("--hidden-dim", type=int, help="transformer width d (detr)")
    m.add_argument("--nheads", type=int, help="attention heads (detr)")
    m.add_argument("--dim-feedforward", type=int, help="width of the transformer's feed-forward layers (detr)")
    m.add_argument("--dropout", type=float, help="transformer dropout (detr)")
    m.add_argument("--dilation", action="store_true", default=None, help="DC5: layer4 dilated, stride 16 (detr; "
                   "resnet50 and deeper)")
    m.add_argument("--eos-coef", type=float, help="weight of the no-object class in the loss (detr)")
    m.add_argument("--feature-stage", type=int, choices=[3, 4], help="ResNet stage the transformer reads: 4 = C5, "
                   "3 = C4 (stride 16, for a ResNet-18/34 that cannot dilate) (detr)")
    m.add_argument("--cache-backbone-features", action=argparse.BooleanOptionalAction, default=False,
                   help="with a frozen backbone (--trainable-layers 0 --norm frozen_bn), compute its features once "
                   "per distinct input and reuse them (detr; small datasets: they stay in memory)")
    m.add_argument("--init", nargs="+", default=[], metavar="WEIGHTS",
                   help="initialise from these, in order: a box-domain (train_box.py) or any detector checkpoint "
                        "(final output layers re-initialised), or backbone weights: train_image.py's checkpoint, "
                        "torchvision:<Enum>.<NAME> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V2), or a "
                        "MoCo / SwAV / DINO / DenseCL checkpoint")
    m.add_argument("--keep-heads", action="store_true", help="with --init, keep the final output layers too")
    m.add_argument("--init-skip", nargs="+", default=[], metavar="PREFIX",
                   help="with a detector --init, also leave the modules under these key prefixes at their "
                   "initialisation (e.g. head.classification_head.: transfer only the regression tower)")
    m.add_argument("--box-init-skip", nargs="*", metavar="PREFIX",
                   help="the same for a box-domain (train_box.py) --init only; the demo one-stage presets skip "
                   "head.classification_head. (docs/method.md §7); give the flag with no prefix for the "
                   "official transfer of every module")

    o = add_step_schedule_arguments(p, "passes over the (labelled) training set (unless --iterations)")
    o.add_argument("--iterations", type=int, default=0, help="train for this many iterations of 16 images instead of "
                   "--epochs, scaled to the real batch as --lr is (0: by epochs)")
    o.add_argument("--lr-step-iterations", type=int, nargs="*", default=[], help="with --iterations: the "
                   "iterations (of 16 images) at which lr is multiplied by 0.1")

    r = add_run_arguments(p, "outputs/finetune")
    r.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always after the last)")
    r.add_argument("--eval-only", action="store_true", help="only evaluate (use with --init or --resume)")
    r.add_argument("--max-val-images", type=int, default=None, help="evaluate on the first N val images only")
    return p


def resolve_data(args):
    """Fill in the data paths: VOC sets converted to COCO json (rank 0 writes them), or the demo
    dataset's when no data is given (rank 0 builds it)."""
    given = [args.train_json, args.train_images, args.val_json, args.val_images]
    if args.voc_root:
        if any(given):
            sys.exit("finetune.py: give --voc-root or the COCO flags (--train-json ...), not both")
        return resolve_voc(args)
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


def resolve_voc(args):
    """``--voc-root``'s ``--train-sets`` and ``--val-set`` as COCO jsons in ``--output-dir`` (difficult objects
    as crowd, so training and COCOeval ignore them); the images stay where they are."""
    args.train_json = os.path.join(args.output_dir, "voc_train.json")
    args.val_json = os.path.join(args.output_dir, "voc_val.json")
    args.train_images = args.val_images = args.voc_root
    if dist_utils.is_main_process():
        classes = VOC_CLASSES
        if args.voc_classes == "data":  # one list for both, so that their category ids agree
            found, _ = voc_to_coco(args.voc_root, args.train_sets + [args.val_set], classes_from_data=True)
            classes = [c["name"] for c in found["categories"]]
        for sets, path in ((args.train_sets, args.train_json), ([args.val_set], args.val_json)):
            coco, report = voc_to_coco(args.voc_root, sets, classes)
            if not coco["images"]:
                raise FileNotFoundError(f"no readable VOC annotations in {' '.join(sets)} under {args.voc_root}: "
                                        + format_report(report))
            if report["unknown_class"] and not report["objects"]:
                raise ValueError(f"no object in {' '.join(sets)} is of the 20 VOC classes (e.g. "
                                 f"{report['unknown_class'][0]}); pass --voc-classes data for the names found")
            atomic_write(path, lambda f: f.write(json.dumps(coco).encode()))
            print(f"VOC {' + '.join(sets)}: {format_report(report)}\n  -> {path}", flush=True)
    dist_utils.barrier()
    return args


def build_datasets(args):
    """Training set (optionally a --label-fraction subset) and validation set; for mask_rcnn the
    training set reads instance masks (the validation masks come from the json, in COCOeval)."""
    masks = args.detector == "mask_rcnn"
    train_set = CocoDetection(args.train_images, args.train_json, train_transforms(), remove_empty=True, masks=masks)
    if args.label_fraction < 1.0:
        ids = label_fraction_split(train_set.ids, args.label_fraction, args.fold)
        train_set = CocoDetection(args.train_images, args.train_json, train_transforms(), image_ids=ids,
                                  remove_empty=True, masks=masks)
    val_set = CocoDetection(args.val_images, args.val_json, eval_transforms())
    if args.max_val_images:
        val_set = CocoDetection(args.val_images, args.val_json, eval_transforms(),
                                image_ids=val_set.ids[: args.max_val_images])
    counts = train_set.summary()
    if masks and counts["kept_boxes"] and counts["missing_masks"] + counts["broken_masks"] == counts["kept_boxes"]:
        sys.exit(f"finetune.py: --detector mask_rcnn needs instance masks, but no annotation in {args.train_json} "
                 "has a usable 'segmentation' (polygons or RLE); train faster_rcnn on boxes only")
    if train_set.label_to_cat != val_set.label_to_cat:
        sys.exit("finetune.py: the training and validation jsons list different categories")
    if len(train_set) == 0:
        sys.exit(f"finetune.py: no usable training images. {train_set.report()}")
    return train_set, val_set


def build_model(args, num_classes, log, label_to_cat=None):
    """The detector of ``args``, initialised from every ``--init`` source in order (``label_to_cat``: the
    dataset's category id of each label, which picks the class-head rows of a reference DETR checkpoint)."""
    options = model_options(args.detector, vars(args))
    if args.init:  # every --init source carries a backbone: skip the preset's (a download for coco)
        options["backbone_weights"] = None
    model = build_detector(args.detector, num_classes, backbone=args.backbone, **options)
    category_ids = [label_to_cat[label] for label in range(1, num_classes + 1)] if label_to_cat else None
    sources = [load_pretrained(model, path, keep_heads=args.keep_heads, log=log, detector=args.detector,
                               backbone=args.backbone,
                               skip=args.init_skip, box_skip=args.box_init_skip or (),
                               category_ids=category_ids)["source"]
               for path in args.init]
    if args.cache_backbone_features:
        if not hasattr(model, "enable_feature_cache"):
            raise ValueError(f"--cache-backbone-features is built for detr only, not {args.detector}")
        try:
            model.enable_feature_cache()
        except ValueError as e:
            raise ValueError(f"{e}; pass --no-cache-backbone-features to train the backbone") from None
    if args.init_skip and "detector" not in sources:
        raise CheckpointError("--init-skip needs a detector checkpoint in --init (train_box.py or finetune.py); "
                              f"got backbone weights only: {' '.join(args.init)}")
    return model


def resolve_schedule(args, world, iters_per_epoch, log):
    """With ``--iterations``: set ``args.epochs`` to the epochs it spans and return the iterations of the
    last one (the run stops there); by epochs, None."""
    if not args.iterations:
        if args.epochs is None:
            raise ValueError("give --epochs or --iterations")
        return None
    images = args.batch_size * world
    total = scaled_iterations(args.iterations, images)
    args.epochs, last = iteration_epochs(total, iters_per_epoch)
    log(f"schedule: {args.iterations} iterations of 16 images = {total} iterations of {images}, lr x0.1 at "
        + (", ".join(str(scaled_iterations(s, images)) for s in args.lr_step_iterations) or "none")
        + f"; {args.epochs} epochs of {iters_per_epoch} iterations (--epochs and --lr-steps are not used; "
        "--iterations 0 trains by them)")
    return last


class Evaluation:
    """COCO evaluation of the model on the validation set; keeps every result in
    ``metrics`` (saved in checkpoints) and ``metrics.json``."""

    def __init__(self, model, val_set, batches, args, device, metrics):
        self.model, self.val_set, self.batches, self.args, self.device = model, val_set, batches, args, device
        self.metrics = metrics

    def __call__(self, epoch):
        evaluator = CocoEvaluator(self.val_set.coco, self.val_set.label_to_cat)
        main_proc = dist_utils.is_main_process()
        stats = evaluate(self.model, self.batches.loader(), evaluator, self.device, self.args.amp,
                         total=len(self.batches), verbose=main_proc)
        self.metrics.append({"epoch": epoch, "images": len(evaluator.results), **stats})
        if main_proc:
            with open(os.path.join(self.args.output_dir, "metrics.json"), "w") as f:
                json.dump(self.metrics, f, indent=1)
            shown = ("AP", "AP50", "AP75", "mask_AP", "mask_AP50")
            print(json.dumps({"epoch": epoch, "images": len(evaluator.results),
                              **{k: round(stats[k], 4) for k in shown if k in stats}}))
        return stats


def main(args):
    device, rank, world, log = start_run(args)
    resolve_data(args)
    train_set, val_set = build_datasets(args)
    log(train_set.report())
    log(val_set.report())
    model_without_ddp = build_model(args, train_set.num_classes, log, train_set.label_to_cat).to(device)
    model = dist_utils.wrap_ddp(model_without_ddp, device)

    train_batches = EpochBatches(train_set, args.batch_size, args.workers, rank, world, args.seed, shuffle=True,
                                 collate_fn=collate_fn, max_iters=args.max_iters)
    val_batches = EpochBatches(val_set, args.batch_size, args.workers, rank, world, args.seed, shuffle=False,
                               collate_fn=collate_fn)
    iters_per_epoch = len(train_batches)
    last_epoch_iters = resolve_schedule(args, world, iters_per_epoch, log)
    optimizer, lr_fn = step_schedule_optimizer(model_without_ddp, args, world, iters_per_epoch)
    scaler = grad_scaler(args.amp)

    metrics = []
    checkpoint = RunCheckpoint(args.output_dir, model_without_ddp, optimizer, scaler, args, "finetune",
                               every=args.checkpoint_every, kind="finetune.py", metrics=metrics,
                               label_to_cat=val_set.label_to_cat, class_names=val_set.class_names)
    resumed = checkpoint.resume(args.resume, log, weights_only=args.eval_only)
    start_epoch, start_iter = resumed.get("epoch", 0), resumed.get("iteration", 0)
    metrics.extend(resumed.get("metrics", []))
    run_eval = Evaluation(model_without_ddp, val_set, val_batches, args, device, metrics)
    if args.eval_only:
        run_eval(start_epoch)
        dist_utils.cleanup()
        return metrics

    log_file = JsonLog(os.path.join(args.output_dir, "log.jsonl"), args.print_freq)
    log(f"training {args.detector} ({args.backbone}) on {len(train_set)} images, {world} process(es), "
        f"batch {args.batch_size * world}, lr {lr_fn.base_lr:g}, {args.epochs} epochs of {iters_per_epoch} iterations")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        stop = last_epoch_iters if epoch + 1 == args.epochs else None
        means = train_one_epoch(model, optimizer, train_batches.loader(epoch, start_iter, stop), device, epoch, lr_fn,
                                scaler, args.amp, log_file, checkpoint, args.clip_grad_norm)
        start_iter = 0
        checkpoint.save(epoch + 1)  # before evaluating, so a crash there loses no training
        if epoch + 1 == args.epochs or (epoch + 1) % args.eval_every == 0:
            run_eval(epoch + 1)
            checkpoint.save(epoch + 1)
        log_file.write_epoch(epoch, time.time() - t0, means)
    log_file.close()
    if getattr(model_without_ddp, "feature_cache_misses", None) is not None:
        log(f"backbone feature cache: {model_without_ddp.feature_cache_hits} hits, "
            f"{model_without_ddp.feature_cache_misses} misses")
    if metrics:
        final = metrics[-1]
        masks = f"; mask AP {final['mask_AP']:.4f} (AP50 {final['mask_AP50']:.4f})" if "mask_AP" in final else ""
        log(f"final COCO AP on {args.val_json}: {final['AP']:.4f} (AP50 {final['AP50']:.4f}, "
            f"AP75 {final['AP75']:.4f}){masks}")
    dist_utils.cleanup()
    return metrics


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, CheckpointError, DemoDataError, NonFiniteLossError, ValueError) as e:
        # Bad input (paths, json, checkpoints, demo parts) or a diverged run: say what, not where in torch.
        sys.exit(f"finetune.py: error: {e}")
