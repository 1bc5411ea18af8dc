"""Momentum detector (docs/method.md §3.1, 3.2): the momentum schedule, the
momentum copy and its update, checked against the formula on small modules.
"""
import pytest
import torch
from torch import nn

from aligndet.pretrain.momentum import MomentumUpdater, make_momentum_copy, momentum_at


# ---------------------------------------------------------------------------
# 1. Momentum schedule
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("base", [0.996, 0.99, 0.5])
def test_momentum_schedule(base):
    total = 37
    assert momentum_at(0, total, base) == pytest.approx(base, abs=1e-12)
    assert momentum_at(total, total, base) == pytest.approx(1.0, abs=1e-12)
    values = [momentum_at(step, total, base) for step in range(total + 1)]
    assert all(b >= a for a, b in zip(values, values[1:]))
    assert all(base - 1e-12 <= v <= 1.0 + 1e-12 for v in values)
    assert momentum_at(50, 100, base) == pytest.approx(1 - (1 - base) / 2, abs=1e-12)
    # Out-of-range steps clamp to the ends.
    assert momentum_at(-5, total, base) == pytest.approx(base, abs=1e-12)
    assert momentum_at(total + 10, total, base) == pytest.approx(1.0, abs=1e-12)


def test_momentum_default_base():
    assert momentum_at(0, 10) == pytest.approx(0.996, abs=1e-12)


# ---------------------------------------------------------------------------
# 2. Momentum copy and update
# ---------------------------------------------------------------------------

def small_detector(extra_layer=False):
    layers = [nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)]
    if extra_layer:
        layers.append(nn.Linear(2, 2))
    return nn.Sequential(*layers).double()


def test_make_momentum_copy():
    torch.manual_seed(0)
    online = small_detector()
    online(torch.randn(8, 3, dtype=torch.float64))  # non-trivial BN buffers
    target = make_momentum_copy(online)
    assert target is not online
    online_state, target_state = online.state_dict(), target.state_dict()
    assert online_state.keys() == target_state.keys()
    for key in online_state:
        assert torch.equal(online_state[key], target_state[key]), key
    for (name, p_online), (_, p_target) in zip(online.named_parameters(), target.named_parameters()):
        assert p_online.requires_grad, name  # the online copy is untouched
        assert not p_target.requires_grad, name
        assert p_target.data_ptr() != p_online.data_ptr(), name
    with torch.no_grad():
        next(online.parameters()).add_(1.0)
    assert not torch.equal(next(online.parameters()), next(target.parameters()))


def test_momentum_updater_follows_formula_and_copies_buffers():
    torch.manual_seed(1)
    online = small_detector()
    target = make_momentum_copy(online)
    total, base = 10, 0.9
    updater = MomentumUpdater(online, target, base=base, total_steps=total)
    for step in (0, 3, total):
        with torch.no_grad():  # the optimiser moved online; target differs from it
            for p in online.parameters():
                p.add_(torch.randn_like(p))
        online.train()(torch.randn(16, 3, dtype=torch.float64))  # BN running stats change
        old = {n: p.detach().clone() for n, p in target.named_parameters()}
        online_before = {k: v.clone() for k, v in online.state_dict().items()}

        m = updater.update(step)

        assert float(m) == pytest.approx(momentum_at(step, total, base), abs=1e-12)
        online_params = dict(online.named_parameters())
        for name, p in target.named_parameters():
            expected = m * old[name] + (1 - m) * online_params[name].detach()
            torch.testing.assert_close(p.detach(), expected, atol=1e-7, rtol=0, msg=name)
            assert not p.requires_grad, name
        for (name, b_online), (_, b_target) in zip(online.named_buffers(), target.named_buffers()):
            assert torch.equal(b_target, b_online), name
        for key, value in online.state_dict().items():
            assert torch.equal(value, online_before[key]), key  # online untouched
        if step == total:  # m = 1: parameters frozen, buffers still copied
            for name, p in target.named_parameters():
                assert torch.equal(p.detach(), old[name]), name


def test_momentum_update_records_no_graph():
    online = small_detector()
    target = make_momentum_copy(online)
    MomentumUpdater(online, target, total_steps=5).update(1)
    assert all(p.grad_fn is None and not p.requires_grad for p in target.parameters())


@pytest.mark.parametrize("online_extra, target_extra", [(False, True), (True, False)])
def test_momentum_updater_rejects_mismatched_parameters(online_extra, target_extra):
    online = small_detector(extra_layer=online_extra)
    target = small_detector(extra_layer=target_extra)
    for p in target.parameters():
        p.requires_grad_(False)
    with pytest.raises(ValueError, match=r"4\.(weight|bias)"):
        MomentumUpdater(online, target, total_steps=10).update(0)
