"""The copy-out rule: a detector module (with its siblings in aligndet/models/),
pretrain/losses.py and pretrain/momentum.py import only torch, torchvision,
numpy/scipy/OpenCV, the standard library and their own siblings, so each can be
copied into another repo; and aligndet has no import cycle.

Each module is imported in a fresh interpreter in which checkpoint files,
distributed helpers, data, the engine and the scripts cannot be imported, and
then does real work. The import graph is read with ``ast``.
"""
import ast
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BLOCKED = ("aligndet.checkpoint", "aligndet.distributed", "aligndet.atomic", "aligndet.data", "aligndet.engine",
           "finetune", "train_box", "train_image")
THIRD_PARTY = {"torch", "torchvision", "numpy", "scipy", "cv2"}
TIMEOUT = 120

PREAMBLE = f"""
import sys
for name in {BLOCKED!r}:
    sys.modules[name] = None  # importing it now raises ImportError
import torch
torch.set_num_threads(1)
torch.manual_seed(0)
image = torch.rand(3, 64, 64)
masks = torch.zeros(1, 64, 64, dtype=torch.uint8)
masks[0, 12:48, 10:38] = 1  # the instance mask, for Mask R-CNN (the other detectors ignore it)
target = {{"boxes": torch.tensor([[8.0, 10.0, 40.0, 50.0]]), "labels": torch.tensor([1]), "masks": masks}}  # xyxy px

def check(model):
    losses = model.train()([image], [target])
    assert losses and all(torch.isfinite(v) for v in losses.values()), losses
    with torch.no_grad():
        (out,) = model.eval()([image])
    assert out["boxes"].shape[1:] == (4,) and len(out["boxes"]) == len(out["scores"]) == len(out["labels"])
"""
# FCOS's towers always use GroupNorm(32): 64 channels leave 2 values per group on the 1x1 P7 of a 64 px image.
TINY = 'backbone="resnet18", min_size=64, max_size=64, fpn_channels={}'
CHECKS = {
    "aligndet.models.faster_rcnn": f"""
import tempfile, torchvision
from aligndet.models.faster_rcnn import build_faster_rcnn
with tempfile.NamedTemporaryFile(suffix=".pth") as f:  # backbone weights read by models/weights.py alone
    torch.save(torchvision.models.resnet18().state_dict(), f.name)
    check(build_faster_rcnn(2, backbone_weights=f.name, {TINY.format(32)}))
""",
    "aligndet.models.retinanet": f"from aligndet.models.retinanet import build_retinanet\n"
                                 f"check(build_retinanet(2, {TINY.format(32)}))",
    "aligndet.models.fcos": f"from aligndet.models.fcos import build_fcos\ncheck(build_fcos(2, {TINY.format(64)}))",
    "aligndet.models.mask_rcnn": f"from aligndet.models.mask_rcnn import build_mask_rcnn\n"
                                 f"check(build_mask_rcnn(2, {TINY.format(32)}, mask_layers=(16, 16), mask_hidden=16))",
    "aligndet.models": f"import inspect\nfrom aligndet.models import DETECTORS, build_detector\n"
                       f"for name in DETECTORS:\n"
                       f"    fpn = 'fpn_channels' in inspect.signature(DETECTORS[name]).parameters\n"
                       f"    check(build_detector(name, 2, {TINY.format(64)}) if fpn else\n"
                       f"          build_detector(name, 2, backbone='resnet18', min_size=64, max_size=64))",
    "aligndet.pretrain.losses": """
from aligndet.pretrain.losses import box_contrastive_loss
q = torch.randn(6, 16, requires_grad=True)  # [Nq, D] online embeddings
q_ids, k, k_ids = torch.tensor([0, 1, 2, -1, 1, 3]), torch.randn(5, 16), torch.tensor([0, 1, 2, 3, -1])
loss = box_contrastive_loss(q, q_ids, k, k_ids)
loss.backward()
assert torch.isfinite(loss) and loss > 0 and torch.isfinite(q.grad).all()
""",
    "aligndet.pretrain.momentum": """
from aligndet.pretrain.momentum import MomentumUpdater, make_momentum_copy
online = torch.nn.Linear(4, 3)
target = make_momentum_copy(online)
assert not any(p.requires_grad for p in target.parameters())
before = [p.clone() for p in target.parameters()]
with torch.no_grad():
    for p in online.parameters():
        p.add_(1.0)
m = MomentumUpdater(online, target, base=0.9, schedule="constant").update(0)
assert m == 0.9
for old, new, theta_q in zip(before, target.parameters(), online.parameters()):
    torch.testing.assert_close(new, m * old + (1 - m) * theta_q)  # theta_k <- m theta_k + (1 - m) theta_q
""",
}


