"""PCA and k-means for the proposals' pseudo-classes (``clusters.py``): plain torch, seeded, on rows of
features ``[N, d]``."""
import torch


def fit_pca(x, dims):
    """``(mean [C], components [C, d])`` of the rows of ``x`` ``[N, C]``, ``d = min(dims, C, N)``."""
    mean = x.mean(dim=0)
    _, _, vh = torch.linalg.svd(x - mean, full_matrices=False)
    return mean, vh[:min(dims, vh.shape[0])].T.contiguous()


def project(x, mean, components):
    return (x - mean) @ components


def _nearest(x, centres, chunk=65536):
    """Index of the nearest centre of each row of ``x`` and the squared distance to it."""
    ids, dists = [], []
    c2 = (centres * centres).sum(dim=1)
    for part in x.split(chunk):
        d = (part * part).sum(dim=1, keepdim=True) - 2 * part @ centres.T + c2  # [n, k]
        best = d.min(dim=1)
        ids.append(best.indices)
        dists.append(best.values.clamp_(min=0))
    return torch.cat(ids), torch.cat(dists)


def kmeans(x, k, iters=50, seed=0):
    """k-means of the rows of ``x`` ``[N, d]``: k-means++ seeding (Arthur & Vassilvitskii, 2007), then Lloyd
    iterations until no assignment changes or ``iters``. An emptied cluster moves to the point farthest from
    its centre. Returns the centres ``[k, d]``; the same ``seed`` gives the same centres."""
    n = len(x)
    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    if k > n:
        raise ValueError(f"k = {k} clusters but only {n} boxes to fit them on; lower --k or raise --sample")
    g = torch.Generator().manual_seed(seed)
    x = x.double()  # exact enough that ties and the empty-cluster rule do not depend on the summation order
    chosen = [int(torch.randint(n, (1,), generator=g))]
    closest = ((x - x[chosen[0]]) ** 2).sum(dim=1)
    for _ in range(1, k):
        total = float(closest.sum())
        if total <= 0:  # fewer distinct points than k: the rest start on duplicates
            nxt = int(torch.randint(n, (1,), generator=g))
        else:
            nxt = int(torch.multinomial(closest / total, 1, generator=g))
        chosen.append(nxt)
        closest = torch.minimum(closest, ((x - x[nxt]) ** 2).sum(dim=1))
    centres = x[chosen].clone()
    ids = None
    for _ in range(iters):
        new_ids, dists = _nearest(x, centres)
        if ids is not None and torch.equal(new_ids, ids):
            break
        ids = new_ids
        counts = torch.bincount(ids, minlength=k)
        sums = torch.zeros_like(centres).index_add_(0, ids, x)
        filled = counts > 0
        centres[filled] = sums[filled] / counts[filled, None].to(x.dtype)
        for j in torch.nonzero(~filled).flatten().tolist():
            far = int(dists.argmax())
            centres[j] = x[far]
            dists[far] = -1
    return centres.float()


def assign(x, centres):
    """The nearest centre's index of each row of ``x``."""
    return _nearest(x, centres)[0]
