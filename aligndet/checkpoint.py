"""Checkpoints: plain dicts (``model``, ``optimizer``, ``epoch``, ``args``, ...) that
``torch.load(path, weights_only=True)`` reads, written atomically so a crash
mid-write never leaves a half file under the real name.

``weights_only=True`` only unpickles tensors, containers and primitives, so
``args`` is stored as ``args_to_dict(args)``, never as an ``argparse.Namespace``.
Save from the main process only (``aligndet.distributed.is_main_process()``);
``RunCheckpoint`` does, and resumes a training run.

Reading lives in ``aligndet/models/weights.py`` (``read_checkpoint``, exported
here as ``load_checkpoint``), so the detectors load weights without this module.
"""
import argparse
import enum
from pathlib import Path

import numpy as np
import torch

from aligndet.atomic import atomic_write
from aligndet.distributed import is_main_process
from aligndet.models.weights import CheckpointError, load_backbone_weights, summarize_keys
from aligndet.models.weights import read_checkpoint as load_checkpoint

__all__ = ["CHECKPOINT_NAME", "CheckpointError", "args_to_dict", "latest_checkpoint", "load_checkpoint",
           "load_detector", "load_finetuned_detector", "load_pretrained", "save_checkpoint", "RunCheckpoint"]

CHECKPOINT_NAME = "checkpoint.pth"


def save_checkpoint(state, path):
    """Write ``state`` to ``path`` atomically: temp file in the same folder, fsync, rename."""
    return Path(atomic_write(path, lambda f: torch.save(state, f)))


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


