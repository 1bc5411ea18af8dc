"""benchmarks/moco_probe.py's controls: plain digits and the SimCLR loss."""
import math
import os
import sys

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from moco_probe import InBatchMoCo, SimCLR, plain_layers  # noqa: E402


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


def test_in_batch_moco_contrasts_queue_and_the_batch_keys_and_m_zero_makes_the_key_encoder_the_query_one():
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 8))
    model = InBatchMoCo(encoder, 8, dim=4, queue_size=2, momentum=0.0, temperature=0.5, shuffle_splits=1).train()
    a, b = torch.randn(3, 3, 2, 2), torch.randn(3, 3, 2, 2)
    queue = model.queue.clone()
    out = model(a, b)
    q = F.normalize(model.encoder_q(a), dim=1).detach()
    k = F.normalize(model.encoder_k(b), dim=1).detach()
    losses = []
    for i in range(3):  # positive: its own key; negatives: the 2 queued keys and the batch's 2 other keys
        logits = [float(q[i] @ k[i])] + [float(q[i] @ queue[:, c]) for c in range(2)]
        logits += [float(q[i] @ k[j]) for j in range(3) if j != i]
        logits = [x / 0.5 for x in logits]
        losses.append(-logits[0] + math.log(sum(math.exp(x) for x in logits)))
    assert math.isclose(out["loss_contrastive"].item(), sum(losses) / 3, rel_tol=1e-5)
    assert torch.allclose(model.queue, k[[2, 1]].T)  # the newest 2 keys, FIFO past the end: key 2 wraps to column 0
    before = [p.detach().clone() for p in model.encoder_q.parameters()]
    out["loss_contrastive"].backward()
    torch.optim.SGD(model.encoder_q.parameters(), lr=1.0).step()
    assert any(not torch.equal(p, old) for p, old in zip(model.encoder_q.parameters(), before))
    model.after_step(0)
    for query, key in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        assert torch.equal(query, key)  # m = 0: the key encoder is the query encoder after every step
