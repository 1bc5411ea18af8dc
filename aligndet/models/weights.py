"""Backbone import: one loader for every ``--init`` / ``--backbone-weights`` source.

A source is one of
  - ``torchvision:ResNet50_Weights.IMAGENET1K_V2`` (any member of a torchvision
    weights enum, ``.DEFAULT`` included), downloaded once to the torch hub cache;
  - ``imagenet``: the DEFAULT torchvision weights of the architecture being loaded;
  - the path of a checkpoint holding a ResNet somewhere inside it: a bare
    torchvision state dict, ours (``{"backbone": ...}``, ``{"model": ...}``),
    MoCo v1/v2 (``module.encoder_q.``), MoCo v3 (``module.base_encoder.``), SwAV
    (``module.``), DINO (``teacher`` / ``student``), DenseCL / mmselfsup
    (``backbone.``), or a whole detector of ours (``backbone.body.``); for the
    other families the classifier's ``features.*`` under any such prefix, and Swin
    in the original naming of its authors' code, which SimMIM's checkpoints use
    (``encoder.layers.0.blocks.0.attn.qkv.weight``; ``official_swin_names``).

No layout is special-cased. Among the checkpoint and the dicts under a few
usual keys (``state_dict``, ``model``, ``teacher``, ...) we look for the prefix
``P`` such that ``P + <ResNet key>`` names the most tensors of the model; equal
counts go to the encoder that transfers (the query / base / teacher encoder,
not its momentum copy). ``fc.*`` is an ImageNet classifier or a projection
head and never loads; ``num_batches_tracked`` counters load along when both
sides have them (``FrozenBatchNorm2d`` has none) and are never counted.

Checkpoint files are read here (``read_checkpoint``), so a detector copied out
with its siblings in ``models/`` needs nothing else of aligndet; writing them
(atomically, with the training state) is ``aligndet/checkpoint.py``'s job.
"""
import pickle
import re
import zipfile
from collections import Counter
from pathlib import Path

import torch
import torchvision

TORCHVISION = "torchvision:"
RESNET_KEY = re.compile(r"(conv1|bn1|layer\d)\.")  # trunk tensors; fc is the head
FEATURES_KEY = re.compile(r"features\.")  # the trunk of Swin, ConvNeXt, MobileNet; their heads are norm / head /
# classifier
CONTAINERS = ("backbone", "state_dict", "model", "teacher", "student", "network", "module", "encoder")
PREFERRED = {"teacher", "encoder_q", "base_encoder"}  # MoCo's query encoder, MoCo v3's, DINO's teacher
AVOIDED = {"student", "encoder_k", "momentum_encoder"}
MIN_LOADED = 0.5  # refuse a checkpoint that fills less than this fraction of the model
LAYOUTS = {(False, (2, 2, 2, 2)): "resnet18", (False, (3, 4, 6, 3)): "resnet34",
           (True, (3, 4, 6, 3)): "resnet50", (True, (3, 4, 23, 3)): "resnet101", (True, (3, 8, 36, 3)): "resnet152"}
NBT = "num_batches_tracked"
# Buffers that a model computes from its own settings (Swin's window): never counted, never required.
DERIVED = ("relative_position_index",)
# The original Swin code's names (the authors' repository, SimMIM) -> torchvision's, after any prefix:
# patch_embed = features.0 (conv, permute, norm); layers.i.blocks = features.2i+1; layers.i.downsample =
# features.2i+2; the MLP's fc1 / fc2 are torchvision's MLP indices 0 / 3.
OFFICIAL_SWIN = [
    (re.compile(r"(.*?)patch_embed\.proj\.(.+)"), lambda m: f"{m[1]}features.0.0.{m[2]}"),
    (re.compile(r"(.*?)patch_embed\.norm\.(.+)"), lambda m: f"{m[1]}features.0.2.{m[2]}"),
    (re.compile(r"(.*?)layers\.(\d+)\.blocks\.(\d+)\.mlp\.fc([12])\.(.+)"),
     lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}.mlp.{0 if m[4] == '1' else 3}.{m[5]}"),
    (re.compile(r"(.*?)layers\.(\d+)\.blocks\.(\d+)\.(.+)"),
     lambda m: f"{m[1]}features.{2 * int(m[2]) + 1}.{m[3]}.{m[4]}"),
    (re.compile(r"(.*?)layers\.(\d+)\.downsample\.(.+)"), lambda m: f"{m[1]}features.{2 * int(m[2]) + 2}.{m[3]}"),
]


class CheckpointError(RuntimeError):
    """A checkpoint file exists but cannot be read, or holds no weights that fit the model."""


def read_checkpoint(path, map_location="cpu"):
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