def load_pretrained(model, path, keep_heads=False, log=print, detector=None, skip=(), box_skip=(),
                    category_ids=None, backbone=None):
    """Initialise ``model`` from a stage checkpoint or an imported backbone and print what happened.

    Accepted sources (AlignDet's transfer, docs/method.md §3.8):
      - a detector checkpoint (box-domain stage 2, or any of ours): a
        detector state dict, under ``model`` or bare (keys ``backbone.body...``,
        ``rpn...``, ``roi_heads...``); loaded whole, except the layers named in
        ``model.OUTPUT_LAYERS`` (final classification / regression layers),
        which stay re-initialised unless ``keep_heads``. Keys the model does
        not have (e.g. the pre-training embedding MLP) are reported as
        unexpected and ignored; tensors whose shape differs are re-initialised;
      - a DETR checkpoint in the layout of the reference release (``detr-r50-e632da11.pth``:
        ``backbone.0.body.*``, ``transformer.*``, ``query_embed.weight``), converted by
        ``aligndet.models.detr.detr_state_dict_from_reference`` and loaded as above;
        ``category_ids`` (the release's class index of each label 1..K, i.e. the COCO
        category ids) keeps those rows of its class head for ``keep_heads``;
      - anything else ``aligndet.models.weights.load_backbone_weights`` reads
        (image-domain stage 1 ``{"backbone": ...}``, MoCo / SwAV / DINO /
        DenseCL checkpoints, ``torchvision:ResNet50_Weights.IMAGENET1K_V2``,
        ``imagenet``); loaded into ``model.backbone.body``.

    ``skip``: more key prefixes to leave at their initialisation when the source is a detector
    checkpoint (e.g. ``("head.classification_head.",)``: transfer the regression tower only);
    backbone weights ignore it. ``box_skip``: the same, for a box-domain (train_box.py,
    ``stage: "box"``) checkpoint only; other detector checkpoints and backbone weights load
    without it (the demo one-stage presets' transfer, docs/method.md §3.8).

    Returns a dict of key lists: loaded, reinitialised, unexpected, mismatched, and
    ``source``: "detector" or "backbone".

    ``detector``: the registry name of ``model``; a train_box.py / finetune.py
    checkpoint of another detector (but Faster R-CNN's for Mask R-CNN) is refused (it would load only the backbone
    and part of the neck). ``backbone``: the name of ``model``'s trunk; one of our checkpoints made
    on another (its ``args.backbone``, or ``args.arch`` for train_image.py) is refused before loading.
    """
    checkpoint = load_checkpoint(path) if Path(path).is_file() else None
    if backbone and isinstance(checkpoint, dict) and checkpoint.get("stage") in ("image", "box", "finetune"):
        args = checkpoint.get("args") or {}
        saved = args.get("backbone") or args.get("arch")
        if saved and saved != backbone:
            raise CheckpointError(f"{path} was made on a {saved} backbone ({checkpoint['stage']} stage) but the "
                                  f"model has a {backbone}; pass --backbone {saved}")
    if detector and isinstance(checkpoint, dict) and checkpoint.get("stage") in ("box", "finetune"):
        saved = checkpoint.get("detector") or (checkpoint.get("args") or {}).get("detector")
        # Mask R-CNN fine-tunes from Faster R-CNN's checkpoints (its box-domain stage is theirs; mask head fresh).
        if saved and saved != detector and (saved, detector) != ("faster_rcnn", "mask_rcnn"):
            raise CheckpointError(f"{path} holds a {saved} ({checkpoint['stage']} stage); pass --detector {saved} "
                                  f"(got --detector {detector})")
    state = _state_dict_of(checkpoint) if isinstance(checkpoint, dict) else None
    if state and "query_embed.weight" in state and any(k.startswith("backbone.0.body.") for k in state):
        from aligndet.models.detr import detr_state_dict_from_reference

        log(f"{path}: a DETR in the reference release's layout")
        state = detr_state_dict_from_reference(state, category_ids if keep_heads else None)
    if state and any(k.startswith("backbone.body.") for k in state):
        box = isinstance(checkpoint, dict) and checkpoint.get("stage") == "box"
        if box and box_skip:
            log(f"  box-domain checkpoint: leaving {', '.join(box_skip)} at initialisation (--box-init-skip)")
        return _load_detector(model, path, state, keep_heads, log, tuple(skip) + (tuple(box_skip) if box else ()))
    report = load_backbone_weights(model.backbone.body, path, log)
    loaded = ["backbone.body." + k for k in report["loaded"]]
    reinitialised = [k for k in model.state_dict() if k not in loaded and not k.endswith("num_batches_tracked")]
    rest = [k for k in reinitialised if not k.startswith("backbone.body.")]
    if rest:
        shown = summarize_keys(rest, lambda k: _module(k, depth=2), counts=False)
        log(f"  rest of the model (initialised as usual): {shown}")
    return dict(loaded=loaded, reinitialised=reinitialised, unexpected=report["unexpected"],
                mismatched=["backbone.body." + m for m in report["mismatched"]], source="backbone")


def _load_detector(model, path, state, keep_heads, log, more_skip=()):
    if not all(torch.is_tensor(v) for v in state.values()):
        raise CheckpointError(f"{path} holds no state dict of tensors")
    own = model.state_dict()
    unknown = [p for p in more_skip if not any(k.startswith(p) for k in own)]
    if unknown:
        raise CheckpointError(f"no key of the model starts with {', '.join(unknown)} (e.g. {next(iter(own))})")
    skip = (() if keep_heads else tuple(getattr(model, "OUTPUT_LAYERS", ()))) + more_skip
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
    report = dict(loaded=loaded, reinitialised=reinitialised, unexpected=unexpected, mismatched=mismatched,
                  source="detector")
    groups = {}
    for key in loaded:
        group = ".".join(key.split(".")[:2]) if key.startswith("backbone.") else key.split(".")[0]
        groups[group] = groups.get(group, 0) + 1
    log(f"init from {path} (detector weights): loaded {len(loaded)} tensors "
        f"({', '.join(f'{g}: {n}' for g, n in groups.items())})")
    for name, keys in (("re-initialised", reinitialised), ("unexpected (ignored)", unexpected),
                       ("shape mismatch (re-initialised)", mismatched)):
        if keys:
            log(f"  {name}: {len(keys)}: {summarize_keys(keys, _module)}")
    return report


