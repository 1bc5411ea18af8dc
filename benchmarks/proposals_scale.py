"""The proposal tool at scale, and its start-up: what a 100k-image build will cost.

1. Start-up: wall time of ``python -m aligndet.data.proposals --help``, of ``info`` on a
   finished cache, and of a whole build of one image (start, search, cache written), each the
   median of ``--repeat`` runs. Target: <= 0.5 s each. Then reduced against full JPEG decoding on one
   4000 x 3000 photo-sized image.
2. Scale: a build of ``--images`` demo-sized scenes (the demo's training scenes, linked under
   new names until there are enough) with ``--workers`` processes, as a user would run it;
   prints images/s, the peak memory of the whole process tree (sampled every 0.1 s) and
   the cache's size on disk.

    python benchmarks/proposals_scale.py                     # 10,000 images, all cores
    python benchmarks/proposals_scale.py --images 2000 --workers 1
"""
import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
from aligndet.data.proposals import default_workers  # noqa: E402

TOOL = [sys.executable, "-m", "aligndet.data.proposals"]


def tree_rss(pid):
    """Resident memory (bytes) of ``pid`` and all its descendants, from /proc."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            with open(f"/proc/{p}/status") as f:
                total += next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmRSS:"))
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except (OSError, StopIteration):
            continue
    return total


def timed(command, repeat):
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        subprocess.run(command, cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def large_jpeg(tmp, scene, repeat):
    """Reduced against full decoding at the coco preset on a 4000 x 3000 JPEG (a demo scene enlarged)."""
    from PIL import Image

    from aligndet.data.proposal_search import propose_file
    from aligndet.data.proposals import PRESETS

    path = os.path.join(tmp, "large.jpg")
    with Image.open(scene) as im:
        im.convert("RGB").resize((4000, 3000), Image.BICUBIC).save(path, quality=90)
    seconds = {}
    for decode in ("full", "reduced"):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            propose_file(path, dict(PRESETS["coco"], decode=decode))
            times.append(time.perf_counter() - start)
        seconds[decode] = statistics.median(times)
    return (f"a 4000 x 3000 JPEG at the coco preset, one process: full decoding {seconds['full']:.3f} s, "
            f"reduced {seconds['reduced']:.3f} s per image ({seconds['full'] / seconds['reduced']:.1f}x)")


def du(folder):
    return sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(folder) for f in files)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--images", type=int, default=10_000)
    p.add_argument("--workers", type=int, default=default_workers())
    p.add_argument("--preset", default="demo", help="proposal preset of the scale build")
    p.add_argument("--repeat", type=int, default=5, help="runs per start-up timing (median)")
    args = p.parse_args()
    from aligndet.data.demo import ensure_demo
    ensure_demo(os.path.join(ROOT, "data/demo"))
    scenes = sorted(os.path.join(ROOT, "data/demo/train", f) for f in os.listdir(os.path.join(ROOT, "data/demo/train")))
    with tempfile.TemporaryDirectory() as tmp:
        one = os.path.join(tmp, "one")
        os.makedirs(one)
        os.symlink(scenes[0], os.path.join(one, "a.png"))
        build_one = TOOL + ["build", "--images", one, "--out", os.path.join(tmp, "one_cache"), "--workers", "1",
                            "--overwrite"]
        startup = {"--help": timed(TOOL + ["--help"], args.repeat), "build of 1 image": timed(build_one, args.repeat),
                   "info": timed(TOOL + ["info", "--cache", os.path.join(tmp, "one_cache")], args.repeat)}
        print("start-up, median of", args.repeat, "runs:",
              ", ".join(f"{k} {v:.2f} s" for k, v in startup.items()), "(target <= 0.5 s)")
        print(large_jpeg(tmp, scenes[0], args.repeat))

        folder = os.path.join(tmp, "images")
        os.makedirs(folder)
        for i in range(args.images):
            os.symlink(scenes[i % len(scenes)], os.path.join(folder, f"{i:06d}.png"))
        out = os.path.join(tmp, "cache")
        command = TOOL + ["build", "--images", folder, "--out", out, "--preset", args.preset,
                          "--workers", str(args.workers)]
        start = time.perf_counter()
        process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
        peak = 0
        while process.poll() is None:
            peak = max(peak, tree_rss(process.pid))
            time.sleep(0.1)
        wall = time.perf_counter() - start
        summary = process.stdout.read()
        if process.returncode:
            sys.exit(f"the build failed:\n{summary}")
        size = du(out)
    print(summary.strip())
    print(f"\n{args.images} images ({args.preset} preset), {args.workers} workers: {wall:.1f} s wall, "
          f"{args.images / wall:.1f} images/s, {args.images / wall / args.workers:.1f} images/s per worker; "
          f"peak memory of the process tree {peak / 2**20:.0f} MiB; cache {size / 2**20:.2f} MiB "
          f"({size / args.images:.0f} bytes per image)")


if __name__ == "__main__":
    main()