def parse_torchvision_weights(spec, arch=None):
    """``"torchvision:ResNet50_Weights.IMAGENET1K_V2"`` (or ``.DEFAULT``) -> that
    torchvision weights enum member; ``"imagenet"`` -> ``arch``'s DEFAULT weights.
    An unknown name raises ``ValueError`` listing the valid ones."""
    if spec == "imagenet":
        if arch is None:
            raise ValueError("'imagenet' needs the architecture name (e.g. resnet50)")
        return torchvision.models.get_model_weights(arch).DEFAULT
    name = spec[len(TORCHVISION):] if spec.startswith(TORCHVISION) else spec
    try:
        return torchvision.models.get_weight(name)
    except (KeyError, ValueError):
        pass
    enum_class = getattr(torchvision.models, name.split(".")[0], None)
    if isinstance(enum_class, type) and issubclass(enum_class, torchvision.models.WeightsEnum):
        classes = [enum_class]
    else:
        resnets = [m for m in torchvision.models.list_models(torchvision.models) if m.startswith("resnet")]
        classes = [torchvision.models.get_model_weights(m) for m in resnets]
    valid = [f"{TORCHVISION}{c.__name__}.{m}" for c in classes for m in [*(w.name for w in c), "DEFAULT"]]
    raise ValueError(f"unknown torchvision weights {name!r}; valid names: {', '.join(valid)}")


def fetch_torchvision_state(weights):
    """The state dict of a torchvision weights enum member, downloaded on first use."""
    try:
        return weights.get_state_dict(progress=True)
    except Exception as e:  # offline, proxy, corrupt download...
        raise CheckpointError(
            f"could not fetch torchvision weights {weights} ({type(e).__name__}: {e}). They download once to "
            f"the torch hub cache ({torch.hub.get_dir()}/checkpoints); offline, download {weights.url} on a "
            f"machine with internet and pass the local file's path to --init (or --backbone-weights)") from None


def extract_backbone_state(checkpoint, arch_keys):
    """Find the ResNet inside a loaded checkpoint.

    arch_keys: the model's state-dict keys (a dict key -> shape is fine); they
    choose the layout. Returns ``(state, layout, dropped)``: the tensors under
    the chosen prefix that have ResNet names (``conv1.weight``,
    ``layer1.0.bn1.running_mean``, ...; ``fc.*`` dropped), a description such
    as ``"under 'state_dict', prefix 'module.encoder_q.'"``, and the other
    keys of that dict (heads, momentum encoders, queues), as they are named there.
    """
    if not isinstance(checkpoint, dict):
        raise CheckpointError(f"expected a dict, found a {type(checkpoint).__name__}")
    pattern = trunk_key(arch_keys)
    if pattern is FEATURES_KEY:  # a Swin in its authors' naming fits a torchvision Swin, and is refused by the rest
        checkpoint = official_swin_names(checkpoint, arch_keys)
    names = {k for k in arch_keys if pattern.match(k)}
    best = None  # ((matches, preference), container, prefix)
    for container in ("", *CONTAINERS):
        tensors = checkpoint if container == "" else checkpoint.get(container)
        if not isinstance(tensors, dict):
            continue
        counts = Counter(prefix for key, value in tensors.items() if torch.is_tensor(value)
                         for prefix in _prefixes(key, names))
        for prefix, n in counts.items():
            parts = set(f"{container}.{prefix}".split("."))
            score = (n, bool(parts & PREFERRED) - bool(parts & AVOIDED))
            if best is None or score > best[0]:
                best = (score, container, prefix)
    if best is None:
        tensors = next((checkpoint[c] for c in CONTAINERS if isinstance(checkpoint.get(c), dict)), checkpoint)
        kind, example = ("ResNet", "conv1.weight") if pattern is RESNET_KEY else \
            ("backbone", next(iter(sorted(names)), "features.0.0.weight"))
        raise CheckpointError(f"neither a detector nor a {kind} state dict: no key ends in a {kind} name such "
                              f"as {example} (first keys: {list(tensors)[:4]})")
    _, container, prefix = best
    tensors = checkpoint if container == "" else checkpoint[container]
    state, dropped = {}, []
    for key, value in tensors.items():
        if not torch.is_tensor(value):
            continue
        name = key[len(prefix):]
        if key.startswith(prefix) and pattern.match(name):
            state[name] = value
        elif not key.endswith(NBT):
            dropped.append(key)
    where = f"under {container!r}" if container else "top level"
    return state, f"{where}, prefix {prefix!r}" if prefix else f"{where}, no prefix", dropped


