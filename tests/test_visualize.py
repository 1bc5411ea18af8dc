"""The proposals / two-views picture."""
import numpy as np
import pytest
from PIL import Image

from aligndet.data.images import list_images
from aligndet.data.proposals import PRESETS, build_cache
from aligndet.visualize import id_colours, main


@pytest.fixture()
def cache(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(2):
        pixels = (rng.random((40, 60, 3)) * 50).astype(np.uint8)
        pixels[8:30, 10:40] = (200, 180, 40)
        Image.fromarray(pixels).save(folder / f"{i}.png")
    build_cache(list_images(str(folder)), str(tmp_path / "cache"), PRESETS["demo"], workers=1, progress=False)
    return str(folder), str(tmp_path / "cache")


def test_picture_has_three_panels_with_matching_id_colours(cache, tmp_path):
    folder, cache_dir = cache
    out = tmp_path / "fig.png"
    main(["proposals", "--images", folder, "--cache", cache_dir, "--index", "1", "--max-proposals", "1",
          "--height", "120", "--view-preset", "demo", "--out", str(out)])
    figure = np.asarray(Image.open(out).convert("RGB"))
    # the original (40 px) magnified 3x; the views (short side 104-128 px) magnified alike are taller
    assert 3 * 104 <= figure.shape[0] <= 3 * 128 + 1
    colour = np.array(id_colours([0])[0])
    has_colour = np.all(figure == colour, axis=2)  # [H, W] pixels in id 0's colour
    columns = np.flatnonzero(has_colour.any(axis=0))
    # one panel of 180 px (60 * 3) and two view panels: id 0's colour appears in three separate bands
    bands = 1 + int((np.diff(columns) > 8).sum())
    assert columns.min() < 180 and bands == 3


def test_bad_index_is_a_clear_error(cache, tmp_path):
    folder, cache_dir = cache
    with pytest.raises(SystemExit, match=r"--index must be in 0\.\.1"):
        main(["proposals", "--images", folder, "--cache", cache_dir, "--index", "5", "--out", str(tmp_path / "x.png")])
    with pytest.raises(SystemExit, match="no proposal cache"):
        main(["proposals", "--images", folder, "--cache", str(tmp_path / "none"), "--out", str(tmp_path / "x.png")])


def test_ap_curves_read_without_the_numbers_beside_them():
    """Every evaluation gets a tick and a printed value; both runs keep their colours; the panel titles show."""
    import numpy as np

    from aligndet.visualize import CURVE_COLOURS, ap_curves_figure

    panels = {"10% labels: AP vs fine-tuning epoch": {"a": [(5, 0.1), (10, 0.2)], "b": [(5, 0.15), (10, 0.25)]},
              "10% labels: mask AP vs fine-tuning epoch": {"a": [(5, 0.01), (10, 0.02)], "b": [(5, 0.0), (10, 0.03)]}}
    image = ap_curves_figure(panels, width=1000, colours={"a": CURVE_COLOURS[1], "b": CURVE_COLOURS[2]})
    pixels = np.asarray(image.convert("RGB")).reshape(-1, 3)
    colours = {tuple(int(v) for v in px) for px in pixels}
    assert image.size == (1000, 520) and CURVE_COLOURS[1] in colours and CURVE_COLOURS[2] in colours
    # a tick below the x axis at each evaluated epoch (5 and 10 of 10) of the first panel, none between them
    x0, x1, y1 = 62, 500 - 20, 520 - 48 - (20 * 2 + 10)
    column = lambda e: np.asarray(image.convert("L"))[y1 + 1:y1 + 4, round(x0 + (x1 - x0) * e / 10)]  # noqa: E731
    assert (column(5) < 100).all() and (column(10) < 100).all() and (column(7.5) > 200).all()


def test_draw_labelled_lays_masks_over_their_boxes():
    import numpy as np

    from aligndet.visualize import draw_labelled

    image = np.full((20, 30, 3), 255, np.uint8)
    masks = np.zeros((1, 20, 30), bool)
    masks[0, 5:15, 5:10] = True
    plain = np.asarray(draw_labelled(image, [[2, 2, 20, 18]], ["cat 0.90"], scale=2.0))
    tinted = np.asarray(draw_labelled(image, [[2, 2, 20, 18]], ["cat 0.90"], scale=2.0, masks=masks))
    assert plain.shape == tinted.shape == (40, 60, 3)
    assert (tinted[14:28, 12:18] != 255).any(axis=-1).all()  # inside the mask: coloured
    assert np.array_equal(tinted[30:36, 30:36], plain[30:36, 30:36])  # outside it: unchanged
