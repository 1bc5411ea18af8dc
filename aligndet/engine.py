"""Train one epoch and evaluate: the loops every script shares."""
import contextlib
import json
import math
import os
import sys
import time

import torch
from tqdm import tqdm

from aligndet.distributed import init_distributed, is_main_process, reduce_dict


def start_run(args):
    """The set-up every script shares: join the process group under torchrun,
    seed per rank, create ``args.output_dir``, turn ``args.amp`` off without CUDA.
    Returns ``(device, rank, world_size, log)``; ``log`` prints on the main process only."""
    info = init_distributed(device=args.device)
    device, rank = info["device"], info["rank"]
    log = print if is_main_process() else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)
    if getattr(args, "workers", 0) == "auto":
        args.workers = default_workers(device)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.amp != "none" and device.type != "cuda":
        log(f"--amp {args.amp} needs CUDA; running in float32 on {device}")
        args.amp = "none"
    return device, rank, info["world_size"], log


def default_workers(device: torch.device) -> int:
    """Data-loading processes for ``--workers auto``: 2 feed a GPU; on a CPU none, since
    the training process's torch threads already take every core and worker processes beside them
    slowed the demo's steps by 10-30 % (benchmarks/RESULTS.md, "make demo"). Stage 2's views are
    the same either way (seeded per image and epoch); the flips and crops of fine-tuning and
    stage 1 draw from the loading process's random stream, so they differ between the two
    settings, reproducibly for each."""
    return 2 if device.type == "cuda" else 0


class NonFiniteLossError(RuntimeError):
    """A loss became NaN or infinite; training stops rather than corrupting weights.
    ``epoch`` and ``iteration`` say where (the failing step was not applied)."""

    def __init__(self, message, epoch=None, iteration=None):
        super().__init__(message)
        self.epoch, self.iteration = epoch, iteration


def step_lr(iteration: int, base_lr: float, iters_per_epoch: int, warmup_iters: int = 500,
            warmup_factor: float = 0.001, steps=(8, 11), gamma: float = 0.1) -> float:
    """Learning rate at a global iteration: linear warm-up from
    base_lr * warmup_factor over warmup_iters, times gamma at each epoch in steps."""
    lr = base_lr * gamma ** sum(iteration >= s * iters_per_epoch for s in steps)
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        lr *= warmup_factor * (1 - alpha) + alpha
    return lr


def cosine_lr(iteration: int, base_lr: float, total_iters: int, warmup_iters: int = 0,
              warmup_factor: float = 0.001) -> float:
    """Learning rate at a global iteration: linear warm-up from base_lr * warmup_factor
    over warmup_iters, then a half cosine from base_lr to 0 at total_iters."""
    if iteration < warmup_iters:
        alpha = iteration / warmup_iters
        return base_lr * (warmup_factor * (1 - alpha) + alpha)
    progress = min((iteration - warmup_iters) / max(total_iters - warmup_iters, 1), 1.0)
    return base_lr * 0.5 * (1.0 + math.cos(math.pi * progress))


class StepLR:
    """``step_lr`` with fixed settings, as ``train_one_epoch``'s ``lr_fn``."""

    def __init__(self, base_lr, iters_per_epoch, warmup_iters, steps):
        self.base_lr, self.iters_per_epoch = base_lr, iters_per_epoch
        self.warmup_iters, self.steps = warmup_iters, steps

    def __call__(self, iteration):
        return step_lr(iteration, self.base_lr, self.iters_per_epoch, self.warmup_iters, steps=self.steps)


def step_schedule_optimizer(model, args, world_size, iters_per_epoch):
    """The optimiser over ``model``'s trainable parameters and its ``StepLR``, from the options of
    ``cli.add_step_schedule_arguments``: SGD with momentum, or AdamW (``args.optimizer``); ``args.lr``
    is per 16 images, scaled linearly to ``args.batch_size x world_size``. ``args.backbone_lr_mult``
    other than 1 puts the backbone's parameters in a group of their own at that multiple of the lr
    (DETR's 0.1); ``train_one_epoch`` keeps the ratio through the schedule."""
    base_lr = args.lr * (args.batch_size * world_size) / 16
    mult = getattr(args, "backbone_lr_mult", 1.0)
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if mult == 1.0:
        groups = [{"params": [p for _, p in trainable]}]
    else:
        in_backbone = [name.startswith("backbone.") or ".backbone." in name for name, _ in trainable]
        groups = [{"params": [p for (_, p), b in zip(trainable, in_backbone) if not b], "lr_mult": 1.0},
                  {"params": [p for (_, p), b in zip(trainable, in_backbone) if b], "lr_mult": mult}]
        groups = [g for g in groups if g["params"]]
    kind = getattr(args, "optimizer", "sgd")
    # foreach: one multi-tensor update instead of a Python loop over the tensors, the default on CUDA only. The
    # result is the same; on a CPU a small model's step is shorter (DETR's demo step: 74 -> 57 ms on one thread).
    if kind == "sgd":
        optimizer = torch.optim.SGD(groups, lr=base_lr, momentum=args.momentum, weight_decay=args.weight_decay,
                                    foreach=True)
    elif kind == "adamw":
        optimizer = torch.optim.AdamW(groups, lr=base_lr, weight_decay=args.weight_decay, foreach=True)
    else:
        raise ValueError(f"unknown optimizer {kind!r}; choose sgd or adamw")
    if getattr(args, "iterations", 0):  # an iteration schedule: steps in iterations of 16 images
        steps = [scaled_iterations(s, args.batch_size * world_size) for s in args.lr_step_iterations]
        return optimizer, StepLR(base_lr, 1, args.warmup_iters, steps)
    return optimizer, StepLR(base_lr, iters_per_epoch, args.warmup_iters, args.lr_steps)