@pytest.fixture(scope="module")
def started():
    """Every check, started at once: torch's import dominates, and side by side they take the time of a few."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    procs = {module: subprocess.Popen([sys.executable, "-c", PREAMBLE + code + f"\nprint('copy-out ok', {module!r})"],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for module, code in CHECKS.items()}
    yield procs
    for proc in procs.values():
        with proc:  # closes the pipes and waits
            proc.kill()  # a no-op once it has exited


@pytest.mark.parametrize("module", CHECKS)
def test_module_runs_without_the_rest_of_aligndet(started, module):
    try:
        out, err = started[module].communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{module}: no answer in {TIMEOUT} s")
    assert started[module].returncode == 0, err
    assert f"copy-out ok {module}" in out


# ---------------------------------------------------------------------------
# The import graph
# ---------------------------------------------------------------------------

def _name(path):
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_name(p): p for p in sorted((ROOT / "aligndet").rglob("*.py"))}


def _module_level(nodes):
    """The statements that run at import: everything but function bodies."""
    for node in nodes:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
            yield from _module_level(ast.iter_child_nodes(node))


def _imports(module, everywhere=False):
    """Top-level names of the third-party and standard modules ``module`` imports, and the
    aligndet modules it imports (relative imports resolved; 'from pkg import mod' names pkg.mod)."""
    tree = ast.parse(MODULES[module].read_text())
    nodes = ast.walk(tree) if everywhere else _module_level(tree.body)
    package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
    outside, ours = set(), set()
    for node in nodes:
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # '.' is the package, '..' its parent
                parent = package.rsplit(".", node.level - 1)[0]
                base = f"{parent}.{base}" if base else parent
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
        else:
            continue
        for target in targets:
            if target.split(".")[0] != "aligndet":
                outside.add(target.split(".")[0])
                continue
            while target not in MODULES:  # an attribute, not a module: its module
                target = target.rpartition(".")[0]
            ours.add(target)
    return outside, ours


def _edges(module):
    """What importing ``module`` runs: the modules it imports and their packages' __init__
    files, except its own packages' (already being imported when it runs, so only a name
    taken from them, 'from aligndet.models import X', depends on them)."""
    ancestors = {".".join(module.split(".")[:i]) for i in range(1, module.count(".") + 1)}
    edges = set()
    for target in _imports(module)[1]:
        parts = target.split(".")
        edges |= {target} | {".".join(parts[:i]) for i in range(1, len(parts))} - ancestors
    return edges - {module}


def _cycle(graph):
    """One import cycle as a list of modules (the first repeated at the end), or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycle():
    graph = {module: _edges(module) for module in MODULES}
    assert len(graph) > 20 and "aligndet.models.faster_rcnn" in graph["aligndet.models"]
    cycle = _cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def test_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": set()}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


COPIED_OUT = [m for m in MODULES if m.startswith("aligndet.models")] + ["aligndet.pretrain.losses",
                                                                         "aligndet.pretrain.momentum"]


@pytest.mark.parametrize("module", COPIED_OUT)
def test_copied_modules_import_only_torch_numpy_and_siblings(module):
    outside, ours = _imports(module, everywhere=True)  # a function-level import breaks a copy too
    models = {m for m in MODULES if m.startswith("aligndet.models")}
    allowed = models if module in models else set()  # losses.py and momentum.py: no aligndet at all
    assert ours <= allowed, f"{module} imports {sorted(ours - allowed)}"
    others = outside - THIRD_PARTY - sys.stdlib_module_names
    assert not others, f"{module} imports {sorted(others)}"
