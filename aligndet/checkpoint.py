"""Checkpoints: plain dicts (``model``, ``optimizer``, ``epoch``, ``args``, ...) that
``torch.load(path, weights_only=True)`` reads, written atomically so a crash
mid-write never leaves a half file under the real name.

``weights_only=True`` only unpickles tensors, containers and primitives, so
``args`` is stored as ``args_to_dict(args)``, never as an ``argparse.Namespace``.
Save from the main process only (``aligndet.distributed.is_main_process()``).
"""
import argparse
import enum
import os
import pickle
import tempfile
import zipfile
from pathlib import Path

import numpy as np
import torch

CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)  # atomic on POSIX and Windows within one filesystem
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def load_checkpoint(path, map_location="cpu"):
    """Read a checkpoint dict with ``weights_only=True``.

    Raises ``FileNotFoundError`` if there is no file and ``CheckpointError``
    naming the file if it cannot be read (truncated, partial write, or holding
    objects other than tensors, containers and primitives).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no checkpoint at {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only" in str(e).lower():
            raise CheckpointError(
                f"checkpoint {path} holds objects that weights_only=True refuses to load "
                f"(store args with args_to_dict): {e}") from e
        raise CheckpointError(f"cannot read checkpoint {path}; it may be truncated or a "
                              f"partial write: {e}") from e
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"cannot read checkpoint {path}; it may be truncated or a "
                              f"partial write: {type(e).__name__}: {e}") from e


def latest_checkpoint(output_dir):
    """``output_dir/checkpoint.pth`` if it exists, else ``None`` (for ``--resume``)."""
    path = Path(output_dir) / CHECKPOINT_NAME
    return path if path.is_file() else None


def args_to_dict(args):
    """argparse values as JSON-able primitives, for ``state["args"]``.

    Paths, dtypes and devices become strings, tuples and sets lists, numpy
    scalars python numbers, enums their values; anything else falls back to ``str``.
    """
    if isinstance(args, argparse.Namespace):
        args = vars(args)
    return _to_primitive(args)


def _to_primitive(value):
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, dict):
        return {str(k): _to_primitive(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        items = sorted(value, key=str) if isinstance(value, (set, frozenset)) else value
        return [_to_primitive(v) for v in items]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, enum.Enum):
        return _to_primitive(value.value)
    if isinstance(value, argparse.Namespace):
        return _to_primitive(vars(value))
    return str(value)  # Path, torch.dtype, torch.device, ...