def scaled_iterations(iterations, images_per_step):
    """``iterations`` given for 16 images per step (as ``--lr`` is) at ``images_per_step``: the
    same number of images seen, e.g. the official 12k VOC iterations are 96k at 2 images per step."""
    return max(1, round(iterations * 16 / images_per_step))


def iteration_epochs(total_iterations, iters_per_epoch):
    """The epochs an iteration schedule spans: ``(epochs, iterations of the last epoch)``."""
    epochs = -(-total_iterations // iters_per_epoch)
    return epochs, total_iterations - (epochs - 1) * iters_per_epoch


def grad_scaler(amp):
    """The loss scaler fp16 training needs on CUDA; None otherwise."""
    return torch.amp.GradScaler("cuda") if amp == "fp16" else None


def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA ("bf16" / "fp16"); a no-op otherwise."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(batch, device):
    """``batch`` with every tensor inside it (nested lists, tuples, dicts) moved to ``device``."""
    if torch.is_tensor(batch):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


class EpochBatches:
    """This process's batches, one epoch at a time, resumable mid-epoch.

    The order is a DistributedSampler's (seeded by seed and epoch, so it is
    the same after a restart). ``len()`` is the number of iterations of an
    epoch: ``max_iters`` caps it (smoke tests), in this one place. A dataset
    with ``set_epoch`` (the two-view dataset, whose random views depend on the
    epoch) is told the epoch. Each batch is what ``collate_fn`` returns: the
    positional inputs of the model (``model(*batch)``).
    """

    def __init__(self, dataset, batch_size, workers, rank, world_size, seed, shuffle, collate_fn, drop_last=False,
                 max_iters=None):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.collate_fn, self.drop_last, self.max_iters = collate_fn, drop_last, max_iters
        self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                           shuffle=shuffle, seed=seed, drop_last=False)

    def __len__(self):
        if self.drop_last:  # only full batches (batch norm cannot train on one image)
            full = len(self.sampler) // self.batch_size
        else:
            full = -(-len(self.sampler) // self.batch_size)
        return full if self.max_iters is None else min(full, self.max_iters)

    def loader(self, epoch=0, start=0, stop=None):
        """The batches of ``epoch`` from batch ``start`` on (up to batch ``stop``, when a schedule
        ends mid-epoch): an iterable with ``len()`` (iterations of the whole epoch), ``start`` and
        ``stop``; ``start`` skips trained batches without loading their images."""
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        indices = list(self.sampler)[start * self.batch_size:]
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        stop = len(self) if stop is None else min(stop, len(self))
        batches = batches[:max(stop - start, 0)]
        loader = torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                             collate_fn=self.collate_fn, persistent_workers=False)
        return EpochLoader(loader, start, len(self), stop)


class EpochLoader:
    """An iterable of batches that knows where in its epoch it starts (``start``) and
    stops (``stop``), and how many iterations the whole epoch has (``len()``)."""

    def __init__(self, batches, start, length, stop=None):
        self.batches, self.start, self.length = batches, start, length
        self.stop = length if stop is None else stop

    def __iter__(self):
        return iter(self.batches)

    def __len__(self):
        return self.length


class JsonLog:
    """``log.jsonl`` of a run: one JSON object per line, written by the main process
    only; ``train_one_epoch`` writes every ``every``-th iteration and the last."""

    def __init__(self, path, every=20):
        self.every = every
        self.file = open(path, "a") if is_main_process() else None

    def write(self, record):
        if self.file is not None:
            self.file.write(json.dumps(record) + "\n")
            self.file.flush()

    def write_epoch(self, epoch, seconds, means):
        """Write the record of a finished epoch (its seconds and its training means as ``train_<name>``);
        return its means to five significant digits as one JSON line for the console."""
        self.write({"epoch": epoch, "epoch_time": round(seconds, 1), **{f"train_{k}": v for k, v in means.items()}})
        return json.dumps({"epoch": epoch, **{k: float(f"{v:.5g}") for k, v in means.items()}})

    def close(self):
        if self.file is not None:
            self.file.close()