def _module(key, depth=None):
    """A key's module, to group keys in a log line: 'roi_heads.box_predictor.cls_score.*'
    (with ``depth``, its first ``depth`` names: 'roi_heads.box_predictor.*'). A
    mismatch entry 'key (1024, 2) vs (1024, 3)' groups by its key."""
    head = key.split(" ")[0].rsplit(".", 1)[0]
    return ".".join(head.split(".")[:depth]) + ".*"


class RunCheckpoint:
    """The resumable state of one training run: ``output_dir/checkpoint.pth``.

    A save holds the model's weights, the optimizer and AMP-scaler states, the
    position (``epoch``, next ``iteration``), ``args`` and ``stage``, plus
    ``fields``: values such as the metrics history, saved as they are at each
    save (a list that grows in place is saved grown). The weights are
    ``model.checkpoint_weights()`` when the model has it (AlignDet saves its
    online detector as "model", the rest as "pretrain"; stage 1 adds
    "backbone"), else ``{"model": model.state_dict()}``; resuming loads them with
    ``model.load_checkpoint_weights(ckpt)`` or ``load_state_dict(ckpt["model"])``.
    Only the main process writes; every process reads.

    Args:
        every: also save every N iterations inside an epoch (0: per epoch only);
            ``engine.train_one_epoch`` calls ``save`` then.
        expect: entries a checkpoint must have to be resumed here besides its
            ``stage``; ``kind`` names such a checkpoint in the refusal of another
            (default: its stage).
    """

    def __init__(self, output_dir, model, optimizer, scaler, args, stage, every=0, expect=None, kind=None,
                 **fields):
        self.output_dir, self.model, self.optimizer, self.scaler = output_dir, model, optimizer, scaler
        self.args, self.stage, self.every = args, stage, every
        self.expect, self.kind = {"stage": stage, **(expect or {})}, kind or f"stage-{stage!r}"
        self.fields = fields

    def save(self, epoch, iteration=0, name=CHECKPOINT_NAME):
        """Write the current state (main process only); returns the path."""
        path = Path(self.output_dir) / name
        if is_main_process():
            weights = (self.model.checkpoint_weights() if hasattr(self.model, "checkpoint_weights")
                       else {"model": self.model.state_dict()})
            save_checkpoint({**weights, "optimizer": self.optimizer.state_dict(),
                             "scaler": self.scaler.state_dict() if self.scaler is not None else {},
                             "epoch": epoch, "iteration": iteration, "args": args_to_dict(self.args),
                             "stage": self.stage, **self.fields}, path)
        return path

    def resume(self, resume, log=print, weights_only=False):
        """``--resume``: None (start fresh), "auto" (``output_dir``'s checkpoint, if any) or
        a path. Loads the weights (and, unless ``weights_only``, the optimizer and
        scaler) and returns the checkpoint dict, or ``{}`` when starting fresh."""
        path = latest_checkpoint(self.output_dir) if resume == "auto" else resume
        if resume == "auto" and path is None:
            log(f"--resume: no checkpoint in {self.output_dir}; starting fresh")
        if not path:
            return {}
        ckpt = load_checkpoint(path)
        if any(ckpt.get(k) != v for k, v in self.expect.items()):
            found = ", ".join(f"{k} {ckpt.get(k)!r}" for k in self.expect)
            raise CheckpointError(f"{path} is not a {self.kind} checkpoint ({found})")
        if hasattr(self.model, "load_checkpoint_weights"):
            self.model.load_checkpoint_weights(ckpt)
        else:
            self.model.load_state_dict(ckpt["model"])
        if not weights_only:
            self.optimizer.load_state_dict(ckpt["optimizer"])
            if self.scaler is not None and ckpt.get("scaler"):
                self.scaler.load_state_dict(ckpt["scaler"])
        log(f"resumed from {path}: epoch {ckpt['epoch']}, iteration {ckpt.get('iteration', 0)}")
        return ckpt


