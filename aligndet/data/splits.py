"""Reproducible labelled subsets for low-data fine-tuning (paper: 1/5/10/20 % of COCO).

Scheme: sort the image ids, permute them with ``numpy.random.default_rng(fold)``,
keep the first ``max(1, round(fraction * N))``. Hence

- the same ids, fraction and fold always give the same split, on any machine;
- fraction 1.0 gives every id;
- **nested**: for one fold, the split of a smaller fraction is a subset of the
  split of a larger one (both are prefixes of the same permutation), so a
  1 % model never sees an image a 5 % model of the same fold lacks;
- different folds use different permutations, giving independent repeats.

These are this project's splits; they are not the files other semi-supervised
detection codebases ship.
"""
import math

import numpy as np


def label_fraction_split(image_ids, fraction, fold=0):
    """Return a sorted list with ``max(1, round(fraction * len(image_ids)))`` of the ids.

    Args:
        image_ids: unique image ids (any order; they are sorted first).
        fraction: share of images to keep, ``0 < fraction <= 1``.
        fold: non-negative int; the seed of the permutation.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) \
            or not math.isfinite(fraction) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be a number with 0 < fraction <= 1, got {fraction!r}")
    if isinstance(fold, bool) or not isinstance(fold, (int, np.integer)) or fold < 0:
        raise ValueError(f"fold must be a non-negative int, got {fold!r}")
    ids = sorted(image_ids)
    if len(set(ids)) != len(ids):
        raise ValueError("image_ids contains duplicates")
    if not ids:
        return []
    order = np.random.default_rng(int(fold)).permutation(len(ids))
    n = max(1, round(fraction * len(ids)))
    return sorted(ids[i] for i in order[:n])
