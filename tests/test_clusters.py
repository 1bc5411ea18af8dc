"""Pseudo-classes of proposals (aligndet/data/clusters.py, kmeans.py and the ``cluster`` subcommand)."""
import json
import os

import numpy as np
import pytest
import torch
import torchvision

from aligndet.data.clusters import ClusterIds, cluster_cache, cluster_dir, size_histogram
from aligndet.data.kmeans import assign, fit_pca, kmeans, project
from aligndet.data.images import list_images
from aligndet.data.proposal_cache import ProposalCache, ProposalCacheError, import_coco_json, shard_name
from aligndet.data.proposals import main


def blobs(centres, per_blob, spread, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.cat([c + spread * torch.randn(per_blob, len(c), generator=g) for c in centres])
    return x, torch.arange(len(centres)).repeat_interleave(per_blob)


def test_kmeans_recovers_well_separated_clusters_and_is_seeded():
    g = torch.Generator().manual_seed(1)
    centres = 10 * torch.randn(6, 16, generator=g)
    x, truth = blobs(centres, 50, 0.3)
    found = kmeans(x, 6, seed=0)
    ids = assign(x, found)
    # One found cluster per true one, and back: the partition is the true one up to names.
    pairs = {(int(t), int(i)) for t, i in zip(truth, ids)}
    assert len(pairs) == 6 and len({t for t, _ in pairs}) == 6 and len({i for _, i in pairs}) == 6
    assert torch.equal(kmeans(x, 6, seed=0), found)
    with pytest.raises(ValueError, match="only 300 boxes"):
        kmeans(x, 301)


def test_kmeans_with_more_clusters_than_distinct_points_fills_every_cluster():
    x = torch.tensor([[0.0, 0.0]] * 5 + [[1.0, 1.0]] * 5)
    ids = assign(x, kmeans(x, 4, seed=0))
    assert set(ids.tolist()) <= set(range(4)) and len(ids) == 10


def test_pca_finds_the_plane_the_data_lie_in():
    g = torch.Generator().manual_seed(0)
    basis = torch.linalg.qr(torch.randn(12, 2, generator=g))[0]  # an orthonormal 2-D plane in 12-D
    x = torch.randn(200, 2, generator=g) * torch.tensor([5.0, 1.0]) @ basis.T + 3.0
    mean, components = fit_pca(x, 256)
    assert components.shape == (12, 12)  # d = min(dims, C, N)
    assert torch.allclose(components.T @ components, torch.eye(12), atol=1e-4)
    y = project(x, mean, components)
    assert y[:, 2:].abs().max() < 1e-3  # everything in the first two components
    assert y[:, 0].var() > y[:, 1].var()
    assert torch.allclose(components[:, :2] @ components[:, :2].T, basis @ basis.T, atol=1e-4)


@pytest.fixture
def proposal_cache(squares_coco, tmp_path):
    """The squares' boxes as a proposal cache of 3 shards, and a random ResNet-18 as the stage-1 checkpoint."""
    cache = str(tmp_path / "cache")
    import_coco_json(squares_coco["train_json"], cache, shard_size=5)
    init = str(tmp_path / "stage1.pth")
    torch.manual_seed(0)
    torch.save({"backbone": {k: v for k, v in torchvision.models.resnet18().state_dict().items()
                             if not k.startswith("fc.")}}, init)
    records = {r.key: r.path for r in list_images(squares_coco["train_images"], squares_coco["train_json"])}
    return cache, init, records


def test_every_box_gets_an_id_deterministically_and_a_killed_run_resumes(proposal_cache):
    cache_dir, init, records = proposal_cache
    sizes = cluster_cache(cache_dir, records, init, k=3, sample=1000, progress=False, log=lambda *a: None)
    cache, ids = ProposalCache(cache_dir), ClusterIds(cache_dir, k=3)
    total = cache.stats()["boxes"]
    assert sizes.sum() == total and len(sizes) == 3
    per_image = {key: ids.get(key, len(cache.get(key))) for key in cache.keys}
    assert all(((v >= 0) & (v < 3)).all() for v in per_image.values())
    # A killed run: a shard and the fitted model lost; the rerun makes them again, the same ids.
    folder = cluster_dir(cache_dir)
    os.unlink(os.path.join(folder, shard_name(1)))
    with pytest.raises(ProposalCacheError, match="incomplete.*resumes"):
        ClusterIds(cache_dir)
    os.unlink(os.path.join(folder, "model.npz"))
    cluster_cache(cache_dir, records, init, k=3, sample=1000, progress=False, log=lambda *a: None)
    again = ClusterIds(cache_dir)
    assert all(np.array_equal(again.get(key), per_image[key]) for key in cache.keys)
    with pytest.raises(ProposalCacheError, match="boxes for|cluster ids for"):
        again.get(cache.keys[0], num_boxes=len(per_image[cache.keys[0]]) + 1)


def test_other_settings_are_refused_and_overwrite_replaces(proposal_cache):
    cache_dir, init, records = proposal_cache
    quiet = dict(progress=False, log=lambda *a: None, sample=1000)
    cluster_cache(cache_dir, records, init, k=3, **quiet)
    with pytest.raises(ProposalCacheError, match=r"other settings.*k 3 -> 2.*--overwrite"):
        cluster_cache(cache_dir, records, init, k=2, **quiet)
    cluster_cache(cache_dir, records, init, k=2, overwrite=True, **quiet)
    assert ClusterIds(cache_dir).k == 2 and len(ClusterIds(cache_dir).sizes()) == 2
    with pytest.raises(ProposalCacheError, match="holds 2 clusters, not 3"):
        ClusterIds(cache_dir, k=3)
    boxes = ProposalCache(cache_dir).stats()["boxes"]
    with pytest.raises(ValueError, match=f"k = {boxes + 1} clusters but only {boxes} boxes"):
        cluster_cache(cache_dir, records, init, k=boxes + 1, overwrite=True, **quiet)


def test_a_cache_without_clusters_names_the_command(proposal_cache):
    cache_dir, _, _ = proposal_cache
    with pytest.raises(ProposalCacheError, match="python -m aligndet.data.proposals cluster --cache"):
        ClusterIds(cache_dir)


def test_unreadable_images_keep_their_boxes_with_id_minus_one(proposal_cache, tmp_path):
    cache_dir, init, records = proposal_cache
    broken = dict(records)
    bad_key = ProposalCache(cache_dir).keys[-1]
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"not a png")
    broken[bad_key] = str(bad)
    logged = []
    cluster_cache(cache_dir, broken, init, k=2, sample=1000, progress=False, log=logged.append)
    ids = ClusterIds(cache_dir).get(bad_key)
    assert len(ids) and (ids == -1).all()
    assert any("unreadable" in line for line in logged) and any(bad_key in line for line in logged)


def test_cli_prints_the_histogram_and_draws_the_clusters(proposal_cache, squares_coco, capsys):
    cache_dir, init, _ = proposal_cache
    main(["cluster", "--cache", cache_dir, "--images", squares_coco["train_images"], "--init", init, "--k", "3",
          "--sample", "1000"])
    out = capsys.readouterr().out
    assert "3 clusters" in out and "clusters.png" in out
    from PIL import Image
    picture = Image.open(os.path.join(cluster_dir(cache_dir), "clusters.png"))
    assert picture.size[0] > 64 and picture.size[1] >= 48
    index = json.load(open(os.path.join(cluster_dir(cache_dir), "index.json")))
    assert index["settings"]["k"] == 3 and index["settings"]["level"] == "C4"
    with pytest.raises(SystemExit, match="--images is required"):
        main(["cluster", "--cache", cache_dir, "--init", init])


def test_size_histogram_counts_every_cluster():
    lines = size_histogram(np.array([0, 5, 5, 9, 100]))
    assert lines[0].startswith("5 clusters, 119 boxes: smallest 0, median 5, largest 100, empty 1")
    assert sum(int(line.split("boxes:")[1].split("clusters")[0]) for line in lines[1:]) == 5
