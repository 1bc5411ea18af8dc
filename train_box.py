"""Box-domain pre-training (AlignDet stage 2): train a detector's neck and heads
on unlabeled images, with the stage-1 backbone frozen.

Every image gets selective-search proposals (built once into a cache, see
aligndet/data/proposals.py); two augmented views go through the online
detector and its momentum copy; each detector assigns its predictions to the
proposals with its own label-assignment rule; a box-level contrastive loss
between the views plus the detector's own box / RPN losses train the online
detector (DESIGN.md section 3). The saved checkpoint's "model" entry is the
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

  # COCO train2017 without labels, one GPU (stage 1: torchvision's ImageNet ResNet-50
  # unless --init names another backbone checkpoint)
  python -m aligndet.data.proposals build --images coco/train2017 \\
      --json coco/annotations/instances_train2017.json --out proposals/train2017
  python train_box.py --preset coco --images coco/train2017 \\
      --json coco/annotations/instances_train2017.json --proposals proposals/train2017 \\
      --init torchvision:ResNet50_Weights.IMAGENET1K_V1    # or a MoCo / SwAV / DINO checkpoint

  # The paper's recipe: 8 GPUs x 2 images, 12 epochs (--batch-size is per process)
  torchrun --nproc_per_node 8 train_box.py --preset coco ...

  # Resume an interrupted run (same --output-dir)
  python train_box.py ... --resume

Learning rate: --lr is given for 16 images per step and scaled linearly to
the real batch (batch size x processes): the paper uses 0.02 for Faster R-CNN
(0.01 for RetinaNet and FCOS) at 16 images, SGD momentum 0.9, weight decay
1e-4, 500 warm-up iterations, lr x0.1 after epochs 8 and 11.

Outputs in --output-dir: checkpoint.pth (latest, resumable, "model" = the
online detector), log.jsonl (every loss term, contrastive top-1 accuracy,
instances and matched instances per logged step, momentum).
"""
import argparse
import json
import os
import sys
import time

import torch

import finetune
from aligndet import distributed as dist_utils
from aligndet.checkpoint import CheckpointError, args_to_dict, latest_checkpoint, load_checkpoint, load_pretrained, save_checkpoint
from aligndet.data.demo import DemoDataError, ensure_demo
from aligndet.data.images import list_images
from aligndet.data.proposal_cache import ProposalCache, ProposalCacheError
from aligndet.data.proposals import PRESETS as PROPOSAL_PRESETS
from aligndet.data.proposals import ensure_proposals
from aligndet.data.views import COCO_VIEW, DEMO_VIEW, TwoViewDataset, build_view_transform, two_view_collate
from aligndet.engine import EpochBatches, NonFiniteLossError, add_run_arguments, start_run, step_lr, train_one_epoch
from aligndet.models import DETECTORS, build_detector
from aligndet.pretrain.box import AlignDet, box_domain_step

# Pre-training settings each preset fills in unless given; the architecture comes
# from finetune.py's preset of the same name, so the weights transfer one to one.
PRESETS = {
    # The demo on 2 CPU cores in about 9 minutes. 8 epochs at lr 0.04 gave +2.7 AP at 10 % labels where
    # 4 epochs at 0.02 gave +1.3 (benchmarks/RESULTS.md): the contrastive task is still learning at the end.
    "demo": dict(epochs=8, batch_size=8, lr=0.04, weight_decay=1e-4, warmup_iters=100, lr_steps=[6],
                 num_samples=64, max_proposals=32, views="demo", proposal_preset="demo"),
    # The official recipe (16 images per step on 8 GPUs).
    "coco": dict(epochs=12, batch_size=2, lr=0.02, weight_decay=1e-4, warmup_iters=500, lr_steps=[8, 11],
                 num_samples=0, max_proposals=0, views="coco", proposal_preset="coco"),
}
# What differs per detector (taking precedence). The paper pre-trains RetinaNet and FCOS at lr 0.01 and keeps
# 50 proposals per image for RetinaNet; num_samples counts predictions per image for Faster R-CNN (positive
# RoIs) and RetinaNet (anchors) but per batch for FCOS (points), as in the official settings.
DETECTOR_PRESETS = {
    ("retinanet", "demo"): dict(lr=0.02, num_samples=128),
    ("retinanet", "coco"): dict(lr=0.01, max_proposals=50),
    ("fcos", "demo"): dict(lr=0.02, num_samples=2048),  # the official number: 512 gave -0.8 AP, 2048 -0.4
    ("fcos", "coco"): dict(lr=0.01),
}
VIEWS = {"demo": DEMO_VIEW, "coco": COCO_VIEW}


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """--help shows each option's default and the runbook as written."""


