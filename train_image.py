"""Image-domain pre-training (AlignDet stage 1): train a ResNet backbone on
object-centric images, supervised (classification) or self-supervised (MoCo v2).

Stage 1 is ordinary backbone pre-training; AlignDet works with any of it
(docs/method.md §2). Most users import an existing backbone instead:
train_box.py and finetune.py take --init torchvision:ResNet50_Weights.IMAGENET1K_V2
or a local MoCo / SwAV / DINO / DenseCL checkpoint directly. The checkpoint
written here holds the ResNet without its classifier under "backbone", which
those --init options read.

Runbook
  # Demo: supervised ResNet-18 on the demo's object-centric set (64x64 digits, built
  # on first use), CPU, about 2 min on 2 cores; then stage 2 and fine-tuning
  python train_image.py --output-dir outputs/image
  python train_box.py --init outputs/image/checkpoint.pth --output-dir outputs/box
  python finetune.py --init outputs/box/checkpoint.pth --label-fraction 0.1

  # MoCo v2 on the same images without their labels (k-NN top-1 on the val folder)
  python train_image.py --method mocov2 --output-dir outputs/image_moco

  # ImageNet, one GPU (ImageNet layout: train/<class>/*.JPEG, val/<class>/*.JPEG)
  python train_image.py --preset imagenet --train imagenet/train --val imagenet/val
  python train_image.py --preset imagenet --method mocov2 --train imagenet/train --val imagenet/val

  # The usual recipes on 8 GPUs (--batch-size is per process): supervised ResNet-50 90 epochs,
  # batch 256, SGD lr 0.1, cosine; MoCo v2 200 epochs, batch 256, SGD lr 0.03, cosine,
  # queue 65536, temperature 0.2, momentum 0.999
  torchrun --nproc_per_node 8 train_image.py --preset imagenet --train imagenet/train --val imagenet/val
  torchrun --nproc_per_node 8 train_image.py --preset imagenet --method mocov2 --train ... --val ...

  # Start from imported weights (e.g. fine-tune a self-supervised backbone with labels)
  python train_image.py --init torchvision:ResNet50_Weights.IMAGENET1K_V2 --preset imagenet ...

  # Resume an interrupted run (same --output-dir)
  python train_image.py ... --resume

The paper's COCO recipe starts stage 2 from an ImageNet ResNet-50 (supervised,
or self-supervised such as MoCo v2 / SwAV / DINO); for COCO, import one:
  python train_box.py --preset coco --init torchvision:ResNet50_Weights.IMAGENET1K_V1 ...

Learning rate: --lr is given for 256 images per step and scaled linearly to
the real batch (batch size x processes), with a linear warm-up and a cosine
decay to zero.

Outputs in --output-dir: checkpoint.pth (latest, resumable; "backbone" = the
ResNet without fc), log.jsonl (one JSON object per logged step / epoch),
metrics.json (top-1, or k-NN top-1 for MoCo v2, at every evaluation).
"""
import json
import os
import sys
import time

import torch
import torchvision

from aligndet import distributed as dist_utils
from aligndet.checkpoint import CheckpointError, RunCheckpoint
from aligndet.cli import WORKERS_HELP, add_run_arguments, runbook_parser, workers_count
from aligndet.data.demo import DemoDataError, ensure_demo
from aligndet.data.image_folder import ImageFolder, collate_skipping
from aligndet.data.transforms import (TwoCrops, build_moco_v2_transform, classification_eval_transforms,
                                      classification_train_transforms)
from aligndet.engine import (EpochBatches, EpochLoader, JsonLog, NonFiniteLossError, cosine_lr, grad_scaler, start_run,
                             train_one_epoch)
from aligndet.models.backbone import BACKBONES, remove_classifier
from aligndet.models.weights import load_backbone_weights
from aligndet.pretrain.knn import extract_features, knn_top1
from aligndet.pretrain.moco import MoCo
from aligndet.pretrain.supervised import ImageClassifier

