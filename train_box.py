"""Box-domain pre-training (AlignDet stage 2): train a detector's neck and heads
on unlabeled images, with the stage-1 backbone frozen.

Every image gets selective-search proposals (built once into a cache, see
aligndet/data/proposals.py); two augmented views go through the online
detector and its momentum copy; each detector assigns its predictions to the
proposals with its own label-assignment rule; a box-level contrastive loss
between the views plus the detector's own box / RPN losses train the online
detector (docs/method.md §3). The saved checkpoint's "model" entry is the
online detector, which finetune.py --init loads.

Runbook
  # Demo: the embedded demo dataset (built on first use), its proposals (built on first
  # use), ResNet-18, CPU, about 9 min on 2 cores. Pass a stage-1 backbone with --init.
  python train_image.py --output-dir outputs/image
  python train_box.py --init outputs/image/checkpoint.pth
  python finetune.py --init outputs/box/checkpoint.pth --label-fraction 0.1

  # RetinaNet or FCOS: the same flags plus --detector, in both scripts
  python train_box.py --detector fcos --init outputs/image/checkpoint.pth --output-dir outputs/box_fcos
  python finetune.py --detector fcos --init outputs/box_fcos/checkpoint.pth --label-fraction 0.1

  # Mask R-CNN: its box-domain stage is Faster R-CNN's (one checkpoint for both, as in the official code);
  # the mask head starts fresh at fine-tuning
  python finetune.py --detector mask_rcnn --init outputs/box/checkpoint.pth --label-fraction 0.1

  # DETR: first the proposals' pseudo-classes (k-means of stage-1 RoI features, docs/method.md §3.9),
  # then the same flags; the detector gets one class per cluster and AdamW (--preset's)
  python -m aligndet.data.proposals                      # the demo cache, if train_box.py has not built it yet
  python -m aligndet.data.proposals cluster --cache data/demo/proposals/train \\
      --init outputs/image/checkpoint.pth --k 32
  python train_box.py --detector detr --init outputs/image/checkpoint.pth --output-dir outputs/box_detr
  python finetune.py --detector detr --init outputs/box_detr/checkpoint.pth --label-fraction 0.1

  # COCO train2017 without labels, one GPU (stage 1: torchvision's ImageNet ResNet-50
  # unless --init names another backbone checkpoint)
  python -m aligndet.data.proposals build --images coco/train2017 \\
      --json coco/annotations/instances_train2017.json --out proposals/train2017
  python train_box.py --preset coco --images coco/train2017 \\
      --json coco/annotations/instances_train2017.json --proposals proposals/train2017 \\
      --init torchvision:ResNet50_Weights.IMAGENET1K_V1    # or a MoCo / SwAV / DINO checkpoint

  # The paper's recipe: 8 GPUs x 2 images, 12 epochs (--batch-size is per process)
  torchrun --nproc_per_node 8 train_box.py --preset coco ...

  # DETR on COCO: 256 clusters, then the official DETR stage 2 (AdamW, 50 epochs, the first 50 proposals)
  python -m aligndet.data.proposals cluster --cache proposals/train2017 --images coco/train2017 \\
      --json coco/annotations/instances_train2017.json --init <stage-1 checkpoint> --k 256
  torchrun --nproc_per_node 8 train_box.py --preset coco --detector detr ...

  # Resume an interrupted run (same --output-dir)
  python train_box.py ... --resume

Learning rate: --lr is given for 16 images per step and scaled linearly to
the real batch (batch size x processes): the paper uses 0.02 for Faster R-CNN
(0.01 for RetinaNet and FCOS) at 16 images, SGD momentum 0.9, weight decay
1e-4, 500 warm-up iterations, lr x0.1 after epochs 8 and 11; for DETR AdamW
at 2e-4 per 64 images (--lr 5e-5), weight decay 1e-4, gradients clipped at
0.1, 50 epochs, lr x0.1 after epoch 40. Every default shown by --help is the
one the chosen --preset and --detector give.

Outputs in --output-dir: checkpoint.pth (latest, resumable, "model" = the
online detector), log.jsonl (every loss term, contrastive top-1 accuracy,
instances and matched instances per logged step, momentum).
"""
import os
import sys
import time

import numpy as np
from PIL import Image

from aligndet import distributed as dist_utils
from aligndet.checkpoint import CheckpointError, RunCheckpoint, load_pretrained
from aligndet.cli import (WORKERS_HELP, add_run_arguments, add_step_schedule_arguments, runbook_parser,
                          workers_count)
