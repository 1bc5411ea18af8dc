"""The momentum (EMA) copy of a network: AlignDet's momentum detector f_k
(DESIGN.md section 3.2) and MoCo's key encoder share this.

After every optimiser step, ``theta_k <- m * theta_k + (1 - m) * theta_q`` over
parameters, buffers copied, with ``m`` rising on a half cosine from ``base``
(0.996) to 1 over the run (BYOL's schedule, used by AlignDet):

    m(step) = 1 - (1 - base) * (cos(pi * step / total_steps) + 1) / 2
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
    """

    def __init__(self, online: nn.Module, target: nn.Module, base=0.996, total_steps=1, skip=()):
        self.online, self.target, self.skip = online, target, tuple(skip)
        self.base, self.total_steps = base, total_steps
        self._pairs()  # check the names now

    def _pairs(self):
        """(online tensors, target tensors) for parameters, then for buffers. Looked
        up on every call: ``module.to(device)`` replaces buffer tensors."""
        pairs = []
        for kind in ("named_parameters", "named_buffers"):
            ours = {n: t for n, t in getattr(self.online, kind)() if not n.startswith(self.skip)}
            theirs = dict(getattr(self.target, kind)())
            if ours.keys() != theirs.keys():
                differ = sorted(set(ours) ^ set(theirs))
                raise ValueError(f"online and momentum networks differ in {kind[6:]}, e.g. {differ[:3]}")
            pairs.append(([ours[n] for n in ours], [theirs[n] for n in ours]))
        return pairs

    @torch.no_grad()
    def update(self, step):
        """One EMA step at optimiser step ``step``; returns the momentum used."""
        m = momentum_at(step, self.total_steps, self.base)
        (online, target), (online_buffers, target_buffers) = self._pairs()
        if target:
            torch._foreach_mul_(target, m)
            torch._foreach_add_(target, online, alpha=1.0 - m)
        for t, o in zip(target_buffers, online_buffers):
            t.copy_(o)
        return m
