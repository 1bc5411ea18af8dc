"""Two-view dataset: boxes follow their view, ids match across views, determinism, bad input.
The photometric augmentations are in test_photometric.py."""
import logging

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2 as T

from aligndet.data.images import ImageRecord
from aligndet.data.views import DEMO_VIEW, TwoViewDataset, build_view_transform, two_view_collate

W, H = 64, 48          # coordinate-coded test image
KX, KY = 4, 5          # red = KX * x, green = KY * y (both stay <= 255)
SMALL_VIEW = dict(short_sides=(40, 56, 72), max_size=120)


class Proposals:
    """The proposal cache's interface over a dict: ``get(key)`` -> ``[N, 4]`` array or None."""

    def __init__(self, boxes):
        self.boxes = boxes

    def get(self, key):
        return self.boxes.get(key)


def save(tmp_path, name, image, image_id=1):
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    image.save(tmp_path / name)
    return ImageRecord(name, str(tmp_path / name), image_id)


def coordinate_image():
    """[H, W, 3] uint8 whose red channel is KX * x and green channel KY * y."""
    y, x = np.mgrid[0:H, 0:W]
    return np.stack([KX * x, KY * y, np.zeros_like(x)], axis=2).astype(np.uint8)


def random_boxes(rng, n, width, height, margin=8):
    """[n, 4] xyxy boxes, some reaching past the image border."""
    x = np.sort(rng.uniform(-margin, width + margin, (n, 2)), axis=1)
    y = np.sort(rng.uniform(-margin, height + margin, (n, 2)), axis=1)
    return np.stack([x[:, 0], y[:, 0], x[:, 1] + 2, y[:, 1] + 2], axis=1)


def to_float():
    """A view transform that changes nothing but the dtype."""
    return T.ToDtype(torch.float32, scale=True)


def fit_back_map(profile, k):
    """From a view's coordinate-coded profile [n] (mean channel value per view pixel),
    fit original = a * view + b over continuous coordinates (pixel centres at +0.5).

    The interior avoids the border, where resampling clamps; returns a, b and the
    largest residual in original pixels."""
    u = np.arange(len(profile)) + 0.5
    x = profile / k + 0.5
    inner = slice(3, len(profile) - 3)
    a, b = np.polyfit(u[inner], x[inner], 1)
    return a, b, float(np.abs(a * u[inner] + b - x[inner]).max())


def assert_same_item(a, b):
    assert (a["image_id"], a["key"], a["orig_size"], a["num_proposals"]) == \
        (b["image_id"], b["key"], b["orig_size"], b["num_proposals"])
    for va, vb in zip(a["views"], b["views"]):
        for name in ("image", "boxes", "ids"):
            assert torch.equal(va[name], vb[name]), name


def images_differ(view_a, view_b):
    a, b = view_a["image"], view_b["image"]
    return a.shape != b.shape or not torch.equal(a, b)


def views_differ(item_a, item_b):
    return any(images_differ(a, b) for a, b in zip(item_a["views"], item_b["views"]))