# Settings each (preset, method) fills in unless given on the command line.
PRESETS = {
    # From scratch on 4,000 64x64 digits: SGD stays near chance for the first epochs here
    # (val top-1 0.16 after 4 epochs at lr 0.02, 0.10 at 0.1), AdamW reaches ~0.88 in 8 epochs.
    ("demo", "supervised"): dict(arch="resnet18", epochs=8, batch_size=32, optimizer="adamw", lr=0.016,
                                 weight_decay=0.05, warmup_epochs=1, crop_size=64, crop_scale=[0.35, 1.0],
                                 val_resize=64, hflip=0.0, eval_every=2),
    # A few hundred steps on 4,000 images: the key encoder must follow faster (m 0.99, as MoCo's CIFAR
    # setting; at 0.999 it stays ~90 % random for the first epochs) and the queue must hold far fewer keys
    # than there are images, or it is full of the images' own earlier keys.
    ("demo", "mocov2"): dict(arch="resnet18", epochs=10, batch_size=64, optimizer="sgd", lr=0.24,
                             weight_decay=5e-4, warmup_epochs=1, crop_size=64, crop_scale=[0.2, 1.0],
                             val_resize=64, hflip=0.5, eval_every=2, queue_size=1024, moco_momentum=0.99,
                             blur_sigma=[0.1, 2.0], jitter_strength=0.5, grayscale=0.2),
    ("imagenet", "supervised"): dict(arch="resnet50", epochs=90, batch_size=32, optimizer="sgd", lr=0.1,
                                     weight_decay=1e-4, warmup_epochs=0, crop_size=224, crop_scale=[0.08, 1.0],
                                     val_resize=256, hflip=0.5, eval_every=1),
    ("imagenet", "mocov2"): dict(arch="resnet50", epochs=200, batch_size=32, optimizer="sgd", lr=0.03,
                                 weight_decay=1e-4, warmup_epochs=0, crop_size=224, crop_scale=[0.2, 1.0],
                                 val_resize=256, hflip=0.5, eval_every=10, queue_size=65536,
                                 moco_momentum=0.999, blur_sigma=[0.1, 2.0], jitter_strength=0.5, grayscale=0.2),
}


def preset_defaults(preset, method):
    return PRESETS[(preset, method)]