from aligndet.data.clusters import ClusterIds, cluster_dir
from aligndet.data.demo import DemoDataError, ensure_demo
from aligndet.data.images import list_images
from aligndet.data.proposal_cache import ProposalCache, ProposalCacheError
from aligndet.data.proposals import PRESETS as PROPOSAL_PRESETS
from aligndet.data.proposals import ensure_proposals
from aligndet.data.views import TwoViewDataset, build_view_transform, two_view_collate
from aligndet.engine import (EpochBatches, JsonLog, NonFiniteLossError, grad_scaler, start_run,
                             step_schedule_optimizer, train_one_epoch)
from aligndet.models import build_detector
from aligndet.models.backbone import BACKBONES
from aligndet.presets import BOX_PRESET_NAMES, BOX_VIEWS, box_defaults, model_defaults, model_options
from aligndet.pretrain.box import AlignDet
from aligndet.pretrain.hooks import BOX_DOMAIN_DETECTORS

def get_args_parser():
    p = runbook_parser("train_box.py", __doc__, preset_keys=("preset", "detector"), presets=box_defaults)
    d = p.add_argument_group("data (default: the embedded demo dataset's training scenes, labels unused)")
    d.add_argument("--images", help="image folder (searched recursively) or the folder --json's files are in")
    d.add_argument("--json", help="COCO json listing the images (annotations are ignored)")
    d.add_argument("--proposals", help="proposal cache folder; built there if missing "
                   "(default for the demo: <demo-root>/proposals/train)")
    d.add_argument("--proposal-preset", choices=sorted(PROPOSAL_PRESETS),
                   help="selective-search settings used when the cache must be built (default: demo for the "
                   "demo dataset, coco, the official filter, for --images)")
    d.add_argument("--max-proposals", type=int, help="proposals kept per image (0: all; the paper keeps 50 for "
                   "retinanet and the first 50 for detr, whose --num-queries must exceed it)")
    d.add_argument("--select", choices=["random", "first"], default="random",
                   help="which proposals --max-proposals keeps (random: redrawn each epoch)")
    d.add_argument("--views", choices=sorted(BOX_VIEWS), help="view sizes: short sides and long-side cap")
    d.add_argument("--crop", action="store_true", help="add a random crop to the views (ablation)")
    d.add_argument("--demo-root", default="data/demo", help="where the demo dataset lives / is built")
    d.add_argument("--workers", type=workers_count, default="auto", help=WORKERS_HELP)

    m = p.add_argument_group("model (the architecture is finetune.py's for the same --preset and --detector)")
    m.add_argument("--preset", choices=BOX_PRESET_NAMES, default="demo", help="architecture and schedule")
    m.add_argument("--detector", choices=sorted(BOX_DOMAIN_DETECTORS + ("mask_rcnn",)), default="faster_rcnn",
                   help="the detector whose neck and heads are pre-trained; fine-tune it with the same --detector "
                   "(mask_rcnn: use faster_rcnn's checkpoint)")
    m.add_argument("--backbone", choices=BACKBONES, metavar="NAME", help="a torchvision trunk: "
                   + " / ".join(BACKBONES))
    m.add_argument("--init", metavar="WEIGHTS", help="stage-1 backbone: train_image.py's checkpoint, "
                   "torchvision:<Enum>.<NAME> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1), or a MoCo / SwAV / "
                   "DINO / DenseCL checkpoint; default: the preset's backbone weights")
    m.add_argument("--embed-dim", type=int, default=256, help="embedding width D")
    m.add_argument("--temperature", type=float, default=0.5, help="tau of the contrastive loss")
    m.add_argument("--base-momentum", type=float, default=0.996, help="EMA momentum at the start (cosine to 1)")
    m.add_argument("--embed-kernel", type=int, choices=[1, 3], default=1,
                   help="retinanet / fcos: kernel of the embedding head's first conv (the official code: 3)")
    m.add_argument("--embed-init-std", type=float,
                   help="retinanet / fcos: N(0, std) init of the embedding head (the official code: 0.01); "
                        "default PyTorch's")
    m.add_argument("--cls-centerness", action="store_true",
                   help="fcos: a stage-2-only centerness branch on the classification tower, trained by BCE as "
                        "the official head's (which sits there); dropped at fine-tuning")
    m.add_argument("--bn-stats", choices=["stage1", "scenes"], default="stage1",
                   help="batch-norm statistics of the frozen backbone: stage 1's as they are (the official "
                        "code), or recomputed on --bn-batches batches of the unlabelled views before training")
    m.add_argument("--bn-batches", type=int, default=50, help="batches for --bn-stats scenes")
    m.add_argument("--num-samples", type=int, help="predictions kept for the contrastive loss, per image (faster_rcnn, "
                   "retinanet) or per batch (fcos); 0: the official number, 4096 positive RoIs for Faster R-CNN, "
                   "2048 anchors / points for RetinaNet / FCOS; detr keeps every query (0 only)")

    add_step_schedule_arguments(p, "passes over the unlabelled images")

    add_run_arguments(p, "outputs/box")
    return p


