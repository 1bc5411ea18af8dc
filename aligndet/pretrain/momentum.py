"""The momentum (EMA) copy of a network: AlignDet's momentum detector f_k
(docs/method.md §3.2) and MoCo's key encoder share this.

After every optimiser step, ``theta_k <- m * theta_k + (1 - m) * theta_q`` over
parameters. By default buffers are copied and ``m`` rises on a half cosine
from ``base`` (0.996) to 1 over the run (BYOL's schedule, used by AlignDet):

    m(step) = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2

MoCo v2 instead keeps ``m = base = 0.999`` constant (``schedule="constant"``)
and lets its key encoder keep its own batch-norm statistics
(``copy_buffers=False``; see ``moco.py`` for why). Parameters named in ``copy_params``
are copied at every update instead of averaged (``m = 0`` for them): DETR's
momentum detector takes the online ``query_embed`` as it is (docs/method.md §3.2).
"""
import copy
import math

import torch
from torch import nn


def momentum_at(step, total_steps, base=0.996):
    """EMA momentum at optimiser step ``step`` of ``total_steps``."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def make_momentum_copy(module: nn.Module) -> nn.Module:
    """An exact copy of ``module`` that the optimiser never touches."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


class MomentumUpdater:
    """Moves ``target``'s parameters towards ``online``'s after each step.

    Both must have the same parameter and buffer names (a momentum copy does),
    apart from ``online``'s names starting with a prefix in ``skip`` (parts the
    two share instead, such as AlignDet's frozen backbone).

    Args:
        schedule: "cosine" (``momentum_at``: base -> 1 over ``total_steps``) or
            "constant" (``base`` at every step; ``total_steps`` is unused).
        copy_buffers: copy ``online``'s buffers (batch-norm running statistics)
            into ``target`` at every update; False leaves ``target``'s own.
        copy_params: name prefixes of parameters copied from ``online`` at every update
            instead of averaged (DETR's ``query_embed.``).
    """

    SCHEDULES = ("cosine", "constant")

    def __init__(self, online: nn.Module, target: nn.Module, base=0.996, total_steps=1, skip=(),
                 schedule="cosine", copy_buffers=True, copy_params=()):
        if schedule not in self.SCHEDULES:
            raise ValueError(f"unknown momentum schedule {schedule!r}; choose one of {', '.join(self.SCHEDULES)}")
        self.online, self.target, self.skip, self.copy_params = online, target, tuple(skip), tuple(copy_params)
        self.base, self.total_steps = base, total_steps
        self.schedule, self.copy_buffers = schedule, copy_buffers
        _, copied, _ = self._pairs()  # check the names now
        if self.copy_params and not copied[0]:
            raise ValueError(f"no parameter of the online network starts with {', '.join(self.copy_params)}")

    def momentum(self, step):
        """EMA momentum at optimiser step ``step``."""
        return self.base if self.schedule == "constant" else momentum_at(step, self.total_steps, self.base)

    def _pairs(self):
        """(online tensors, target tensors) for the averaged parameters, the copied parameters and
        the buffers. Looked up on every call: ``module.to(device)`` replaces buffer tensors."""
        averaged, copied, buffers = ([], []), ([], []), ([], [])
        for kind in ("named_parameters", "named_buffers"):
            ours = {n: t for n, t in getattr(self.online, kind)() if not n.startswith(self.skip)}
            theirs = dict(getattr(self.target, kind)())
            if ours.keys() != theirs.keys():
                differ = sorted(set(ours) ^ set(theirs))
                raise ValueError(f"online and momentum networks differ in {kind[6:]}, e.g. {differ[:3]}")
            for n in ours:
                group = buffers if kind == "named_buffers" else copied if n.startswith(self.copy_params) else averaged
                group[0].append(ours[n])
                group[1].append(theirs[n])
        return averaged, copied, buffers

    @torch.no_grad()
    def update(self, step):
        """One EMA step at optimiser step ``step``; returns the momentum used."""
        m = self.momentum(step)
        (online, target), copied, buffers = self._pairs()
        if target:
            torch._foreach_mul_(target, m)
            torch._foreach_add_(target, online, alpha=1.0 - m)
        for o, t in zip(*copied):
            t.copy_(o)
        if self.copy_buffers:
            for o, t in zip(*buffers):
                t.copy_(o)
        return m