def get_args_parser():
    p = runbook_parser("train_image.py", __doc__, preset_keys=("preset", "method"), presets=preset_defaults)
    d = p.add_argument_group("data (default: the embedded demo dataset's object-centric set)")
    d.add_argument("--train", help="training images: an ImageNet-style folder <class>/<image> "
                   "(for mocov2 the classes are ignored and any folder tree works)")
    d.add_argument("--val", help="validation folder <class>/<image>: top-1 (supervised) or k-NN top-1 (mocov2)")
    d.add_argument("--knn-train", help="labelled folder whose features form the k-NN bank for mocov2 "
                   "(default: --train when it has class folders)")
    d.add_argument("--demo-root", default="data/demo", help="where the demo dataset lives / is built")
    d.add_argument("--workers", type=workers_count, default="auto", help=WORKERS_HELP)

    m = p.add_argument_group("method and model (defaults: --preset's for --method)")
    m.add_argument("--method", choices=["supervised", "mocov2"], default="supervised",
                   help="classification with labels, or MoCo v2 without")
    m.add_argument("--preset", choices=sorted({k[0] for k in PRESETS}), default="demo",
                   help="model, schedule and crop-size preset (with --method)")
    m.add_argument("--arch", choices=BACKBONES, metavar="NAME", help="the torchvision classifier to train: "
                   + " / ".join(BACKBONES))
    m.add_argument("--init", metavar="WEIGHTS", help="start from these backbone weights: a checkpoint path "
                   "(ours, torchvision, MoCo, SwAV, DINO, DenseCL layouts) or torchvision:<Enum>.<NAME>")
    m.add_argument("--crop-size", type=int, help="training crop side")
    m.add_argument("--crop-scale", type=float, nargs=2, help="random-resized-crop area range")
    m.add_argument("--val-resize", type=int, help="short side before the centre crop at evaluation")
    m.add_argument("--hflip", type=float, help="horizontal-flip probability (supervised)")
    m.add_argument("--blur-sigma", type=float, nargs=2, metavar=("LO", "HI"),
                   help="Gaussian-blur sigma range in pixels (mocov2)")
    m.add_argument("--jitter-strength", type=float, help="colour-jitter strength s: brightness, contrast and "
                   "saturation 0.8 s, hue 0.2 s (mocov2)")
    m.add_argument("--grayscale", type=float, help="grayscale probability (mocov2)")
    mo = p.add_argument_group("MoCo v2")
    mo.add_argument("--moco-dim", type=int, default=128, help="embedding width of the MLP head")
    mo.add_argument("--queue-size", type=int, help="negative keys kept in the queue")
    mo.add_argument("--moco-momentum", type=float, help="key-encoder EMA momentum (constant)")
    mo.add_argument("--temperature", type=float, default=0.2, help="T of the InfoNCE loss")
    mo.add_argument("--shuffle-splits", type=int, default=8,
                    help="one process: BN groups of the shuffled key batch (shuffle-BN stand-in)")
    mo.add_argument("--knn-k", type=int, default=20, help="neighbours of the k-NN monitor")

    o = p.add_argument_group("optimisation (defaults: --preset's for --method)")
    o.add_argument("--epochs", type=int, help="passes over the training images")
    o.add_argument("--batch-size", type=int, help="images per process per step")
    o.add_argument("--optimizer", choices=["sgd", "adamw"], help="no weight decay on norms and biases")
    o.add_argument("--lr", type=float, help="learning rate for 256 images per step (scaled to the real batch)")
    o.add_argument("--momentum", type=float, default=0.9, help="SGD momentum")
    o.add_argument("--weight-decay", type=float, help="on weights only")
    o.add_argument("--warmup-epochs", type=float, help="linear warm-up, then cosine decay to zero")

    r = add_run_arguments(p, "outputs/image")
    r.add_argument("--eval-every", type=int, help="evaluate every N epochs (and always after the last)")
    return p


def resolve_data(args, main_proc):
    if args.train is None:
        if main_proc:
            ensure_demo(args.demo_root)
        dist_utils.barrier()
        args.train = os.path.join(args.demo_root, "objects", "train")
        args.val = args.val or os.path.join(args.demo_root, "objects", "val")


def build_datasets(args, log):
    """Training set (one view, or two MoCo views) and, when given, validation and k-NN bank sets."""
    if args.method == "supervised":
        train = ImageFolder(args.train, classification_train_transforms(args.crop_size, args.crop_scale, args.hflip))
        if not train.labeled:
            raise ValueError(f"--method supervised needs class folders <class>/<image> under {args.train} "
                             f"(found {len(train.classes)} classes, {train.unlabeled} images outside them)")
    else:
        view = build_moco_v2_transform(args.crop_size, tuple(args.crop_scale), blur_sigma=args.blur_sigma,
                                       jitter_strength=args.jitter_strength, grayscale=args.grayscale)
        train = ImageFolder(args.train, TwoCrops(view))
    log(f"train: {train.summary()}")
    evaluation = classification_eval_transforms(args.crop_size, args.val_resize)
    val = bank = None
    if args.val:
        val = ImageFolder(args.val, evaluation, classes=train.classes if args.method == "supervised" else None)
        log(f"val: {val.summary()}")
    if args.method == "mocov2" and val is not None:
        bank_root = args.knn_train or args.train
        bank = ImageFolder(bank_root, evaluation)
        if not bank.labeled:
            log(f"k-NN evaluation off: {bank_root} has no class folders (pass --knn-train)")
            bank = val = None
        else:
            val = ImageFolder(args.val, evaluation, classes=bank.classes)
    return train, val, bank