def official_swin_names(checkpoint, arch_keys):
    """A checkpoint in the Swin authors' naming (``layers.0.blocks.0.attn.qkv.weight``, SimMIM's
    ``encoder.`` + that), renamed to torchvision's (``features.1.0.attn.qkv.weight``) at the top level and in
    each usual container; any other checkpoint is returned as it is.

    The window's relative-position index and the shifted windows' attention masks are dropped (buffers the
    model makes for its own window size). A relative-position bias table of another window size (SimMIM
    pre-trains at window 6, torchvision's Swin has window 7) is resized bicubically per head to the model's,
    as detection codebases do when they fine-tune at another window size.
    """
    rows = {tuple(v)[0] for k, v in arch_keys.items() if k.endswith("relative_position_bias_table")}
    rows = rows.pop() if len(rows) == 1 else None  # one window size in every stage

    def rename(tensors):
        if not any(torch.is_tensor(v) and ".blocks." in k and "layers." in k for k, v in tensors.items()):
            return tensors
        out = {}
        for key, value in tensors.items():
            if key.endswith(("relative_position_index", "attn_mask")):
                continue
            for pattern, new in OFFICIAL_SWIN:
                match = pattern.fullmatch(key) if torch.is_tensor(value) else None
                if match:
                    key = new(match)
                    break
            if key.endswith("relative_position_bias_table") and rows:
                value = _resize_bias_table(value, rows)
            out[key] = value
        return out

    checkpoint = rename(checkpoint)
    return {k: rename(v) if k in CONTAINERS and isinstance(v, dict) else v for k, v in checkpoint.items()}


def _resize_bias_table(table, rows):
    """A Swin relative-position bias table [(2w-1)^2, heads] resized to ``rows`` = (2W-1)^2 entries."""
    if table.shape[0] == rows:
        return table
    old, new = round(table.shape[0] ** 0.5), round(rows ** 0.5)
    grid = table.t().reshape(1, table.shape[1], old, old).float()
    grid = torch.nn.functional.interpolate(grid, size=(new, new), mode="bicubic", align_corners=False)
    return grid.reshape(table.shape[1], rows).t().contiguous().to(table.dtype)


def trunk_key(arch_keys):
    """The pattern of a model's trunk keys: ResNet's (conv1, layer1...) or the ``features.`` of the other
    torchvision families."""
    return RESNET_KEY if any(RESNET_KEY.match(k) for k in arch_keys) else FEATURES_KEY


def _prefixes(key, names):
    """Every P with key == P + name for a name in names: 'module.encoder_q.layer1.0.conv1.weight'
    gives 'module.encoder_q.' (and 'module.encoder_q.layer1.0.', the block's own conv1)."""
    parts = key.split(".")
    for i in range(len(parts)):
        if ".".join(parts[i:]) in names:
            yield "".join(p + "." for p in parts[:i])


def describe_resnet(shapes):
    """'a bottleneck ResNet (has layer1.0.conv3) with blocks [3, 4, 6, 3] and widths
    [256, 512, 1024, 2048], the layout of resnet50', from a dict key -> shape."""
    bottleneck, blocks = _layout(shapes)
    if not any(blocks):
        return "no ResNet stages (no layer1..layer4 keys)"
    last = "conv3" if bottleneck else "conv2"
    widths = []
    for stage, n in enumerate(blocks, start=1):
        shape = shapes.get(f"layer{stage}.{n - 1}.{last}.weight")
        widths.append(None if shape is None else tuple(shape)[0])  # output channels of the stage
    kind = "bottleneck ResNet (has layer1.0.conv3)" if bottleneck else "basic-block ResNet (no layer1.0.conv3)"
    name = LAYOUTS.get((bottleneck, blocks))
    return f"a {kind} with blocks {list(blocks)} and widths {widths}" + (f", the layout of {name}" if name else "")


def resnet_name(shapes):
    """'resnet18' ... 'resnet152' from a state dict's keys, or None."""
    return LAYOUTS.get(_layout(shapes))


def _layout(shapes):
    """(bottleneck?, blocks per stage) of a ResNet state dict."""
    blocks = tuple(len({k.split(".")[1] for k in shapes if k.startswith(f"layer{i}.")}) for i in range(1, 5))
    return "layer1.0.conv3.weight" in shapes, blocks