@pytest.mark.parametrize("crop", [False, True])
def test_view_boxes_map_back_to_their_proposals(tmp_path, crop):
    """Read each view's geometry (scale, flip, crop) off the coordinate-coded pixels and
    map the view's boxes back: box i must be proposal i (clipped to the crop) within half a
    pixel, and a proposal missing from a view must be about 1 view pixel wide or high or less."""
    record = save(tmp_path, "coords.png", coordinate_image())
    proposals = random_boxes(np.random.default_rng(0), 12, W, H)
    clipped = proposals.copy()
    clipped[:, 0::2] = clipped[:, 0::2].clip(0, W)
    clipped[:, 1::2] = clipped[:, 1::2].clip(0, H)
    clipped = clipped[(clipped[:, 2] > clipped[:, 0]) & (clipped[:, 3] > clipped[:, 1])]
    assert 0 < len(clipped) < len(proposals)  # one proposal lies wholly outside the image
    transform = build_view_transform(**SMALL_VIEW, photometric=False, crop=crop)
    ds = TwoViewDataset([record], Proposals({record.key: proposals}), transform)

    flips, sizes, dropped = set(), set(), 0
    for epoch in range(15):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["orig_size"] == (H, W) and item["num_proposals"] == len(clipped)
        for view in item["views"]:
            image = view["image"].numpy() * 255.0  # [3, h, w]
            h, w = image.shape[1:]
            ax, bx, res_x = fit_back_map(image[0].mean(axis=0), KX)
            ay, by, res_y = fit_back_map(image[1].mean(axis=1), KY)
            assert max(res_x, res_y) < 0.3, "view is not a scaled/flipped/cropped original"
            assert ay > 0
            flips.add(bool(ax < 0))
            sizes.add((h, w))
            region_x = np.sort(ax * np.array([0, w]) + bx)  # the view's extent, original px
            region_y = np.sort(ay * np.array([0, h]) + by)
            if not crop:
                np.testing.assert_allclose([*region_x, *region_y], [0, W, 0, H], atol=0.5)
            expected = clipped.copy()
            expected[:, 0::2] = expected[:, 0::2].clip(*region_x)
            expected[:, 1::2] = expected[:, 1::2].clip(*region_y)

            boxes, ids = view["boxes"].numpy(), view["ids"].numpy()
            assert boxes.shape == (len(ids), 4) and view["boxes"].dtype == torch.float32
            assert ids.dtype == np.int64 and np.all(np.diff(ids) > 0)
            assert np.all(boxes[:, 0::2] >= 0) and np.all(boxes[:, 0::2] <= w)
            assert np.all(boxes[:, 1::2] >= 0) and np.all(boxes[:, 1::2] <= h)
            xs = np.sort(ax * boxes[:, [0, 2]] + bx, axis=1)  # a flip swaps x1 and x2
            ys = np.sort(ay * boxes[:, [1, 3]] + by, axis=1)
            back = np.stack([xs[:, 0], ys[:, 0], xs[:, 1], ys[:, 1]], axis=1)  # original px
            error = np.abs(back - expected[ids]).max(initial=0.0)
            assert error < 0.5, (epoch, error)  # seen: up to 0.13 px

            missing = np.setdiff1d(np.arange(len(clipped)), ids)
            dropped += len(missing)
            view_w = (expected[missing, 2] - expected[missing, 0]) / abs(ax)
            view_h = (expected[missing, 3] - expected[missing, 1]) / ay
            assert np.all((view_w < 1.5) | (view_h < 1.5) | (view_w * view_h < 1.5))
    assert flips == {False, True} and len(sizes) > 2
    assert (dropped > 0) == crop


def test_ids_are_kept_per_proposal_and_dropped_from_one_view_only(tmp_path):
    record = save(tmp_path, "a.png", np.full((H, W, 3), 90, np.uint8))
    # A 4 x 3 grid of 12 x 12 boxes; small crops cut most of them from a view.
    grid = np.array([[x, y, x + 12, y + 12] for y in (2, 18, 34) for x in (2, 18, 34, 50)])
    transform = build_view_transform(**SMALL_VIEW, crop=True, crop_scale=(0.1, 0.3))
    ds = TwoViewDataset([record], Proposals({record.key: grid}), transform)
    one_view_only = 0
    for epoch in range(20):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["num_proposals"] == len(grid)
        id_sets = []
        for view in item["views"]:
            ids = view["ids"].tolist()
            assert ids == sorted(set(ids)) and set(ids) <= set(range(len(grid)))
            id_sets.append(set(ids))
        one_view_only += len(id_sets[0] ^ id_sets[1]) > 0
    assert one_view_only > 0
    assert ds.summary()["dropped_from_view"] > 0


def test_same_seed_epoch_index_gives_the_same_views_in_any_order(tmp_path):
    rng = np.random.default_rng(1)
    records = [save(tmp_path, f"{i}.png", rng.integers(0, 256, (H, W, 3), dtype=np.uint8), i)
               for i in range(3)]
    proposals = Proposals({r.key: random_boxes(rng, 8, W, H) for r in records})
    transform = build_view_transform(**SMALL_VIEW, crop=True)

    def dataset(seed=0):
        return TwoViewDataset(records, proposals, transform, max_proposals=4, seed=seed)

    ds = dataset()
    forward = [ds[i] for i in range(3)]
    torch.manual_seed(123)  # the caller's RNG must not matter ...
    backward = [ds[i] for i in reversed(range(3))][::-1]
    after = torch.get_rng_state()
    assert torch.equal(after, torch.manual_seed(123).get_state())  # ... nor be changed
    for a, b in zip(forward, backward):
        assert_same_item(a, b)

    for a, b in zip(forward, [dataset()[i] for i in range(3)]):
        assert_same_item(a, b)
    assert all(views_differ(a, dataset(seed=1)[i]) for i, a in enumerate(forward))
    ds.set_epoch(1)
    assert all(views_differ(a, ds[i]) for i, a in enumerate(forward))
    ds.set_epoch(0)
    assert_same_item(forward[2], ds[2])
    assert all(images_differ(*item["views"]) for item in forward)  # two independent draws

    # DataLoader workers get the same items as the main process.
    loader = torch.utils.data.DataLoader(ds, batch_size=1, num_workers=2, collate_fn=lambda b: b[0],
                                         multiprocessing_context="fork")
    for a, b in zip(forward, loader):
        assert_same_item(a, b)