def resolve_proposal_preset(args, records, demo, main_proc):
    """The proposal preset when none was given: demo for the demo dataset, coco (the official filter) for any
    other images. Printed, with a note when the images are small for the official 32-px minimum side."""
    why = "given"
    if args.proposal_preset is None:
        args.proposal_preset, why = ("demo", "the default for the demo dataset") if demo else \
            ("coco", "the default for your own images")
    if not main_proc:
        return
    print(f"proposal preset: {args.proposal_preset} ({why}), used if the cache must be built: "
          f"{PROPOSAL_PRESETS[args.proposal_preset]}")
    min_size = PROPOSAL_PRESETS[args.proposal_preset]["min_size"]
    short = median_short_side(records[:20])
    if min_size >= 32 and short and short < 256:
        print(f"note: your images' shorter side is about {short} px; the preset's {min_size:g}-px minimum proposal "
              f"side may drop most objects. --proposal-preset demo keeps boxes down to 8 px, or build the cache "
              f"with `python -m aligndet.data.proposals build --min-size N`.")


def median_short_side(records):
    """The median shorter side (px) of ``records``' images, read from their headers; None if none is readable."""
    sides = []
    for r in records:
        try:
            with Image.open(r.path) as im:
                sides.append(min(im.size))
        except OSError:
            continue
    return int(np.median(sides)) if sides else None


def build_dataset(args, main_proc):
    """Records of the images, their proposal cache (built by rank 0 if needed), the two-view dataset."""
    demo = args.images is None
    if demo:
        if args.json:
            sys.exit("train_box.py: --json needs --images (the folder its file names are relative to)")
        if main_proc:
            ensure_demo(args.demo_root)
        dist_utils.barrier()
        args.images = os.path.join(args.demo_root, "train")
        args.json = os.path.join(args.demo_root, "annotations", "instances_train.json")
        args.proposals = args.proposals or os.path.join(args.demo_root, "proposals", "train")
    if args.proposals is None:
        sys.exit("train_box.py: --proposals is required with --images (a cache folder; built there if missing)")
    records = list_images(args.images, args.json)
    if not records:
        sys.exit(f"train_box.py: no images in {args.json or args.images}")
    resolve_proposal_preset(args, records, demo, main_proc)
    # Rank 0 builds what is missing; the others open the finished cache after it.
    cache = ensure_proposals(records, args.proposals, PROPOSAL_PRESETS[args.proposal_preset]) if main_proc else None
    dist_utils.barrier()
    if cache is None:
        cache = ProposalCache(args.proposals)
    args.proposal_settings = dict(cache.settings)  # what made the boxes, kept in the checkpoint's args
    usable = [r for r in records if r.key in cache]
    if main_proc:
        stats = cache.stats()
        print(f"{len(usable)} of {len(records)} images have an entry in the proposal cache {args.proposals} "
              f"({stats['boxes'] / max(stats['images'] - stats['failed'], 1):.1f} proposals per image, "
              f"{stats['failed']} images failed there and are skipped); settings {cache.settings}")
    classes = pseudo_classes(args.proposals, main_proc) if args.detector == "detr" else None
    transform = build_view_transform(**BOX_VIEWS[args.views], crop=args.crop)
    return TwoViewDataset(usable, cache, transform, max_proposals=args.max_proposals or None, select=args.select,
                          seed=args.seed, classes=classes, skip_empty=classes is not None)


def pseudo_classes(cache_dir, main_proc):
    """DETR's proposal classes: the cluster ids beside the cache (docs/method.md §3.9); a clean exit naming
    the cluster command when there are none."""
    try:
        classes = ClusterIds(cache_dir)
    except ProposalCacheError as e:
        sys.exit(f"train_box.py: error: {e}")
    if main_proc:
        print(f"pseudo-classes: {classes.k} clusters of the proposals in {cluster_dir(cache_dir)}; boxes without "
              "one (-1) are dropped, and images left without proposals skipped")
    return classes


def check_detr_queries(args):
    """DETR matches every proposal to a query of its own, so it needs more queries than the proposals it keeps
    (docs/method.md §3.9); refused before anything is built."""
    if args.detector != "detr":
        return
    queries = model_defaults(args.detector, args.preset)["num_queries"]
    if not args.max_proposals or args.max_proposals >= queries:
        kept = "every proposal" if not args.max_proposals else f"{args.max_proposals} proposals"
        sys.exit(f"train_box.py: error: --max-proposals must be below DETR's {queries} queries (num_queries of "
                 f"--preset {args.preset}), so that every proposal can be matched; got {kept} per image")
    if args.num_samples:
        sys.exit("train_box.py: error: --num-samples does not apply to detr, which keeps every query")


