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


def add_run_arguments(parser, output_dir):
    """The "run" options every script shares (``start_run`` reads them); returns the
    group so a script can add its own (evaluation, ...)."""
    r = parser.add_argument_group("run")
    r.add_argument("--output-dir", default=output_dir)
    r.add_argument("--resume", nargs="?", const="auto", default=None,
                   help="continue from --output-dir's checkpoint (or the given file)")
    r.add_argument("--checkpoint-every", type=int, default=0, help="also save every N iterations (0: per epoch)")
    r.add_argument("--max-iters", type=int, default=None, help="cap iterations per epoch (smoke tests)")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    r.add_argument("--amp", choices=["none", "bf16", "fp16"], default="none", help="mixed precision (CUDA only)")
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--print-freq", type=int, default=20, help="log every N iterations")
    return r


def start_run(args):
    """The set-up every script shares: join the process group under torchrun,
    seed per rank, create ``args.output_dir``, turn ``args.amp`` off without CUDA.
    Returns ``(device, rank, world_size, log)``; ``log`` prints on the main process only."""
    info = init_distributed(device=args.device)
    device, rank = info["device"], info["rank"]
    log = print if is_main_process() else (lambda *a, **k: None)
    torch.manual_seed(args.seed + rank)
    os.makedirs(args.output_dir, exist_ok=True)
    if args.amp != "none" and device.type != "cuda":
        log(f"--amp {args.amp} needs CUDA; running in float32 on {device}")
        args.amp = "none"
    return device, rank, info["world_size"], log


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


def autocast(device: torch.device, amp: str):
    """Mixed precision on CUDA ("bf16" / "fp16"); a no-op otherwise."""
    if amp == "none" or device.type != "cuda":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if amp == "bf16" else torch.float16)


def to_device(images, targets, device):
    images = [im.to(device, non_blocking=True) for im in images]
    targets = [{k: (v.to(device, non_blocking=True) if torch.is_tensor(v) else v) for k, v in t.items()}
               for t in targets]
    return images, targets


class EpochBatches:
    """This process's batches for one epoch, resumable mid-epoch.

    The order is a DistributedSampler's (seeded by seed and epoch, so it is
    the same after a restart); `start` skips the batches already trained
    without loading their images. A dataset with ``set_epoch`` (the two-view
    dataset, whose random views depend on the epoch) is told the epoch.
    """

    def __init__(self, dataset, batch_size, workers, rank, world_size, seed, shuffle, collate_fn, drop_last=False):
        self.dataset, self.batch_size, self.workers = dataset, batch_size, workers
        self.collate_fn, self.drop_last = collate_fn, drop_last
        self.sampler = torch.utils.data.DistributedSampler(dataset, num_replicas=world_size, rank=rank,
                                                           shuffle=shuffle, seed=seed, drop_last=False)

    def __len__(self):
        if self.drop_last:  # only full batches (batch norm cannot train on one image)
            return len(self.sampler) // self.batch_size
        return -(-len(self.sampler) // self.batch_size)

    def loader(self, epoch=0, start=0):
        self.sampler.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):
            self.dataset.set_epoch(epoch)
        indices = list(self.sampler)[start * self.batch_size:]
        batches = [indices[i:i + self.batch_size] for i in range(0, len(indices), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return torch.utils.data.DataLoader(self.dataset, batch_sampler=batches, num_workers=self.workers,
                                           collate_fn=self.collate_fn, persistent_workers=False)


def detection_step(model, batch, device):
    """A supervised step on ``(images, targets)``: (loss dict, image ids)."""
    images, targets = to_device(*batch, device)
    return model(images, targets), [t.get("image_id") for t in targets]


def train_one_epoch(model, optimizer, batches, device, epoch: int, lr_at, start_iter: int = 0,
                    iters_per_epoch: int = None, amp: str = "none", scaler=None, weight_dict=None,
                    log_file=None, print_freq: int = 20, on_iteration=None, max_iters: int = None,
                    step_fn=detection_step):
    """One pass over `batches`.

    step_fn(model, batch, device) -> (dict, image ids) runs the model on one
    batch: ``detection_step`` for (images, targets) batches, or
    ``aligndet.pretrain.box.box_domain_step``. Entries named ``loss*`` are
    summed (scaled by weight_dict, default 1) and optimised; the others are
    only logged. A batch whose first element is empty (every image unreadable)
    is skipped. lr_at(global_iteration) sets the learning rate before every
    step; on_iteration(iteration) runs after every step (momentum updates,
    periodic checkpoints). Returns the epoch's mean of every logged value.
    """
    model.train()
    weight_dict = weight_dict or {}
    sums, count, skipped = {}, 0, 0
    bar = tqdm(batches, total=iters_per_epoch, initial=start_iter, desc=f"epoch {epoch}",
               disable=not is_main_process(), dynamic_ncols=True, file=sys.stdout)
    start = time.time()
    for iteration, batch in enumerate(bar, start=start_iter):
        if max_iters is not None and iteration >= max_iters:
            break
        if len(batch[0]) == 0:  # every image of the batch was unreadable
            skipped += 1
            continue
        global_iter = epoch * iters_per_epoch + iteration
        lr = lr_at(global_iter)
        for group in optimizer.param_groups:
            group["lr"] = lr
        with autocast(device, amp):
            outputs, image_ids = step_fn(model, batch, device)
        losses = {k: v for k, v in outputs.items() if k.startswith("loss")}
        loss = sum(losses[k] * weight_dict.get(k, 1.0) for k in losses)
        logged = reduce_dict({k: v.detach().float() for k, v in outputs.items()})
        total = sum(logged[k] for k in losses).item()
        if not math.isfinite(total):
            raise NonFiniteLossError(
                f"loss is {total} at epoch {epoch}, iteration {iteration} (images {image_ids}): "
                + ", ".join(f"{k}={v.item():.4g}" for k, v in logged.items())
                + ". Try a lower --lr or longer --warmup-iters.", epoch, iteration)
        optimizer.zero_grad(set_to_none=True)
        if scaler is not None:
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
        else:
            loss.backward()
            optimizer.step()
        record = {"loss": total, **{k: v.item() for k, v in logged.items()}, "lr": lr}
        for k, v in record.items():
            sums[k] = sums.get(k, 0.0) + v
        count += 1
        if is_main_process():
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{lr:.2e}")
            if log_file is not None and (iteration % print_freq == 0 or iteration == iters_per_epoch - 1):
                line = {"epoch": epoch, "iter": iteration, **record, "time": round(time.time() - start, 2)}
                log_file.write(json.dumps(line) + "\n")
                log_file.flush()
        if on_iteration is not None:
            on_iteration(iteration)
    bar.close()
    means = {k: v / max(count, 1) for k, v in sums.items()}
    if skipped:
        means["skipped_batches"] = skipped
    return means


@torch.no_grad()
def evaluate(model, batches, evaluator, device, amp: str = "none", total=None, verbose=True) -> dict:
    """Runs `model` (unwrapped from DDP) over `batches` of (images, targets),
    feeds detections to `evaluator` (CocoEvaluator) and returns its stats."""
    model.eval()
    for images, targets in tqdm(batches, total=total, desc="eval", disable=not is_main_process(),
                                dynamic_ncols=True, file=sys.stdout):
        if not images:
            continue
        images, _ = to_device(images, [], device)
        with autocast(device, amp):
            outputs = model(images)
        outputs = [{k: v.float().cpu() if k != "labels" else v.cpu() for k, v in o.items()} for o in outputs]
        evaluator.update(targets, outputs)
    evaluator.synchronize()
    return evaluator.summarize(verbose=verbose)
