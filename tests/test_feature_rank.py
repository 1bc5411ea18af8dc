"""benchmarks/feature_rank.py: the effective rank it reports, and that it reads both towers."""
import os
import sys

import pytest
import torch

from aligndet.models import build_detector

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks"))
from feature_rank import effective_rank, tower_ranks, two_stage_ranks  # noqa: E402


def test_effective_rank_counts_the_directions_the_data_uses():
    g = torch.Generator().manual_seed(0)
    line = torch.randn(500, 1, generator=g) * torch.randn(1, 16, generator=g)  # one direction
    assert effective_rank(line) == pytest.approx(1, abs=0.01)
    two = torch.randn(4000, 2, generator=g) @ torch.linalg.qr(torch.randn(16, 16, generator=g))[0][:2]
    assert effective_rank(two) == pytest.approx(2, abs=0.1)
    assert 14 < effective_rank(torch.randn(4000, 16, generator=g)) <= 16


def test_tower_ranks_of_a_random_fcos_are_near_full():
    torch.manual_seed(0)
    model = build_detector("fcos", 3, backbone="resnet18", norm="bn", trainable_layers=5, fpn_channels=32,
                           min_size=64, max_size=64)
    images = [torch.rand(3, 64, 64) for _ in range(2)]
    ranks, channels = tower_ranks(model, images)
    assert channels == 32 and set(ranks) == {(t, lv) for t in ("classification_head", "regression_head")
                                             for lv in (0, 1)}
    assert all(1 <= r <= 32 for r in ranks.values())
    assert ranks[("classification_head", 0)] > 16  # a random tower keeps most directions
    assert not model.head.classification_head.conv._forward_hooks  # hooks removed


def test_two_stage_ranks_read_the_box_head_and_the_rpn():
    torch.manual_seed(0)
    model = build_detector("faster_rcnn", 3, backbone="resnet18", norm="bn", trainable_layers=5, fpn_channels=16,
                           representation_size=64, min_size=64, max_size=64, rpn_post_nms_top_n_test=50)
    ranks, width = two_stage_ranks(model, [torch.rand(3, 64, 64) for _ in range(2)])
    assert width == 64 and set(ranks) == {("box_head", None), ("rpn", 0), ("rpn", 1)}
    assert 1 <= ranks[("box_head", None)] <= 64 and all(1 <= ranks[("rpn", lv)] <= 16 for lv in (0, 1))
    assert ranks[("rpn", 0)] > 8  # a random conv keeps most directions
    assert not model.roi_heads.box_head._forward_hooks and not model.rpn.head.conv._forward_hooks