def load_detector(path):
    """The detector of a ``finetune.py`` or ``train_box.py`` checkpoint, ready to predict:
    ``(model, class_names, label_to_cat)`` as ``load_finetuned_detector`` gives them.

    A box-domain checkpoint (``stage: "box"``) gives what stage 2 trained (docs/method.md §3.8):
    Faster R-CNN and FCOS are wrapped in a class-agnostic ``aligndet.objectness.ObjectnessDetector`` (one
    class, "object"), DETR runs as it is over its pseudo-classes (label ``l`` is cluster id ``l - 1`` and is
    named so; category id = label), and RetinaNet, which has no trained score, is refused, as is a stage-1
    checkpoint (a backbone only).
    """
    ckpt = load_checkpoint(path)
    ckpt = ckpt if isinstance(ckpt, dict) else {}
    stage = ckpt.get("stage")
    if stage == "finetune":
        return _finetuned_detector(ckpt, path)
    if stage == "box":
        return _box_domain_detector(ckpt, path)
    if stage == "image" or ("backbone" in ckpt and "model" not in ckpt):
        raise CheckpointError(f"{path}: a stage-1 backbone checkpoint has no detector; pre-train one on it "
                              f"(train_box.py --init {path}) or fine-tune one (finetune.py --init {path}), and "
                              "predict with that checkpoint")
    raise CheckpointError(f"{path} is not a finetune.py or train_box.py checkpoint (stage {stage!r})")


def _box_domain_detector(ckpt, path):
    """A train_box.py checkpoint's online detector, rebuilt as train_box.py built it (load_detector)."""
    from aligndet.models import build_detector
    from aligndet.objectness import ObjectnessDetector
    from aligndet.presets import model_defaults, model_options

    args = ckpt.get("args") or {}
    detector = ckpt.get("detector") or args.get("detector")
    if detector == "retinanet":
        raise CheckpointError(f"{path} is a box-domain RetinaNet: stage 2 trains its box regression only and leaves "
                              "its classifier at its initialisation, so it has no score to rank detections by; "
                              f"fine-tune it first (finetune.py --detector retinanet --init {path}) and predict with "
                              "that checkpoint")
    if detector not in ("faster_rcnn", "fcos", "detr") or "model" not in ckpt:
        raise CheckpointError(f"{path} is not a train_box.py checkpoint of a known detector (detector {detector!r})")
    state = ckpt["model"]
    # DETR has one class per pseudo-class cluster and a "no object" row; the others one class.
    num_classes = state["class_embed.weight"].shape[0] - 1 if detector == "detr" else 1
    defaults = model_defaults(detector, args.get("preset", "demo"))  # train_box.py's architecture for its preset
    options = dict(model_options(detector, defaults), backbone_weights=None)  # the weights come next
    model = build_detector(detector, num_classes, backbone=args.get("backbone") or defaults["backbone"], **options)
    try:
        model.load_state_dict(state)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: its weights do not fit the {detector} of its own args: {e}") from None
    if detector == "detr":
        return model.eval(), [f"cluster {c}" for c in range(num_classes)], {i: i for i in range(1, num_classes + 1)}
    return ObjectnessDetector(model).eval(), list(ObjectnessDetector.CLASS_NAMES), {1: 1}


def load_finetuned_detector(path):
    """The detector of a ``finetune.py`` checkpoint, rebuilt from its own args and weights, in eval mode.

    Returns ``(model, class_names, label_to_cat)``; ``class_names[i - 1]`` names label ``i``.
    """
    return _finetuned_detector(load_checkpoint(path), path)


def _finetuned_detector(ckpt, path):
    from aligndet.models import build_detector
    from aligndet.presets import model_options

    args = ckpt.get("args") or {}
    if ckpt.get("stage") != "finetune" or "detector" not in args:
        raise CheckpointError(f"{path} is not a finetune.py checkpoint (stage {ckpt.get('stage')!r})")
    label_to_cat = {int(k): int(v) for k, v in (ckpt.get("label_to_cat") or {}).items()}
    class_names = list(ckpt.get("class_names") or [])
    num_classes = len(class_names) or len(label_to_cat)
    options = dict(model_options(args["detector"], args), backbone_weights=None)  # the weights come next
    model = build_detector(args["detector"], num_classes, backbone=args["backbone"], **options)
    model.load_state_dict(ckpt["model"])
    return model.eval(), class_names, label_to_cat
