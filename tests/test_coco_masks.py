"""Instance masks from COCO json: polygons, RLE and uncompressed RLE, broken or
missing segmentations counted, and masks that follow the flip and the resize."""
import logging

import numpy as np
import pytest
import torch
from pycocotools import mask as mask_utils

from aligndet.data.coco import CocoDetection
from aligndet.data.masks import decode, encode, segmentation_problem
from aligndet.data.transforms import train_transforms
from aligndet.models.transform import DetectionTransform
from test_coco_data import H, W, ann, write_coco

# A triangle with a notch: polygon [x1, y1, x2, y2, ...] in pixels, inside a 40 x 30 image.
POLYGON = [4.0, 3.0, 30.0, 6.0, 18.0, 12.0, 26.0, 24.0, 6.0, 22.0]


def _raster(polygon, height, width):
    return mask_utils.decode(mask_utils.merge(mask_utils.frPyObjects([polygon], height, width)))


def test_three_encodings_decode_to_the_same_mask():
    truth = _raster(POLYGON, H, W)
    assert truth.sum() > 100
    rle = mask_utils.encode(np.asfortranarray(truth))
    compressed = {"size": [H, W], "counts": rle["counts"].decode("ascii")}
    # Uncompressed RLE: run lengths over the column-major pixels, starting with a run of zeros.
    flat = truth.flatten(order="F")
    changes = np.flatnonzero(np.diff(flat)) + 1
    runs = np.diff(np.concatenate([[0], changes, [flat.size]])).tolist()
    uncompressed = {"size": [H, W], "counts": ([0] if flat[0] else []) + runs}
    for segmentation in ([POLYGON], compressed, uncompressed):
        assert segmentation_problem(segmentation, H, W) is None
        assert np.array_equal(decode(segmentation, H, W), truth)
    assert [r["counts"] for r in encode(truth[None])] == [compressed["counts"]]
    assert encode(np.zeros((0, H, W), np.uint8)) == []


@pytest.mark.parametrize("segmentation, reason", [
    (None, "missing"), ([], "empty polygon"), ([[1.0, 2.0, 3.0]], "malformed polygon"),
    ({"size": [H + 1, W], "counts": "abc"}, "RLE size"), ({"size": [H, W], "counts": [5, 7]}, "run lengths"),
    ({"counts": "abc"}, "malformed RLE"), ("polygon", "unknown segmentation type"),
])
def test_broken_segmentations_are_named(segmentation, reason):
    assert reason in segmentation_problem(segmentation, H, W)


def test_dataset_gives_masks_and_counts_broken_ones(tmp_path, caplog):
    image_dir, ann_file = write_coco(tmp_path, [
        ann(1, [4, 3, 26, 21], segmentation=[POLYGON]),
        ann(1, [0, 0, 10, 10]),  # no segmentation
        ann(1, [5, 5, 10, 10], segmentation={"size": [H + 5, W], "counts": "x"}),  # wrong RLE size
        ann(2, [1, 1, 5, 5], segmentation=[[]]),  # empty polygon
        ann(2, [0, 0, 8, 8], segmentation=[POLYGON], iscrowd=1),  # crowd: ignored like its box
    ])
    with caplog.at_level(logging.WARNING):
        ds = CocoDetection(image_dir, ann_file, masks=True)
    assert "its box is kept, without a mask" in caplog.text
    summary = ds.summary()
    assert (summary["missing_masks"], summary["broken_masks"], summary["crowd"]) == (1, 2, 1)
    assert "1 boxes without a segmentation and 2 with a broken one" in ds.report()
    image, target = ds[0]
    assert target["masks"].dtype == torch.uint8 and target["masks"].shape == (3, H, W)
    assert type(target["masks"]) is torch.Tensor
    assert target["mask_valid"].tolist() == [True, False, False]
    assert np.array_equal(target["masks"][0].numpy(), _raster(POLYGON, H, W))
    assert target["masks"][1:].sum() == 0
    _, target = ds[1]
    assert target["masks"].shape == (1, H, W) and target["mask_valid"].tolist() == [False]
    assert "masks" not in CocoDetection(image_dir, ann_file)[0][1]  # masks are asked for, not always read


def test_mask_follows_flip_and_resize_as_a_rerasterised_polygon(tmp_path):
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [4, 3, 26, 21], segmentation=[POLYGON])])
    ds = CocoDetection(image_dir, ann_file, transforms=train_transforms(hflip_prob=1.0), masks=True)
    image, target = ds[0]
    flipped = [W - v if i % 2 == 0 else v for i, v in enumerate(POLYGON)]  # x -> W - x
    expected = _raster(flipped, H, W)
    assert np.mean(target["masks"][0].numpy() != expected) < 0.02  # pixel-centre rounding at the outline
    box = target["boxes"][0]
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert xs.min() >= box[0] - 1 and xs.max() <= box[2]
    # The detector's resize (nearest, the image's scale) against the polygon rasterised at the new size.
    transform = DetectionTransform(min_size=60, max_size=200).eval()
    _, sizes, (resized,) = transform([image], [target])
    scale = sizes[0][0] / H
    expected = _raster([v * scale for v in flipped], *sizes[0])
    assert resized["masks"].shape[1:] == sizes[0] == (60, 80)
    assert np.mean(resized["masks"][0].numpy() != expected) < 0.03


def test_polygon_outside_the_image_is_clipped(tmp_path):
    """A polygon reaching past the image edge rasterises at the image size, clipped."""
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [30, 20, 10, 10],
                                                    segmentation=[[30.0, 20.0, 55.0, 20.0, 55.0, 45.0, 30.0, 45.0]])])
    _, target = CocoDetection(image_dir, ann_file, masks=True)[0]
    assert target["mask_valid"].tolist() == [True]
    ys, xs = torch.nonzero(target["masks"][0], as_tuple=True)
    assert xs.max() == W - 1 and ys.max() == H - 1 and target["masks"][0].sum() == 10 * 10


def test_image_of_another_size_than_the_json_keeps_polygons_and_drops_rles(tmp_path, caplog):
    """Polygons rasterise at the real size; an RLE made for the json's size cannot fit it (warned, no mask)."""
    import io

    from PIL import Image

    png = io.BytesIO()
    Image.fromarray(np.zeros((H + 10, W, 3), np.uint8)).save(png, format="PNG")
    rle = encode(_raster(POLYGON, H, W)[None])[0]
    image_dir, ann_file = write_coco(tmp_path, [ann(1, [4, 3, 26, 21], segmentation=[POLYGON]),
                                                ann(1, [4, 3, 26, 21], segmentation=rle)],
                                     images=[{"id": 1, "file_name": "1.png", "width": W, "height": H}],
                                     files={"1.png": png.getvalue()})
    ds = CocoDetection(image_dir, ann_file, masks=True)
    with caplog.at_level(logging.WARNING):
        _, target = ds[0]
    assert target["masks"].shape == (2, H + 10, W) and target["mask_valid"].tolist() == [True, False]
    assert np.array_equal(target["masks"][0].numpy(), _raster(POLYGON, H + 10, W))
    assert "does not fit" in caplog.text