def build_model(args, num_classes, log):
    """A ResNet classifier, or MoCo v2 around one; ``--init`` weights loaded into the ResNet.
    Both return their loss dict (``model(*batch)``) and carry a ``weight_dict``."""
    net = getattr(torchvision.models, args.arch)(weights=None, num_classes=max(num_classes, 1))
    if args.init:
        load_backbone_weights(net, args.init, log=log, arch=args.arch)
    if args.method == "supervised":
        return ImageClassifier(net)
    feature_dim = remove_classifier(net)
    return MoCo(net, feature_dim, dim=args.moco_dim, queue_size=args.queue_size, momentum=args.moco_momentum,
                temperature=args.temperature, shuffle_splits=args.shuffle_splits)


def model_inputs(batches, method, unreadable):
    """``batches`` of ``collate_skipping`` as the model's inputs: ``(images, labels)`` for
    the classifier, ``(im_q, im_k)`` for MoCo. Adds the unreadable images the collate
    dropped (in the data-loading workers, so the count travels with the batch) to
    the tensor ``unreadable``."""
    for images, labels, skipped in batches:
        unreadable += skipped
        yield (images, labels) if method == "supervised" else tuple(images)


def eval_loader(dataset, args, shard=(0, 1)):
    """Batches of every ``shard[1]``-th image starting at ``shard[0]`` (disjoint shards, no padding)."""
    subset = torch.utils.data.Subset(dataset, range(shard[0], len(dataset), shard[1]))
    return torch.utils.data.DataLoader(subset, batch_size=256, num_workers=args.workers,
                                       collate_fn=collate_skipping)


@torch.no_grad()
def evaluate_top1(model, dataset, args, device):
    """Classification top-1 on ``dataset``; each process scores its own shard, counts are summed."""
    model.eval()
    hits, scored = torch.zeros((), device=device), torch.zeros((), device=device)
    for images, labels, _ in eval_loader(dataset, args, (dist_utils.get_rank(), dist_utils.get_world_size())):
        if len(images):
            hits += (model.net(images.to(device)).argmax(1) == labels.to(device)).sum()
            scored += len(labels)
    total = dist_utils.reduce_dict({"hits": hits, "scored": scored}, average=False)
    return (total["hits"] / total["scored"].clamp(min=1)).item()


def evaluate_knn(model, bank, val, args, device):
    """k-NN top-1 of the frozen query backbone's features (bank = labelled training images)."""
    def pairs(dataset):  # (images, labels) of the readable images
        return ((images, labels) for images, labels, _ in eval_loader(dataset, args) if len(images))

    bank_features, bank_labels = extract_features(model.backbone_q, pairs(bank), device)
    val_features, val_labels = extract_features(model.backbone_q, pairs(val), device)
    return knn_top1(bank_features, bank_labels, val_features, val_labels, k=args.knn_k)


def evaluate(model, val, bank, args, device, epoch, history, log):
    """Top-1 (supervised) or k-NN top-1 (MoCo v2) on ``--val`` (nothing without a val set),
    appended to ``history`` and written to metrics.json."""
    if val is None:
        return
    t0 = time.time()
    if args.method == "supervised":
        result = {"top1": evaluate_top1(model, val, args, device)}
    else:  # on the main process only (a few forward passes), the others wait
        knn = evaluate_knn(model, bank, val, args, device) if dist_utils.is_main_process() else None
        result = {"knn_top1": dist_utils.all_gather_object(knn)[0]}
    history.append({"epoch": epoch + 1, **result})
    log(json.dumps({"epoch": epoch + 1, **{k: round(v, 4) for k, v in result.items()},
                    "eval_time": round(time.time() - t0, 1)}))
    if dist_utils.is_main_process():
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(history, f, indent=1)