def get_args_parser():
    p = argparse.ArgumentParser("train_box.py", description=__doc__[:__doc__.index("Runbook")].strip(),
                                epilog=__doc__[__doc__.index("Runbook"):], formatter_class=HelpFormatter)
    d = p.add_argument_group("data (default: the embedded demo dataset's training scenes, labels unused)")
    d.add_argument("--images", help="image folder (searched recursively) or the folder --json's files are in")
    d.add_argument("--json", help="COCO json listing the images (annotations are ignored)")
    d.add_argument("--proposals", help="proposal cache folder; built there if missing "
                   "(default for the demo: <demo-root>/proposals/train)")
    d.add_argument("--proposal-preset", choices=sorted(PROPOSAL_PRESETS),
                   help="selective-search filters used when the cache must be built")
    d.add_argument("--max-proposals", type=int, help="proposals kept per image (0: all; the paper keeps 50 for "
                   "retinanet)")
    d.add_argument("--select", choices=["random", "first"], default="random",
                   help="which proposals --max-proposals keeps (random: redrawn each epoch)")
    d.add_argument("--views", choices=sorted(VIEWS), help="view sizes: short sides and long-side cap")
    d.add_argument("--crop", action="store_true", help="add a random crop to the views (ablation)")
    d.add_argument("--demo-root", default="data/demo")
    d.add_argument("--workers", type=int, default=2, help="data-loading processes per training process")

    m = p.add_argument_group("model")
    m.add_argument("--preset", choices=sorted(PRESETS), default="demo",
                   help="architecture (finetune.py's preset of the same name) and schedule")
    m.add_argument("--detector", choices=sorted(DETECTORS), default="faster_rcnn",
                   help="the detector whose neck and heads are pre-trained; fine-tune it with the same --detector")
    m.add_argument("--backbone", help="resnet18 / resnet34 / resnet50 / resnet101 (default: the preset's)")
    m.add_argument("--init", metavar="WEIGHTS", help="stage-1 backbone: train_image.py's checkpoint, "
                   "torchvision:<Enum>.<NAME> (e.g. torchvision:ResNet50_Weights.IMAGENET1K_V1), or a MoCo / SwAV / "
                   "DINO / DenseCL checkpoint; default: the preset's backbone weights")
    m.add_argument("--embed-dim", type=int, default=256, help="embedding width D")
    m.add_argument("--temperature", type=float, default=0.5)
    m.add_argument("--base-momentum", type=float, default=0.996, help="EMA momentum at the start (cosine to 1)")
    m.add_argument("--num-samples", type=int, help="predictions kept for the contrastive loss, per image (faster_rcnn, "
                   "retinanet) or per batch (fcos); 0: the official number, 4096 positive RoIs for Faster R-CNN, "
                   "2048 anchors / points for RetinaNet / FCOS")

    o = p.add_argument_group("optimisation (unset values come from --preset)")
    o.add_argument("--epochs", type=int)
    o.add_argument("--batch-size", type=int, help="images per process per step")
    o.add_argument("--lr", type=float, help="SGD learning rate for 16 images per step (scaled to the real batch)")
    o.add_argument("--momentum", type=float, default=0.9)
    o.add_argument("--weight-decay", type=float)
    o.add_argument("--warmup-iters", type=int)
    o.add_argument("--lr-steps", type=int, nargs="*", help="epochs at which lr is multiplied by 0.1")

    add_run_arguments(p, "outputs/box")
    return p


def apply_presets(args):
    finetune.fill_presets(args, PRESETS, DETECTOR_PRESETS)
    model = argparse.Namespace(**{k: None for k in finetune.MODEL_OPTIONS}, backbone=args.backbone,
                               preset=args.preset, detector=args.detector)
    finetune.apply_preset(model)
    args.backbone = model.backbone
    args.model_options = finetune.model_options(model)
    return args


def build_dataset(args, main_proc):
    """Records of the images, their proposal cache (built by rank 0 if needed), the two-view dataset."""
    if args.images is None:
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
    # Rank 0 builds what is missing; the others open the finished cache after it.
    cache = ensure_proposals(records, args.proposals, PROPOSAL_PRESETS[args.proposal_preset]) if main_proc else None
    dist_utils.barrier()
    if cache is None:
        cache = ProposalCache(args.proposals)
    usable = [r for r in records if r.key in cache]
    if main_proc:
        stats = cache.stats()
        print(f"{len(usable)} of {len(records)} images have an entry in the proposal cache {args.proposals} "
              f"({stats['boxes'] / max(stats['images'] - stats['failed'], 1):.1f} proposals per image, "
              f"{stats['failed']} images failed there and are skipped); settings {cache.settings}")
    transform = build_view_transform(**VIEWS[args.views], crop=args.crop)
    return TwoViewDataset(usable, cache, transform, max_proposals=args.max_proposals or None, select=args.select,
                          seed=args.seed)