def batch_image_ids(batch):
    """The ``image_id``s of a batch whose last element is per-image dicts (targets, view metas)."""
    last = batch[-1] if isinstance(batch, (list, tuple)) and batch else None
    if isinstance(last, (list, tuple)) and all(isinstance(t, dict) for t in last):
        return [t.get("image_id") for t in last]
    return []


def train_one_epoch(model, optimizer, batches, device, epoch, lr_fn, scaler=None, amp="none", log=None,
                    checkpoint=None, clip_grad_norm=0.0):
    """One pass over ``batches`` (an ``EpochBatches.loader``): ``model(*batch)`` returns a
    dict; its ``loss*`` terms, scaled by the model's ``weight_dict``, are optimised and
    every entry is logged. ``lr_fn(global_iteration)`` sets the learning rate before a
    step; the model's ``after_step(step)`` (momentum updates) runs after each optimiser
    step and may return values to log. ``checkpoint`` (a ``RunCheckpoint``) saves every
    ``checkpoint.every`` iterations, and the last finite weights if a loss is not
    finite. ``clip_grad_norm`` > 0 clips the gradients' global L2 norm before each step (DETR).
    A batch with no image is skipped. Returns the epoch's mean of every value."""
    model.train()
    core = model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
    iters = len(batches)
    sums, count, skipped, start = {}, 0, 0, time.time()
    bar = tqdm(batches, total=getattr(batches, "stop", iters), initial=batches.start, desc=f"epoch {epoch}",
               disable=not is_main_process(), dynamic_ncols=True, file=sys.stdout)
    for iteration, batch in enumerate(bar, start=batches.start):
        if len(batch[0]) == 0:  # every image of the batch was unreadable
            skipped += 1
            continue
        step = epoch * iters + iteration
        lr = lr_fn(step)
        for group in optimizer.param_groups:
            group["lr"] = lr * group.get("lr_mult", 1.0)
        with autocast(device, amp):
            outputs = model(*to_device(batch, device))
        loss, total, logged = weighted_loss(outputs, core.weight_dict)
        if not math.isfinite(total):
            saved = checkpoint.save(epoch, iteration, "checkpoint_before_nonfinite.pth") if checkpoint else None
            raise NonFiniteLossError(
                f"loss is {total} at epoch {epoch}, iteration {iteration} (images {batch_image_ids(batch)}): "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in logged.items())
                + ". Try a lower --lr or longer --warmup-iters." + (f" Weights before this step: {saved}" if saved
                                                                    else ""), epoch, iteration)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            if clip_grad_norm > 0:
                scaler.unscale_(optimizer)
                clip_gradients(optimizer, clip_grad_norm)
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            if clip_grad_norm > 0:
                clip_gradients(optimizer, clip_grad_norm)
            optimizer.step()
        after = core.after_step(step + 1) if hasattr(core, "after_step") else None
        record = {"loss": total, **{k: v.item() for k, v in logged.items()}, "lr": lr, **(after or {})}
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
        if log is not None and (iteration % log.every == 0 or iteration == iters - 1):
            log.write({"epoch": epoch, "iter": iteration, **record, "time": round(time.time() - start, 2)})
        if checkpoint is not None and checkpoint.every and (iteration + 1) % checkpoint.every == 0 \
                and iteration + 1 < iters:
            checkpoint.save(epoch, iteration + 1)
    bar.close()
    means = {k: v / max(count, 1) for k, v in sums.items()}
    if skipped:
        means["skipped_batches"] = skipped
    return means


def clip_gradients(optimizer, max_norm):
    """Clip the global L2 norm of the gradients of every parameter ``optimizer`` steps."""
    params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
    torch.nn.utils.clip_grad_norm_(params, max_norm)


def weighted_loss(outputs, weight_dict):
    """(the loss to optimise, its value averaged over processes, every output averaged over
    processes and detached). Every ``loss*`` term must have a weight in ``weight_dict``."""
    missing = [k for k in outputs if k.startswith("loss") and k not in weight_dict]
    if missing:
        raise KeyError(f"loss terms without a weight in the model's weight_dict: {', '.join(missing)}")
    terms = [k for k in outputs if k.startswith("loss")]
    loss = sum(outputs[k] * weight_dict[k] for k in terms)
    logged = reduce_dict({k: v.detach().float() for k, v in outputs.items()})
    total = sum(logged[k] * weight_dict[k] for k in terms).item()
    return loss, total, logged


@torch.no_grad()
def evaluate(model, batches, evaluator, device, amp: str = "none", total=None, verbose=True) -> dict:
    """Runs `model` (unwrapped from DDP) over `batches` of (images, targets),
    feeds detections to `evaluator` (CocoEvaluator) and returns its stats."""
    model.eval()
    for images, targets in tqdm(batches, total=total, desc="eval", disable=not is_main_process(),
                                dynamic_ncols=True, file=sys.stdout):
        if not images:
            continue
        images = to_device(images, device)
        with autocast(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in o.items()} for o in outputs]
        evaluator.update(targets, outputs)
    evaluator.synchronize()
    return evaluator.summarize(verbose=verbose)