def test_first_k_and_random_k_selection(tmp_path):
    record = save(tmp_path, "a.png", np.zeros((H, W, 3), np.uint8))
    proposals = np.array([[i, i, i + 10, i + 12] for i in range(10)], dtype=np.float32)
    cache = Proposals({record.key: proposals})

    first = TwoViewDataset([record], cache, to_float(), max_proposals=4, select="first")[0]
    assert first["num_proposals"] == 4
    for view in first["views"]:
        assert torch.equal(view["boxes"], torch.from_numpy(proposals[:4]))
        assert view["ids"].tolist() == [0, 1, 2, 3]

    ds = TwoViewDataset([record], cache, to_float(), max_proposals=4, select="random", seed=3)
    subsets = set()
    for epoch in range(10):
        ds.set_epoch(epoch)
        view1, view2 = ds[0]["views"]
        assert torch.equal(view1["boxes"], view2["boxes"])  # one subset for both views
        assert view1["ids"].tolist() == [0, 1, 2, 3]
        rows = [int(np.flatnonzero((proposals == box).all(axis=1))[0]) for box in view1["boxes"].numpy()]
        assert rows == sorted(set(rows))  # a subset, kept in cache order
        subsets.add(tuple(rows))
    assert len(subsets) > 3
    assert ds.summary()["capped_proposals"] == 6 * 10

    for k in (None, 10, 50):
        item = TwoViewDataset([record], cache, to_float(), max_proposals=k)[0]
        assert torch.equal(item["views"][0]["boxes"], torch.from_numpy(proposals))
    with pytest.raises(ValueError, match="select"):
        TwoViewDataset([record], cache, to_float(), select="best")


@pytest.mark.parametrize("image", [
    Image.fromarray(np.arange(W * H, dtype=np.uint8).reshape(H, W), mode="L"),
    Image.new("RGBA", (W, H), (200, 10, 30, 0)),
    Image.fromarray(np.arange(W * H, dtype=np.uint8).reshape(H, W), mode="L").convert("P"),
    Image.fromarray((np.arange(W * H, dtype=np.uint16).reshape(H, W) * 21)),  # I;16
    Image.new("RGB", (1, 1), (1, 2, 3)),
    Image.new("RGB", (5, 3), (250, 0, 9)),
    Image.new("RGB", (3, 5), (0, 128, 255)),
], ids=["L", "RGBA", "P", "I16", "1x1", "5x3", "3x5"])
def test_any_image_mode_and_size_gives_float_rgb_views(tmp_path, image):
    record = save(tmp_path, "a.png", image)
    assert Image.open(record.path).mode == image.mode
    proposals = np.array([[0, 0, image.width, image.height], [0, 0, 1, 1]])
    transform = build_view_transform(**DEMO_VIEW, crop=True)
    ds = TwoViewDataset([record], Proposals({record.key: proposals}), transform)
    for epoch in range(4):
        ds.set_epoch(epoch)
        item = ds[0]
        assert item["orig_size"] == (image.height, image.width)
        for view in item["views"]:
            x = view["image"]
            assert x.dtype == torch.float32 and x.dim() == 3 and x.shape[0] == 3
            assert type(x) is torch.Tensor and 0 <= x.min() and x.max() <= 1
            assert view["boxes"].shape == (len(view["ids"]), 4)
            assert 0 in view["ids"].tolist()  # the whole-image box survives every view
            assert min(x.shape[1:]) >= DEMO_VIEW["short_sides"][0] - 1


def test_empty_proposals_still_give_views(tmp_path):
    record = save(tmp_path, "a.png", np.zeros((H, W, 3), np.uint8))
    for empty in (np.zeros((0, 4)), np.zeros((0,)), []):
        ds = TwoViewDataset([record], Proposals({record.key: empty}),
                            build_view_transform(**SMALL_VIEW, crop=True))
        item = ds[0]
        assert item["num_proposals"] == 0
        for view in item["views"]:
            assert view["image"].shape[0] == 3
            assert view["boxes"].shape == (0, 4) and view["boxes"].dtype == torch.float32
            assert view["ids"].shape == (0,) and view["ids"].dtype == torch.int64
        assert ds.summary()["empty_images"] == 1
        views1, views2, metas = two_view_collate([item])
        assert len(views1) == len(views2) == len(metas) == 1


