"""benchmarks/moco_probe.py's controls: plain digits and the SimCLR loss."""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from moco_probe import SimCLR, plain_layers  # noqa: E402


def test_plain_layers_keep_the_digit_and_drop_photo_and_colour():
    rng = np.random.default_rng(0)
    alpha = rng.random((64, 64)).astype(np.float32)
    layers = [(rng.random((64, 64, 3)).astype(np.float32) * 255, alpha, np.float32([10, 200, 30]), 7)]
    (background, kept, colour, label), = plain_layers(layers)
    assert not background.any() and background.shape == (64, 64, 3)
    assert kept is alpha and label == 7 and colour.tolist() == [255.0] * 3


def test_simclr_loss_matches_a_loop_over_the_two_b_views():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    model = SimCLR(encoder, 8, dim=4, temperature=0.5)
    a, b = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    out = model(a, b)
    z = F.normalize(model.head(encoder(torch.cat([a, b]))), dim=1).detach()
    losses, correct = [], 0
    for i in range(6):
        j = (i + 3) % 6  # the other view of image i % 3
        others = [m for m in range(6) if m != i]
        sims = {m: float(z[i] @ z[m]) / 0.5 for m in others}
        losses.append(-sims[j] + math.log(sum(math.exp(s) for s in sims.values())))
        correct += max(sims, key=sims.get) == j
    assert math.isclose(out["loss_contrastive"].item(), sum(losses) / 6, rel_tol=1e-5)
    assert math.isclose(out["acc_top1"].item(), correct / 6)
    out["loss_contrastive"].backward()
    assert encoder[1].weight.grad is not None and encoder[1].weight.grad.abs().sum() > 0
