"""Photometric view augmentations (aligndet.data.views): each op changes only
the image, the magnitude mapping of a few ops, and RandomPhotometric's draws.
"""
import numpy as np
import pytest
import torch
from torchvision import tv_tensors

from aligndet.data.views import PHOTOMETRIC_OPS, RandomPhotometric, apply_photometric


@pytest.mark.parametrize("op", PHOTOMETRIC_OPS)
def test_photometric_ops_change_only_the_image(op):
    rng = np.random.default_rng(0)
    for size in ((1, 1), (3, 5), (12, 9)):
        image = tv_tensors.Image(torch.from_numpy(rng.integers(0, 256, (3, *size), dtype=np.uint8)))
        for magnitude in (1, 5, 9):
            for sign in (1, -1):
                out = apply_photometric(image, op, magnitude, sign)
                assert out.dtype == torch.uint8 and out.shape == image.shape
                if op == "identity":
                    assert torch.equal(out, image)

    boxes = tv_tensors.BoundingBoxes([[1.5, 2, 7, 9], [0, 0, 9, 12]], format="XYXY",
                                     canvas_size=(12, 9))
    sample = {"image": image, "boxes": boxes, "ids": torch.arange(2)}
    for seed in range(5):
        torch.manual_seed(seed)
        out = RandomPhotometric(ops=(op,))(sample)
        assert isinstance(out["boxes"], tv_tensors.BoundingBoxes)
        assert torch.equal(out["boxes"], boxes) and out["boxes"].canvas_size == (12, 9)
        assert torch.equal(out["ids"], torch.arange(2))
        assert out["image"].dtype == torch.uint8


def test_photometric_magnitude_mapping_and_draws():
    image = tv_tensors.Image(torch.arange(256, dtype=torch.uint8).reshape(1, 1, 256).expand(3, 1, 256))
    # solarize, magnitude 5: pixels >= 128 are inverted
    out = apply_photometric(image, "solarize", 5)[0, 0]
    assert torch.equal(out[:128], image[0, 0, :128]) and torch.equal(out[128:], 255 - image[0, 0, 128:])
    # posterize keeps 8 - round(4 * level) bits: 8 at magnitude 1, 4 at magnitude 9
    assert torch.equal(apply_photometric(image, "posterize", 1), image)
    assert torch.equal(apply_photometric(image, "posterize", 9), image & 0xF0)
    # brightness factor 1 +- 0.9 * level
    pixel = tv_tensors.Image(torch.full((3, 1, 1), 100, dtype=torch.uint8))
    assert apply_photometric(pixel, "brightness", 5, sign=1).flatten().tolist() == [145] * 3
    assert apply_photometric(pixel, "brightness", 5, sign=-1).flatten().tolist() == [55] * 3
    with pytest.raises(ValueError, match="unknown"):
        apply_photometric(image, "blur", 5)

    torch.manual_seed(0)
    draws = [RandomPhotometric().make_params([]) for _ in range(400)]
    assert {d["op"] for d in draws} == set(PHOTOMETRIC_OPS)
    assert {d["magnitude"] for d in draws} == set(range(1, 10))
    assert {d["sign"] for d in draws} == {1, -1}
