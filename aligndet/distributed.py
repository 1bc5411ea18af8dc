"""Process-group helpers. Without a process group every helper is a no-op, so
the same script runs as one process or under ``torchrun --nproc_per_node N``.
"""
import os
import time

import torch
import torch.distributed as dist


def init_distributed(backend=None, device=None):
    """Join the process group if launched by torchrun, else run as one process.

    torchrun sets ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK``. The backend is
    nccl when the run uses CUDA, else gloo. ``device`` overrides the default
    (``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``); under torchrun a
    bare ``"cuda"`` becomes ``cuda:LOCAL_RANK``.

    Returns ``dict(rank, world_size, local_rank, device)`` with a ``torch.device``.
    """
    launched = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    rank = int(os.environ["RANK"]) if launched else 0
    world_size = int(os.environ["WORLD_SIZE"]) if launched else 1
    local_rank = int(os.environ.get("LOCAL_RANK", 0)) if launched else 0

    if device is None:
        device = f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda":
        if device.index is None:
            device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)

    if launched and not dist.is_initialized():
        backend = backend or ("nccl" if device.type == "cuda" else "gloo")
        dist.init_process_group(backend=backend, init_method="env://", rank=rank,
                                world_size=world_size,
                                device_id=device if device.type == "cuda" else None)
    return dict(rank=rank, world_size=world_size, local_rank=local_rank, device=device)


def is_dist():
    return dist.is_available() and dist.is_initialized()


def get_rank():
    return dist.get_rank() if is_dist() else 0


def get_world_size():
    return dist.get_world_size() if is_dist() else 1


def is_main_process():
    return get_rank() == 0


def barrier():
    if is_dist():
        dist.barrier()


def all_gather_object(obj):
    """List of ``obj`` from every rank, in rank order (``[obj]`` alone)."""
    if not is_dist():
        return [obj]
    gathered = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


@torch.no_grad()
def reduce_dict(d, average=True):
    """Sum (or mean) scalar tensors over ranks, for logging losses.

    Every rank must pass the same keys; values must live on a device the backend
    handles (CUDA for nccl). Keys are sorted so all ranks stack them alike.
    """
    if get_world_size() == 1:
        return dict(d)
    keys = sorted(d)
    values = torch.stack([d[k].detach().float().reshape(()) for k in keys])  # [len(keys)]
    dist.all_reduce(values)
    if average:
        values /= get_world_size()
    return dict(zip(keys, values))


def wrap_ddp(model, device, **kwargs):
    """``model`` in DistributedDataParallel when there are several processes
    (``device_ids`` set on CUDA), ``model`` itself otherwise; ``kwargs`` go to DDP."""
    if get_world_size() == 1:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(model, device_ids=device_ids, **kwargs)


def cleanup():
    """Leave the process group (a no-op in one process).

    Gloo's worker threads drop their last references to finished collectives a
    moment after the caller has seen them complete; if the interpreter is
    already shutting down then, the process aborts ("terminate called without
    an active exception"). Sleeping releases the GIL so they finish first.
    """
    if is_dist():
        dist.destroy_process_group()
        time.sleep(0.2)
