"""`python -m launch.benchmark data [--json] [--samples N] [--sources ...]`: loader throughput against raw reads.

Part 1 (source `latent`) writes PixArt-sized latent + text-embedding samples (4×32×32 fp16 latent, 300×4096 fp16 embedding
with its mask, ≈2.5 MB) as webdataset and MDS shards, then measures, side by side in one run:
the raw sequential read rate of those shard files (warm page cache, large buffers), measured
right before each loader run, and the loader's samples/s and bytes/s (bytes of shard files) with
0, 1 and 2 workers. Bar: 2 workers ≥ 50% of the raw rate.

Part 2 (sources `wds`, `mds`, `s3`): third-party 256² JPEG sets read + decoded, against a raw
read + decode of the same bytes (see `launch/benchmarks/data_sources.py`).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from typing import Any

import numpy as np

from data.config import DataConfig
from data.loader import build_loader
from data.manifest import read_manifest
from data.writers import write_samples
from launch.benchmarks import data_sources

BAR = 0.5


def synthetic_samples(n: int, latent: tuple[int, ...], text: tuple[int, int], seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        mask = np.zeros(text[0], np.uint8)
        mask[: rng.integers(8, text[0])] = 1
        yield {"key": f"{i:08d}", "latent": rng.standard_normal(latent, np.float32).astype(np.float16),
               "text_emb": (rng.standard_normal(text, np.float32) * 0.1).astype(np.float16), "text_mask": mask}


def raw_read_rate(paths: list[str], repeats: int) -> float:
    """Best of `repeats` sequential passes over the files (after one warming pass), bytes/s."""
    buf = bytearray(16 << 20)
    view = memoryview(buf)
    best = 0.0
    for r in range(repeats + 1):
        t0, total = time.perf_counter(), 0
        for p in paths:
            with open(p, "rb", buffering=0) as f:
                while n := f.readinto(view):
                    total += n
        rate = total / (time.perf_counter() - t0)
        if r:  # pass 0 warms the page cache
            best = max(best, rate)
    return best


def loader_rate(fmt: str, path: str, workers: int, batch_size: int, epochs: int) -> float:
    """Samples/s over `epochs` epochs, after a first epoch that starts the workers and fills their buffers."""
    cfg = DataConfig(format=fmt, path=path, input="latent", cond="text_emb", batch_size=batch_size, num_workers=workers,
                     prefetch_factor=2, shuffle=True)
    loader = build_loader(cfg, 0, 1)
    batches = loader.steps_per_epoch
    for _ in range(batches):
        next(loader)
    t0 = time.perf_counter()
    for _ in range(epochs * batches):
        next(loader)
    rate = epochs * batches * batch_size / (time.perf_counter() - t0)
    loader.close()
    return rate


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark data", description=__doc__.splitlines()[0])
    p.add_argument("--json", action="store_true", help="print results as JSON")
    p.add_argument("--samples", type=int, default=384, help="samples written per format (≈2.5 MB each)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--latent", default="4,32,32", help="latent shape C,H,W")
    p.add_argument("--text", default="300,4096", help="text embedding shape L,D")
    p.add_argument("--repeats", type=int, default=2, help="raw-read passes before each loader run (best is kept)")
    p.add_argument("--epochs", type=int, default=2, help="loader epochs timed (after one warm-up epoch)")
    p.add_argument("--dir", default=None, help="where to write the shards (default: a temp dir, removed after)")
    p.add_argument("--sources", nargs="+", default=["latent", "wds", "mds", "s3"], choices=["latent", "wds", "mds", "s3"])
    p.add_argument("--image-samples", type=int, default=512, help="JPEG samples per third-party source")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--image-workers", type=int, nargs="+", default=[0, 2])
    p.add_argument("--image-repeats", type=int, default=3, help="paired raw/loader measurements per row (median kept)")
    p.add_argument("--per-shard", type=int, default=64, help="JPEG samples per shard")
    args = p.parse_args(argv)
    latent = tuple(int(s) for s in args.latent.split(","))
    text = tuple(int(s) for s in args.text.split(","))
    if len(text) != 2 or len(latent) != 3:
        p.error("--latent is C,H,W and --text is L,D")
    load_before = os.getloadavg()[0]  # other processes on the machine skew every number: say how busy it was
    root = tempfile.mkdtemp(prefix="ditill-bench-", dir=args.dir)
    results: list[dict[str, Any]] = []
    images: list[dict[str, Any]] = []
    try:
        image_sources = [s for s in args.sources if s != "latent"]
        if image_sources:
            images = data_sources.run_sources(os.path.join(root, "images"), sources=image_sources, n=args.image_samples,
                                              size=args.image_size, per_shard=args.per_shard, batch_size=args.batch_size,
                                              workers=args.image_workers, repeats=args.image_repeats, epochs=args.epochs)
        meta = {"source": "synthetic", "latent": {"scaling_factor": 0.13025, "shift_factor": 0.0},
                "text": {"max_length": text[0], "dim": text[1]}}
        for fmt in (("wds", "mds") if "latent" in args.sources else ()):
            path = os.path.join(root, fmt)
            write_samples(synthetic_samples(args.samples, latent, text), path, fmt, meta, samples_per_shard=64)
            manifest = read_manifest(path)
            files = [os.path.join(path, s.path) for g in manifest.groups for s in g.shards]
            per_sample = sum(os.path.getsize(f) for f in files) / args.samples
            rows, raws = [], []
            for w in args.workers:  # each loader run beside a raw read of the same files, just before it
                raws.append(raw_read_rate(files, args.repeats))
                sps = loader_rate(fmt, path, w, args.batch_size, args.epochs)
                rows.append({"format": fmt, "reader": "loader", "workers": w, "samples_per_s": sps,
                             "bytes_per_s": sps * per_sample, "raw_bytes_per_s": raws[-1], "ratio": sps * per_sample / raws[-1]})
            raw = float(np.median(raws))
            results += [{"format": fmt, "reader": "raw sequential read", "workers": None, "samples_per_s": raw / per_sample,
                         "bytes_per_s": raw, "raw_bytes_per_s": raw, "ratio": 1.0}] + rows
            shutil.rmtree(path)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    passed = all(r["ratio"] >= BAR for r in results if r["workers"] == 2)
    image_verdicts = data_sources.verdicts(images)
    load = {"before": load_before, "after": os.getloadavg()[0], "cpus": os.cpu_count()}
    if args.json:
        print(json.dumps({"suite": "data", "samples": args.samples, "batch_size": args.batch_size, "sample_shape":
                          {"latent": latent, "text_emb": text}, "bar": BAR, "passed": passed, "load_average": load, "results": results,
                          "images": {"samples": args.image_samples, "size": args.image_size, "rows": images,
                                     "bars": image_verdicts}}, indent=1))
        return 0
    if results:
        print(f"data loader vs raw read: {args.samples} samples/format, latent {latent} + text {text} fp16, batch {args.batch_size}; "
              f"load average {load['before']:.1f} → {load['after']:.1f} on {load['cpus']} CPUs")
        print(f"{'format':<6} {'reader':<20} {'workers':>7} {'samples/s':>10} {'MB/s':>9} {'raw MB/s':>9} {'ratio':>6}")
        for r in results:
            w = "-" if r["workers"] is None else r["workers"]
            print(f"{r['format']:<6} {r['reader']:<20} {w:>7} {r['samples_per_s']:>10.1f} {r['bytes_per_s'] / 1e6:>9.1f} "
                  f"{r['raw_bytes_per_s'] / 1e6:>9.1f} {r['ratio']:>6.2f}")
        print("raw MB/s: the raw read measured just before each loader run (the raw row is their median); "
              "ratio = loader MB/s / that raw MB/s")
        print(f"bar: loader with 2 workers ≥ {BAR:.0%} of raw — {'met' if passed else 'NOT met'}")
    if images:
        print(f"\nthird-party JPEG sources: {args.image_samples} samples of {args.image_size}² per source, batch {args.batch_size}; "
              f"load average {load['before']:.1f} → {load['after']:.1f} on {load['cpus']} CPUs")
        data_sources.print_rows(images, load)
        for what, ok in image_verdicts.items():
            print(f"bar: {what} — {'met' if ok else 'NOT met'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