def build_detector_to_pretrain(args, log, num_classes=1):
    """The detector of finetune.py's architecture for ``--preset`` / ``--detector``, with ``num_classes``
    classes (one, "object", except DETR's pseudo-classes) and the stage-1 backbone of ``--init``."""
    options = model_options(args.detector, model_defaults(args.detector, args.preset))
    if args.init:
        options["backbone_weights"] = None  # replaced by --init below
    detector = build_detector(args.detector, num_classes, backbone=args.backbone, **options)
    if args.init:
        load_pretrained(detector, args.init, log=log, backbone=args.backbone)
    elif options.get("backbone_weights") is None:
        log("warning: no stage-1 backbone (--init): the frozen backbone keeps its random initialisation")
    return detector


def embedding_head_options(args):
    """The embedding-head flags that differ from their defaults (only the dense detectors have them)."""
    options = {}
    if args.embed_kernel != 1:
        options["kernel_size"] = args.embed_kernel
    if args.embed_init_std is not None:
        options["init_std"] = args.embed_init_std
    if args.cls_centerness:
        if args.detector != "fcos":
            raise ValueError(f"--cls-centerness is for --detector fcos, not {args.detector}")
        options["centerness"] = True
    if options and args.detector in ("faster_rcnn", "detr"):
        raise ValueError("--embed-kernel and --embed-init-std are for the dense detectors (retinanet, fcos)")
    return options


MASK_RCNN_STAGE = ("Mask R-CNN's box-domain stage is Faster R-CNN's (the official code shares one checkpoint; the "
                   "mask head starts fresh at fine-tuning): run train_box.py --detector faster_rcnn, then "
                   "finetune.py --detector mask_rcnn --init <its checkpoint.pth>")


def main(args):
    if args.detector == "mask_rcnn":
        sys.exit(f"train_box.py: {MASK_RCNN_STAGE}")
    check_detr_queries(args)
    device, rank, world, log = start_run(args)
    main_proc = dist_utils.is_main_process()
    dataset = build_dataset(args, main_proc)
    # DETR's class head predicts the proposals' clusters (labels 1..k); the other detectors have one class.
    detector = build_detector_to_pretrain(args, log, dataset.classes.k if dataset.classes is not None else 1)
    batches = EpochBatches(dataset, args.batch_size, args.workers, rank, world, args.seed, shuffle=True,
                           collate_fn=two_view_collate, max_iters=args.max_iters)
    iters_per_epoch = len(batches)
    model_without_ddp = AlignDet(detector, args.embed_dim, args.temperature, args.base_momentum,
                                 args.epochs * iters_per_epoch, num_samples=args.num_samples or None,
                                 head_options=embedding_head_options(args)).to(device)
    model = dist_utils.wrap_ddp(model_without_ddp, device)

    optimizer, lr_fn = step_schedule_optimizer(model_without_ddp, args, world, iters_per_epoch)
    scaler = grad_scaler(args.amp)

    checkpoint = RunCheckpoint(args.output_dir, model_without_ddp, optimizer, scaler, args, "box",
                               every=args.checkpoint_every, kind="train_box.py", detector=args.detector)
    resumed = checkpoint.resume(args.resume, log)
    start_epoch, start_iter = resumed.get("epoch", 0), resumed.get("iteration", 0)

    if args.bn_stats == "scenes" and not resumed:
        used = model_without_ddp.recalibrate_batch_norm(batches.loader(0, 0), args.bn_batches, device)
        log(f"backbone batch-norm statistics recomputed on {used} batches of unlabelled views"
            if used else "--bn-stats scenes: the backbone has no batch-norm layers; nothing recomputed")
    log_file = JsonLog(os.path.join(args.output_dir, "log.jsonl"), args.print_freq)
    log(f"box-domain pre-training of {args.detector} ({args.backbone}, backbone frozen) on {len(dataset)} images, "
        f"{world} process(es), batch {args.batch_size * world}, lr {lr_fn.base_lr:g}, {args.epochs} epochs of "
        f"{iters_per_epoch} iterations")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        means = train_one_epoch(model, optimizer, batches.loader(epoch, start_iter), device, epoch, lr_fn,
                                scaler, args.amp, log_file, checkpoint, args.clip_grad_norm)
        start_iter = 0
        checkpoint.save(epoch + 1)
        log(log_file.write_epoch(epoch, time.time() - t0, means))
    log_file.close()
    path = os.path.join(args.output_dir, "checkpoint.pth")
    log(f"online detector saved in {path}; fine-tune it with python finetune.py"
        f"{'' if args.detector == 'faster_rcnn' else ' --detector ' + args.detector} --init {path}")
    dist_utils.cleanup()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, CheckpointError, DemoDataError, NonFiniteLossError, ProposalCacheError,
            ValueError) as e:
        sys.exit(f"train_box.py: error: {e}")