def main(args):
    apply_presets(args)
    device, rank, world, log = start_run(args)
    main_proc = dist_utils.is_main_process()

    dataset = build_dataset(args, main_proc)
    options = dict(args.model_options)
    if args.init:
        options["backbone_weights"] = None  # replaced by --init below
    detector = build_detector(args.detector, 1, backbone=args.backbone, **options)  # one class: "object"
    if args.init:
        load_pretrained(detector, args.init, log=log)
    elif options.get("backbone_weights") is None:
        log("warning: no stage-1 backbone (--init): the frozen backbone keeps its random initialisation")

    batches = EpochBatches(dataset, args.batch_size, args.workers, rank, world, args.seed, shuffle=True,
                           collate_fn=two_view_collate)
    iters_per_epoch = len(batches) if args.max_iters is None else min(len(batches), args.max_iters)
    total_steps = args.epochs * iters_per_epoch
    model = AlignDet(detector, args.embed_dim, args.temperature, args.base_momentum, total_steps,
                     num_samples=args.num_samples or None).to(device)
    model_without_ddp = model
    if world > 1:
        model = torch.nn.parallel.DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda"
                                                          else None)

    total_batch = args.batch_size * world
    base_lr = args.lr * total_batch / 16
    params = [p for p in model_without_ddp.parameters() if p.requires_grad]
    optimizer = torch.optim.SGD(params, lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay)
    scaler = torch.amp.GradScaler("cuda") if args.amp == "fp16" else None

    def lr_at(it):
        return step_lr(it, base_lr, iters_per_epoch, args.warmup_iters, steps=args.lr_steps)

    start_epoch, start_iter = 0, 0
    resume = latest_checkpoint(args.output_dir) if args.resume == "auto" else args.resume
    if args.resume == "auto" and resume is None:
        log(f"--resume: no checkpoint in {args.output_dir}; starting fresh")
    if resume:
        ckpt = load_checkpoint(resume)
        if ckpt.get("stage") != "box":
            raise CheckpointError(f"{resume} is not a train_box.py checkpoint (stage {ckpt.get('stage')!r})")
        model_without_ddp.load_state_dict({**{f"online.{k}": v for k, v in ckpt["model"].items()},
                                           **ckpt["pretrain"]})
        optimizer.load_state_dict(ckpt["optimizer"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
        start_epoch, start_iter = ckpt["epoch"], ckpt.get("iteration", 0)
        log(f"resumed from {resume}: epoch {start_epoch}, iteration {start_iter}")

    def save(epoch, iteration, name="checkpoint.pth"):
        if main_proc:
            state = model_without_ddp.state_dict()
            save_checkpoint({"model": model_without_ddp.detector_state_dict(),
                             "pretrain": {k: v for k, v in state.items() if not k.startswith("online.")},
                             "optimizer": optimizer.state_dict(),
                             "scaler": scaler.state_dict() if scaler is not None else {},
                             "epoch": epoch, "iteration": iteration, "args": args_to_dict(args),
                             "stage": "box", "detector": args.detector},
                            os.path.join(args.output_dir, name))

    log_file = open(os.path.join(args.output_dir, "log.jsonl"), "a") if main_proc else None
    log(f"box-domain pre-training of {args.detector} ({args.backbone}, backbone frozen) on {len(dataset)} images, "
        f"{world} process(es), batch {total_batch}, lr {base_lr:g}, {args.epochs} epochs of {iters_per_epoch} "
        f"iterations")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()

        def on_iteration(it, epoch=epoch):
            step = epoch * iters_per_epoch + it + 1
            m = model_without_ddp.momentum_update(step)
            if main_proc and log_file is not None and it % args.print_freq == 0:
                log_file.write(json.dumps({"epoch": epoch, "iter": it, "ema_momentum": m}) + "\n")
            if args.checkpoint_every and (it + 1) % args.checkpoint_every == 0 and it + 1 < iters_per_epoch:
                save(epoch, it + 1)

        try:
            means = train_one_epoch(model, optimizer, batches.loader(epoch, start_iter), device, epoch, lr_at,
                                    start_iter=start_iter, iters_per_epoch=iters_per_epoch, amp=args.amp,
                                    scaler=scaler, log_file=log_file, print_freq=args.print_freq,
                                    on_iteration=on_iteration, max_iters=args.max_iters, step_fn=box_domain_step)
        except NonFiniteLossError as e:
            # The failing step was not applied: these are the last finite weights, resumable at that step.
            save(epoch, e.iteration, "checkpoint_before_nonfinite.pth")
            raise NonFiniteLossError(f"{e} Weights before this step: "
                                     f"{os.path.join(args.output_dir, 'checkpoint_before_nonfinite.pth')}") from None
        start_iter = 0
        save(epoch + 1, 0)
        if main_proc:
            log_file.write(json.dumps({"epoch": epoch, "epoch_time": round(time.time() - t0, 1),
                                       **{f"train_{k}": v for k, v in means.items()}}) + "\n")
            log_file.flush()
            print(json.dumps({"epoch": epoch, **{k: round(v, 4) for k, v in means.items()}}))
    if main_proc:
        log_file.close()
        print(f"online detector saved in {os.path.join(args.output_dir, 'checkpoint.pth')}; fine-tune it with "
              f"python finetune.py{'' if args.detector == 'faster_rcnn' else ' --detector ' + args.detector} "
              f"--init {os.path.join(args.output_dir, 'checkpoint.pth')}")
    dist_utils.cleanup()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, CheckpointError, DemoDataError, NonFiniteLossError, ProposalCacheError,
            ValueError) as e:
        sys.exit(f"train_box.py: error: {e}")
