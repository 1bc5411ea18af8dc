"""Time and peak memory of the box contrastive loss alone (forward + backward),
as the training step needs it: the loss and its logged statistics.

    python benchmarks/contrastive_loss.py                       # 2,048 x 4,096 and 16,384 x 16,384
    python benchmarks/contrastive_loss.py --sizes 2048x4096 --repeats 5

"two passes" is what the step did before: ``box_contrastive_loss`` and then
``box_contrastive_stats``, each computing the similarities, masks and
logsumexp; "one pass" is ``box_contrastive``, which returns both. Sizes are
``Nq x Nk``: online x momentum embeddings, D = 256, about 30 predictions per
instance and a quarter of them background (a dense detector's sampled
anchors). Each variant runs in its own process, so its peak resident memory
above the inputs (ru_maxrss) is its own.
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

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.pretrain.losses import box_contrastive, box_contrastive_loss, box_contrastive_stats  # noqa: E402


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
        if variant == "one pass":
            loss, stats = box_contrastive(q, q_ids, k, k_ids)
        else:
            loss = box_contrastive_loss(q, q_ids, k, k_ids)
            stats = box_contrastive_stats(q, q_ids, k, k_ids)
        loss.backward()
        times.append(time.perf_counter() - start)
    peak = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024  # KiB -> MiB on Linux
    return {"seconds": statistics.median(times), "peak_mib": peak, "loss": loss.item(), "accuracy": stats["accuracy"]}


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", nargs="+", default=["2048x4096", "16384x16384"], help="Nq x Nk")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--worker", nargs=3, metavar=("VARIANT", "NQ", "NK"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        variant, nq, nk = args.worker
        print(json.dumps(run_variant(variant.replace("_", " "), int(nq), int(nk), args.repeats, args.threads)))
        return
    print(f"torch {torch.__version__}, threads {args.threads}, median of {args.repeats}")
    print("| Nq x Nk | variant | forward + backward | peak memory above inputs | L_con |")
    print("|---|---|---|---|---|")
    for size in args.sizes:
        nq, nk = (int(v) for v in size.split("x"))
        for variant in ("two passes", "one pass"):
            out = subprocess.run([sys.executable, __file__, "--worker", variant.replace(" ", "_"), str(nq), str(nk),
                                  "--repeats", str(args.repeats), "--threads", str(args.threads)],
                                 capture_output=True, text=True, check=True)
            r = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"| {nq:,} x {nk:,} | {variant} | {r['seconds'] * 1000:,.0f} ms | {r['peak_mib']:,.0f} MiB | "
                  f"{r['loss']:.6f} |", flush=True)


if __name__ == "__main__":
    main()