def build_optimizer(model, args, base_lr):
    """SGD or AdamW, with no weight decay on batch-norm parameters and biases."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim > 1]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim <= 1]
    groups = [{"params": decay, "weight_decay": args.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    if args.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=base_lr, momentum=args.momentum)
    return torch.optim.AdamW(groups, lr=base_lr)


def main(args):
    device, rank, world, log = start_run(args)
    resolve_data(args, dist_utils.is_main_process())
    train, val, bank = build_datasets(args, log)
    model_without_ddp = build_model(args, len(train.classes), log).to(device)
    # MoCo's queue is a buffer, identical on every rank already: no need to broadcast it every step.
    model = dist_utils.wrap_ddp(model_without_ddp, device, broadcast_buffers=args.method == "supervised")

    batches = EpochBatches(train, args.batch_size, args.workers, rank, world, args.seed, shuffle=True,
                           collate_fn=collate_skipping, drop_last=True, max_iters=args.max_iters)
    if len(batches) == 0:
        raise ValueError(f"{len(train)} training images make no full batch of {args.batch_size} per process "
                         f"on {world} process(es); lower --batch-size")
    iters_per_epoch = len(batches)
    total_iters, warmup_iters = args.epochs * iters_per_epoch, int(args.warmup_epochs * iters_per_epoch)
    total_batch = args.batch_size * world
    base_lr = args.lr * total_batch / 256
    optimizer = build_optimizer(model_without_ddp, args, base_lr)
    scaler = grad_scaler(args.amp)

    def lr_fn(step):
        return cosine_lr(step, base_lr, total_iters, warmup_iters)

    history = []
    checkpoint = RunCheckpoint(args.output_dir, model_without_ddp, optimizer, scaler, args, "image",
                               every=args.checkpoint_every, expect={"method": args.method},
                               kind=f"train_image.py --method {args.method}", method=args.method,
                               arch=args.arch, classes=train.classes, history=history)
    resumed = checkpoint.resume(args.resume, log)
    start_epoch, start_iter = resumed.get("epoch", 0), resumed.get("iteration", 0)
    history.extend(resumed.get("history", []))

    log_file = JsonLog(os.path.join(args.output_dir, "log.jsonl"), args.print_freq)
    log(f"{args.method} pre-training of {args.arch} on {len(train)} images, {world} process(es), batch "
        f"{total_batch}, {args.optimizer} lr {base_lr:g}, {args.epochs} epochs of {iters_per_epoch} iterations")
    for epoch in range(start_epoch, args.epochs):
        t0 = time.time()
        loader, unreadable = batches.loader(epoch, start_iter), torch.zeros((), device=device)
        inputs = EpochLoader(model_inputs(loader, args.method, unreadable), loader.start, len(loader))
        means = train_one_epoch(model, optimizer, inputs, device, epoch, lr_fn, scaler, args.amp, log_file, checkpoint)
        start_iter = 0
        unreadable = int(dist_utils.reduce_dict({"n": unreadable}, average=False)["n"].item())
        if unreadable:
            means["skipped_unreadable_images"] = unreadable
            log(f"epoch {epoch}: {unreadable} unreadable images skipped (named above)")
        log(log_file.write_epoch(epoch, time.time() - t0, means))
        if (epoch + 1) % args.eval_every == 0 or epoch + 1 == args.epochs:
            evaluate(model_without_ddp, val, bank, args, device, epoch, history, log)
        checkpoint.save(epoch + 1)
    log_file.close()
    path = os.path.join(args.output_dir, "checkpoint.pth")
    log(f"backbone saved in {path}; next: python train_box.py --init {path}")
    dist_utils.cleanup()


if __name__ == "__main__":
    try:
        main(get_args_parser().parse_args())
    except (FileNotFoundError, CheckpointError, DemoDataError, NonFiniteLossError, ValueError) as e:
        sys.exit(f"train_image.py: error: {e}")
