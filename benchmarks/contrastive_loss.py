"""Time and peak memory of the box contrastive loss alone (forward + backward),
as the training step needs it: the loss and its logged statistics.

    python benchmarks/contrastive_loss.py                       # 2,048 x 4,096 and 16,384 x 16,384
    python benchmarks/contrastive_loss.py --sizes 2048x4096 --repeats 5 --threads 1

Variants:
- "two passes" is the version this project had before (written out below):
  the loss, then the statistics for the log, each computing the similarity
  matrix, masks and logsumexp again, with the negatives masked out of place;
- "one pass" is ``box_contrastive``: one similarity matrix gives negatives,
  positives and statistics (in row blocks only above ``BLOCK_ELEMENTS``, 2^30
  similarities);
- "one pass, 2^25 blocks" is the same in row blocks of 2^25 similarities,
  each recomputed in the backward pass, to show what blocks cost in time and
  save in memory.

Sizes are ``Nq x Nk``: online x momentum embeddings, D = 256, about 30
predictions per instance and a quarter of them background (a dense
detector's sampled anchors). Each variant runs in its own process, so its
peak resident memory above the inputs (ru_maxrss) is its own.
"""
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

import torch
import torch.nn.functional as F

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.pretrain.losses import box_contrastive  # noqa: E402


def two_passes(q, q_ids, k, k_ids, temperature=0.5):
    """The earlier implementation: the same loss value (its self-keys were detached, which
    changes the gradient only), computed once for the loss and once more for the stats."""
    def pairs(q, k):
        q = F.normalize(q, dim=1)
        k = F.normalize(k, dim=1).detach()
        q_det = q.detach()
        has_key = torch.isin(q_ids, k_ids)
        keys = torch.cat([k, q_det])
        key_ids = torch.cat([k_ids, torch.where(has_key, torch.full_like(q_ids, -1), q_ids)])
        pos_mask = (q_ids[:, None] == key_ids[None, :]) & (q_ids[:, None] >= 0)
        bank = torch.cat([q_det, k])
        neg_mask = q_ids[:, None] != torch.cat([q_ids, k_ids])[None, :]
        neg_logits = (q @ bank.t() / temperature).masked_fill(~neg_mask, float("-inf"))
        neg_lse = torch.logsumexp(neg_logits, dim=1)
        max_neg = neg_logits.max(dim=1).values
        query, key = pos_mask.nonzero(as_tuple=True)
        pos = (q[query] * keys[key]).sum(dim=1) / temperature
        ids, inverse, counts = torch.unique(q_ids[query], return_inverse=True, return_counts=True)
        weight = 1.0 / (counts[inverse].to(pos.dtype) * max(len(ids), 1))
        return pos, neg_lse[query], max_neg[query], weight

    pos, neg_lse, _, weight = pairs(q, k)
    loss = (F.softplus(neg_lse - pos) * weight).sum()
    with torch.no_grad():
        pos, _, max_neg, weight = pairs(q, k)
        accuracy = float(((pos > max_neg).to(weight.dtype) * weight).sum())
    return loss, {"accuracy": accuracy}


VARIANTS = {
    "two passes": two_passes,
    "one pass": box_contrastive,
    "one pass, 2^25 blocks": lambda *a: box_contrastive(*a, block_elements=1 << 25),
}


def make_inputs(nq, nk, dim=256, per_instance=30, seed=0):
    """Embeddings [N, D] and ids (-1 for a quarter of them) of two views of the same instances."""
    g = torch.Generator().manual_seed(seed)
    instances = max(nq // per_instance, 1)

    def ids(n):
        out = torch.randint(instances, (n,), generator=g)
        out[torch.rand(n, generator=g) < 0.25] = -1
        return out

    return (torch.randn(nq, dim, generator=g).requires_grad_(), ids(nq), torch.randn(nk, dim, generator=g), ids(nk))


def run_variant(variant, nq, nk, repeats, threads):
    """In this process: median seconds of forward + backward, and peak MiB above the inputs."""
    torch.set_num_threads(threads)
    q, q_ids, k, k_ids = make_inputs(nq, nk)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = []
    for _ in range(repeats):
        q.grad = None
        start = time.perf_counter()
        loss, stats = VARIANTS[variant](q, q_ids, k, k_ids)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB on Linux
    return {"seconds": statistics.median(times), "peak_mib": peak, "loss": loss.item(), "accuracy": stats["accuracy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2048x4096", "16384x16384"], help="Nq x Nk")
    p.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "NQ", "NK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        variant, nq, nk = args.worker
        print(json.dumps(run_variant(variant, int(nq), int(nk), args.repeats, args.threads)))
        return
    print(f"torch {torch.__version__}, threads {args.threads}, median of {args.repeats}")
    print("| Nq x Nk | variant | forward + backward | peak memory above inputs | L_con | top-1 |")
    print("|---|---|---|---|---|---|")
    for size in args.sizes:
        nq, nk = (int(v) for v in size.split("x"))
        for variant in args.variants:
            out = subprocess.run([sys.executable, __file__, "--worker", variant, str(nq), str(nk),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {nq:,} x {nk:,} | {variant} | {r['seconds'] * 1000:,.0f} ms | {r['peak_mib']:,.0f} MiB | "
                  f"{r['loss']:.6f} | {r['accuracy']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
