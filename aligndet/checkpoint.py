"""Checkpoints: plain dicts (``model``, ``optimizer``, ``epoch``, ``args``, ...) that
``torch.load(path, weights_only=True)`` reads, written atomically so a crash
mid-write never leaves a half file under the real name.

``weights_only=True`` only unpickles tensors, containers and primitives, so
``args`` is stored as ``args_to_dict(args)``, never as an ``argparse.Namespace``.
Save from the main process only (``aligndet.distributed.is_main_process()``).
"""
import argparse
import enum
import pickle
import zipfile
from pathlib import Path

import numpy as np
import torch

from aligndet.atomic import atomic_write

CHECKPOINT_NAME = "checkpoint.pth"


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read."""


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    return Path(atomic_write(path, lambda f: torch.save(state, f)))


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


def _state_dict_of(checkpoint):
    """The weights inside a checkpoint: its ``backbone`` or ``model`` entry, or
    the checkpoint itself when it is a bare state dict."""
    for key in ("backbone", "model", "state_dict"):
        if isinstance(checkpoint.get(key), dict):
            return checkpoint[key]
    return checkpoint


def load_pretrained(model, path, keep_heads=False, log=print, detector=None):
    """Initialise ``model`` from a stage checkpoint or an imported backbone and print what happened.

    Accepted sources (AlignDet's transfer, DESIGN section 3.8):
      - a detector checkpoint (box-domain stage 2, or any of ours): a
        detector state dict, under ``model`` or bare (keys ``backbone.body...``,
        ``rpn...``, ``roi_heads...``); loaded whole, except the layers named in
        ``model.OUTPUT_LAYERS`` (final classification / regression layers),
        which stay re-initialised unless ``keep_heads``. Keys the model does
        not have (e.g. the pre-training embedding MLP) are reported as
        unexpected and ignored; tensors whose shape differs are re-initialised;
      - anything else ``aligndet.models.weights.load_backbone_weights`` reads
        (image-domain stage 1 ``{"backbone": ...}``, MoCo / SwAV / DINO /
        DenseCL checkpoints, ``torchvision:ResNet50_Weights.IMAGENET1K_V2``,
        ``imagenet``); loaded into ``model.backbone.body``.

    ``detector``: the registry name of ``model``; a train_box.py / finetune.py
    checkpoint of another detector is refused (it would load only the backbone
    and part of the neck).

    Returns a dict of key lists: loaded, reinitialised, unexpected, mismatched.
    """
    checkpoint = load_checkpoint(path) if Path(path).is_file() else None
    if detector and isinstance(checkpoint, dict) and checkpoint.get("stage") in ("box", "finetune"):
        saved = checkpoint.get("detector") or (checkpoint.get("args") or {}).get("detector")
        if saved and saved != detector:
            raise CheckpointError(f"{path} holds a {saved} ({checkpoint['stage']} stage); pass --detector {saved} "
                                  f"(got --detector {detector})")
    state = _state_dict_of(checkpoint) if isinstance(checkpoint, dict) else None
    if state and any(k.startswith("backbone.body.") for k in state):
        return _load_detector(model, path, state, keep_heads, log)
    # Imported here: aligndet.models imports this module (for CheckpointError, load_checkpoint).
    from aligndet.models.weights import load_backbone_weights

    report = load_backbone_weights(model.backbone.body, path, log)
    loaded = ["backbone.body." + k for k in report["loaded"]]
    reinitialised = [k for k in model.state_dict() if k not in loaded and not k.endswith("num_batches_tracked")]
    rest = [k for k in reinitialised if not k.startswith("backbone.body.")]
    if rest:
        log(f"  rest of the model (initialised as usual): {', '.join(_collapse(rest, depth=2))}")
    return dict(loaded=loaded, reinitialised=reinitialised, unexpected=report["unexpected"],
                mismatched=["backbone.body." + m for m in report["mismatched"]])


def _load_detector(model, path, state, keep_heads, log):
    if not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    own = model.state_dict()
    skip = () if keep_heads else tuple(getattr(model, "OUTPUT_LAYERS", ()))
    loaded, unexpected, mismatched, new_state = [], [], [], {}
    for key, value in state.items():
        if key not in own:
            unexpected.append(key)
        elif key.startswith(skip):
            continue
        elif own[key].shape != value.shape:
            mismatched.append(f"{key} {tuple(value.shape)} vs {tuple(own[key].shape)}")
        else:
            new_state[key] = value
            loaded.append(key)
    model.load_state_dict(new_state, strict=False)
    reinitialised = [k for k in own if k not in new_state and not k.endswith("num_batches_tracked")]
    if not loaded:
        raise CheckpointError(f"{path}: no tensor matches the model; is it for another architecture?")
    report = dict(loaded=loaded, reinitialised=reinitialised, unexpected=unexpected, mismatched=mismatched)
    groups = {}
    for key in loaded:
        group = ".".join(key.split(".")[:2]) if key.startswith("backbone.") else key.split(".")[0]
        groups[group] = groups.get(group, 0) + 1
    log(f"init from {path} (detector weights): loaded {len(loaded)} tensors "
        f"({', '.join(f'{g}: {n}' for g, n in groups.items())})")
    for name, keys in (("re-initialised", reinitialised), ("unexpected (ignored)", unexpected),
                       ("shape mismatch (re-initialised)", mismatched)):
        if keys:
            shown = ", ".join(_collapse(keys)[:12])
            log(f"  {name}: {len(keys)}: {shown}")
    return report


def _collapse(keys, depth=None):
    """Group keys by module for a short report: 'roi_heads.box_predictor.*'
    (with ``depth``, by their first ``depth`` names: 'roi_heads.box_head.*')."""
    out = []
    for key in keys:
        head = key.split(" ")[0].rsplit(".", 1)[0]
        head = ".".join(head.split(".")[:depth]) + ".*"
        if head not in out:
            out.append(head)
    return out