def test_proposals_are_validated_clipped_and_counted(tmp_path):
    record = save(tmp_path, "a.png", np.zeros((H, W, 3), np.uint8))
    proposals = np.array([
        [1, 2, 10, 20],          # kept
        [-5, -5, 10, 10],        # clipped
        [10, 10, 10, 20],        # zero width: invalid
        [10, 20, 30, 5],         # y2 < y1: invalid
        [np.nan, 0, 10, 10],     # not finite: invalid
        [W + 1, 0, W + 9, 10],   # outside the image: dropped after clipping
        [50, 40, W + 20, H + 20],  # clipped
    ])
    ds = TwoViewDataset([record], Proposals({record.key: proposals}), to_float())
    view = ds[0]["views"][0]
    assert view["boxes"].tolist() == [[1, 2, 10, 20], [0, 0, 10, 10], [50, 40, W, H]]
    assert view["ids"].tolist() == [0, 1, 2]
    summary = ds.summary()
    assert (summary["proposals_read"], summary["invalid_proposals"], summary["dropped_after_clip"],
            summary["clipped_proposals"], summary["kept_proposals"]) == (7, 3, 1, 2, 3)

    ints = TwoViewDataset([record], Proposals({record.key: np.array([[1, 2, 3, 4]], np.int64)}),
                          to_float())[0]
    assert ints["views"][1]["boxes"].dtype == torch.float32
    for bad in (np.zeros((3, 5)), np.zeros(4), np.array([["a", "b", "c", "d"]])):
        with pytest.raises(ValueError, match="a.png"):
            TwoViewDataset([record], Proposals({record.key: bad}), to_float())[0]


def test_unusable_images_give_none_counted_and_dropped_by_collate(tmp_path, caplog):
    good = save(tmp_path, "good.png", np.zeros((H, W, 3), np.uint8), 1)
    no_proposals = save(tmp_path, "nop.png", np.zeros((H, W, 3), np.uint8), 2)
    (tmp_path / "corrupt.png").write_bytes(b"not a png at all")
    corrupt = ImageRecord("corrupt.png", str(tmp_path / "corrupt.png"), 3)
    missing = ImageRecord("missing.png", str(tmp_path / "missing.png"), 4)
    box = np.array([[1, 1, 20, 20]])
    cache = Proposals({good.key: box, no_proposals.key: None, corrupt.key: box, missing.key: box})
    ds = TwoViewDataset([good, no_proposals, corrupt, missing], cache, to_float())
    with caplog.at_level(logging.WARNING, logger="aligndet.data.views"):
        items = [ds[i] for i in range(len(ds))]
    assert items[0] is not None and items[1:] == [None, None, None]
    assert "nop.png" in caplog.text and "corrupt.png" in caplog.text and "missing.png" in caplog.text
    summary = ds.summary()
    assert (summary["images"], summary["missing_proposals"], summary["unreadable_images"]) == (4, 1, 2)

    views1, views2, metas = two_view_collate(items)
    assert [m["image_id"] for m in metas] == [1] and len(views1) == len(views2) == 1
    assert two_view_collate([None, None]) == ([], [], [])

    # Repeated warnings of one kind are capped; the count goes on.
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="aligndet.data.views"):
        for _ in range(30):
            ds[3]
    # two 'unreadable' warnings came above: 8 more, then one note that the rest are hidden
    assert len(caplog.records) == 9 and "not shown" in caplog.records[-1].getMessage()
    assert ds.summary()["unreadable_images"] == 32


def test_collate_offsets_ids_by_kept_proposals(tmp_path):
    rng = np.random.default_rng(2)
    counts = [3, 0, 5, 2]
    records = [save(tmp_path, f"{i}.png", np.zeros((H, W, 3), np.uint8), i) for i in range(4)]
    cache = Proposals({r.key: random_boxes(rng, n, W, H, margin=0) for r, n in zip(records, counts)})
    offsets = np.cumsum([0] + counts[:-1])

    # Identity views: global id g is the same box in both views and in the cache.
    batch = [TwoViewDataset(records, cache, to_float())[i] for i in range(4)]
    views1, views2, metas = two_view_collate([batch[0], None, *batch[1:]])
    assert [m["num_proposals"] for m in metas] == counts
    all_ids = torch.cat([v["ids"] for v in views1]).tolist()
    assert all_ids == list(range(sum(counts)))
    for j, (v1, v2) in enumerate(zip(views1, views2)):
        assert torch.equal(v1["ids"], v2["ids"])
        assert torch.equal(v1["boxes"], v2["boxes"])
        local = (v1["ids"] - offsets[j]).numpy()
        np.testing.assert_allclose(v1["boxes"].numpy(), cache.get(records[j].key)[local], rtol=1e-6)
    assert all(torch.equal(b["views"][0]["ids"], torch.arange(n)) for b, n in zip(batch, counts))

    # Cropped views lose boxes, but the offsets stay those of the kept proposals.
    ds = TwoViewDataset(records, cache, build_view_transform(**SMALL_VIEW, crop=True,
                                                             crop_scale=(0.1, 0.3)))
    for epoch in range(3):
        ds.set_epoch(epoch)
        views1, views2, metas = two_view_collate([ds[i] for i in range(4)])
        for views in (views1, views2):
            ids = torch.cat([v["ids"] for v in views]).tolist()
            assert len(ids) == len(set(ids))
            for j, v in enumerate(views):
                assert all(offsets[j] <= i < offsets[j] + counts[j] for i in v["ids"].tolist())