def load_backbone_weights(resnet, source, log=print, arch=None):
    """Load ``source`` (a checkpoint path, ``torchvision:<Enum>.<MEMBER>`` or
    ``imagenet``) into a torchvision ResNet or our ``ResNetBody`` and print what happened.

    arch: the model's name (for ``imagenet`` and messages); found from its layers when None.
    Raises ``CheckpointError`` naming the mismatch for a ResNet of another
    depth or width (other blocks per stage, a tensor of another shape, trunk
    tensors the model lacks) and for a checkpoint that fills less than half of the model.
    Returns a dict of key lists: loaded, missing (left as initialised),
    unexpected (heads, momentum encoders... of the checkpoint, ignored) and
    mismatched (always empty, as a mismatch refuses the checkpoint).
    """
    own = {k: v.shape for k, v in resnet.state_dict().items()}
    pattern = trunk_key(own)
    own = {k: v for k, v in own.items() if pattern.match(k)}
    arch = arch or resnet_name(own)
    source = str(source)
    if source == "imagenet" or source.startswith(TORCHVISION):
        weights = parse_torchvision_weights(source, arch)
        if arch and type(weights) is not torchvision.models.get_model_weights(arch):
            raise CheckpointError(f"{source} are weights for another architecture; the model is {arch} (valid: "
                                  f"{TORCHVISION}{torchvision.models.get_model_weights(arch).__name__}.DEFAULT)")
        checkpoint = fetch_torchvision_state(weights)
        source = source if source.startswith(TORCHVISION) else f"{source} ({TORCHVISION}{weights})"
    elif not Path(source).is_file():
        raise FileNotFoundError(f"no checkpoint at {source}; backbone weights are a file, "
                                f"{TORCHVISION}<Enum>.<NAME> (e.g. {TORCHVISION}ResNet50_Weights.IMAGENET1K_V2) "
                                f"or imagenet")
    else:
        checkpoint = read_checkpoint(source)
    try:
        state, layout, dropped = extract_backbone_state(checkpoint, own)
    except CheckpointError as e:
        raise CheckpointError(f"{source}: {e}") from None

    loaded = [k for k in state if k in own and state[k].shape == own[k]]
    mismatched = [f"{k} checkpoint {tuple(state[k].shape)} vs model {tuple(own[k])}"
                  for k in state if k in own and state[k].shape != own[k]]
    uncounted = (NBT, *DERIVED)
    extra = [k for k in state if k not in own and not k.endswith(uncounted)]  # trunk tensors the model lacks
    missing = [k for k in own if k not in state and not k.endswith(uncounted)]
    counted = sum(not k.endswith(uncounted) for k in loaded)
    total = sum(not k.endswith(uncounted) for k in own)
    arch = arch or "the model"
    found = {k: v.shape for k, v in state.items()}
    # Another depth or width never loads in part: a half-loaded trunk trains, but badly and silently.
    fits = not mismatched and not extra and _layout(found) == _layout(own) and counted >= MIN_LOADED * total
    if not fits:
        raise CheckpointError(
            f"{source} ({layout}) does not fit {arch}: {counted}/{total} tensors match by name and shape. "
            + (f"The checkpoint holds {describe_resnet(found)}; the model is {describe_resnet(own)}."
               if pattern is RESNET_KEY else "")
            + (f" Shapes differ at {'; '.join(mismatched[:3])}." if mismatched else "")
            + (f" Not in the model: {summarize_keys(extra, _block)}." if extra else "")
            + (f" Missing from the checkpoint: {summarize_keys(missing, _block)}." if missing else ""))
    resnet.load_state_dict({k: state[k] for k in loaded}, strict=False)

    log(f"init backbone {arch} from {source} ({layout})")
    log(f"  loaded {counted}/{total} tensors")
    log(f"  missing (kept as initialised): {len(missing)}: {summarize_keys(missing, _block)}" if missing
        else "  missing: none")
    log(f"  unexpected (ignored): {len(dropped)}: {summarize_keys(dropped, lambda k: _head(k, own))}"
        if dropped else "  unexpected: none")
    return dict(loaded=loaded, missing=missing, unexpected=dropped, mismatched=mismatched)


def summarize_keys(keys, group, shown=12, counts=True):
    """A list of state-dict keys shortened for a log line: 'layer4.1.* (10), bn1.* (4), module.queue'.

    Keys are grouped by ``group(key)`` (e.g. 'layer4.1.conv1.weight' -> 'layer4.1.*'),
    in the order groups first appear. A group of several keys shows as its
    name and how many (the name alone with ``counts=False``), a group of one
    as that key itself. At most ``shown`` groups are listed, then '... (N more)'.
    """
    sizes = Counter(group(k) for k in keys)
    items = [(f"{g} ({n})" if counts else g) if n > 1 else next(k for k in keys if group(k) == g)
             for g, n in sizes.items()]
    return ", ".join(items[:shown]) + (f", ... ({len(items) - shown} more)" if len(items) > shown else "")


def _block(key):
    """A missing key's block: 'layer4.1.conv1.weight' -> 'layer4.1.*', 'bn1.bias' -> 'bn1.*'."""
    parts = key.split(".")
    return ".".join(parts[:min(2, len(parts) - 1)]) + ".*"


def _head(key, names):
    """An unexpected key's group: another copy of the ResNet ('module.encoder_k.*'), a
    head ('module.encoder_q.fc.*', the Sequential index dropped), or the key itself ('module.queue')."""
    prefix = next(_prefixes(key, names), "")
    if prefix:
        return prefix + "*"
    parts = key.split(".")[:-1]
    while parts and parts[-1].isdigit():
        parts.pop()
    return ".".join(parts) + ".*" if len(parts) > 1 else key
