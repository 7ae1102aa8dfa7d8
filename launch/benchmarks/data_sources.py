"""Third-party sources for `python -m launch.benchmark data`: JPEG images read as users hold them.

Three sources of the same 256² JPEG samples (≈20 KB each, smooth synthetic pictures, quality 90):
`wds` — img2dataset-style tars on local disk; `mds` — a zstd-compressed MDS set with a `jpeg`
column (written by streaming's MDSWriter); `s3` — the same tars on a local S3 server (moto, in
its own process so it does not share the benchmark's interpreter).

Beside each loader figure sits a *raw* rate measured the same way on the same cores just before
it: one process reads the shard bytes (the file, or a GET from the server), walks them (tar
members; MDS decompress + offsets) and decodes every image to the float tensor the loader makes,
no loader in between. Both sides add up a checksum of what they decoded, so a benchmark that
measured different work fails its own check. Bars: with 0 workers the loader adds ≤ 0.2 ms per
sample to the raw time; with 2 workers it delivers ≥ 0.5 × the raw rate from local shards and
≥ 0.3 × from the S3 server. The 0-worker overhead is taken in *CPU time of this process* (all its
threads), because on a shared machine the wall time of a pass swings by more than the overhead;
the wall-time difference is printed beside it. Each figure is the median of paired repeats.
"""
from __future__ import annotations

import io
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tarfile
import time
from contextlib import contextmanager
from typing import Any, Callable, Iterator

import numpy as np

from data.config import DataConfig
from data.decode import decode_image
from data.loader import build_loader

OVERHEAD_BAR_MS = 0.2
RATIO_BAR = {"wds": 0.5, "mds": 0.5, "s3": 0.3}


def picture(i: int, size: int) -> bytes:
    """A smooth picture with shapes and mild noise (photo-like JPEG size and decode cost, unlike pure noise)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(i)
    y, x = np.mgrid[0:size, 0:size] / size
    base = np.stack([np.sin(x * rng.uniform(2, 9) + rng.uniform(0, 6)), np.cos(y * rng.uniform(2, 9)),
                     np.sin((x + y) * rng.uniform(2, 9))], -1)
    arr = ((base * 0.5 + 0.5) * 200 + rng.normal(0, 12, base.shape)).clip(0, 255).astype(np.uint8)
    im = Image.fromarray(arr)
    draw = ImageDraw.Draw(im)
    for _ in range(6):
        (a, b), (c, d) = np.sort(rng.integers(0, size, (2, 2)), axis=1)
        draw.ellipse([int(a), int(c), int(b) + 1, int(d) + 1], fill=tuple(int(v) for v in rng.integers(0, 255, 3)))
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def write_sources(root: str, n: int, size: int, per_shard: int) -> dict[str, str]:
    """The same n pictures as img2dataset tars (+ stats files) and as a zstd MDS set."""
    from streaming import MDSWriter

    wds, mds = os.path.join(root, "wds"), os.path.join(root, "mds")
    os.makedirs(wds)
    pics = [picture(i, size) for i in range(n)]
    for s in range(0, n, per_shard):
        chunk = range(s, min(n, s + per_shard))
        with tarfile.open(os.path.join(wds, f"{s // per_shard:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in chunk:
                for ext, data in (("jpg", pics[i]), ("txt", f"picture {i}".encode())):
                    info = tarfile.TarInfo(f"{i:09d}.{ext}")
                    info.size = len(data)
                    tf.addfile(info, io.BytesIO(data))
        with open(os.path.join(wds, f"{s // per_shard:05d}_stats.json"), "w") as f:
            json.dump({"successes": len(chunk), "count": len(chunk)}, f)
    shard_bytes = int(np.mean([len(p) for p in pics]) * per_shard * 1.02)
    with MDSWriter(out=mds, columns={"key": "str", "jpg": "jpeg", "caption": "str"}, compression="zstd",
                   hashes=["xxh64"], size_limit=shard_bytes) as writer:
        from PIL import Image

        tmp = os.path.join(root, "picture.jpg")
        for i, p in enumerate(pics):
            with open(tmp, "wb") as f:
                f.write(p)
            with Image.open(tmp) as im:  # opened from a file, streaming's jpeg encoding keeps its bytes as they are
                writer.write({"key": f"{i:09d}", "jpg": im, "caption": f"picture {i}"})
        os.remove(tmp)
    return {"wds": wds, "mds": mds}


# --- raw: read + decode, no loader ---------------------------------------------------------------

def _tar_images(data: bytes) -> Iterator[bytes]:
    with tarfile.open(fileobj=io.BytesIO(data), mode="r:") as tf:
        for m in tf:
            if m.name.endswith(".jpg"):
                yield tf.extractfile(m).read()  # type: ignore[union-attr]


def _mds_images(data: bytes, entry: dict[str, Any]) -> Iterator[bytes]:
    from streaming.base.compression import decompress

    raw = decompress(entry["compression"], data)
    n = int(np.frombuffer(raw[:4], np.uint32)[0])
    offsets = np.frombuffer(raw[4:4 * (n + 2)], np.uint32)
    col = entry["column_names"].index("jpg")
    sizes = entry["column_sizes"]
    for a, b in zip(offsets[:-1], offsets[1:]):
        sample = raw[int(a):int(b)]
        var = [s is None for s in sizes]
        lens = list(np.frombuffer(sample[:4 * sum(var)], np.uint32))
        pos, got = 4 * sum(var), []
        for s in sizes:
            got.append(int(lens.pop(0)) if s is None else s)
        start = pos + sum(got[:col])
        yield sample[start:start + got[col]]


def raw_rate(kind: str, path: str, size: int, s3_endpoint: str = "") -> tuple[float, float, float, int]:
    """(samples/s, CPU s/sample, checksum, samples) of one pass: read every shard, walk it, decode every image."""
    if kind == "mds":
        entries = json.load(open(os.path.join(path, "index.json")))["shards"]
        shards = [(os.path.join(path, e["zip_data"]["basename"]), e) for e in entries]
    else:
        shards = [(os.path.join(path, n), None) for n in sorted(os.listdir(path)) if n.endswith(".tar")]
    client = None
    if kind == "s3":
        import boto3

        client = boto3.client("s3", endpoint_url=s3_endpoint)
    t0, c0, total, n, aside = time.perf_counter(), time.process_time(), 0.0, 0, _Aside()
    for file, entry in shards:
        if client is not None:
            data = client.get_object(Bucket="bench", Key=f"wds/{os.path.basename(file)}")["Body"].read()
        else:
            with open(file, "rb") as f:
                data = f.read()
        for jpg in (_mds_images(data, entry) if entry else _tar_images(data)):
            x = decode_image(jpg, (3, size, size))
            with aside:
                total += float(x.double().mean())
            n += 1
    return n / (time.perf_counter() - t0 - aside.wall), (time.process_time() - c0 - aside.cpu) / n, total, n


class _Aside:
    """Time spent on the checksum, taken out of both sides' figures."""

    def __init__(self) -> None:
        self.wall = self.cpu = 0.0

    def __enter__(self) -> None:
        self._t, self._c = time.perf_counter(), time.process_time()

    def __exit__(self, *exc: Any) -> None:
        self.wall += time.perf_counter() - self._t
        self.cpu += time.process_time() - self._c


# --- the loader, the same work ---------------------------------------------------------------------

def loader_rate(cfg: DataConfig, epochs: int, n: int) -> tuple[float, float, float, int]:
    """(samples/s, CPU s/sample in this process, checksum of the first timed epoch, samples per epoch)
    over `epochs` epochs after one warm-up epoch."""
    loader = build_loader(cfg, 0, 1)
    steps = n // cfg.batch_size
    for _ in range(steps):
        next(loader)
    t0, c0, total, seen, aside = time.perf_counter(), time.process_time(), 0.0, 0, _Aside()
    for e in range(epochs):
        for _ in range(steps):
            x = next(loader)["x"]
            if e == 0:
                with aside:
                    total += float(x.double().mean(dim=(1, 2, 3)).sum())
            seen += len(x)
    rate = seen / (time.perf_counter() - t0 - aside.wall)
    cpu = (time.process_time() - c0 - aside.cpu) / seen
    loader.close()
    return rate, cpu, total, steps * cfg.batch_size


@contextmanager
def s3_server(wds: str) -> Iterator[str]:
    """moto's S3 server in its own process on 127.0.0.1, the tars uploaded to s3://bench/wds/."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"http://127.0.0.1:{port}"
    env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "bench", "AWS_SECRET_ACCESS_KEY": "bench",
           "AWS_DEFAULT_REGION": "us-east-1"}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise RuntimeError("moto's S3 server did not start (is moto[server] installed?)")
                time.sleep(0.2)
        client = boto3.client("s3", endpoint_url=endpoint)
        client.create_bucket(Bucket="bench")
        for name in sorted(os.listdir(wds)):
            client.upload_file(os.path.join(wds, name), "bench", f"wds/{name}")
        yield endpoint
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        proc.terminate()
        proc.wait(timeout=30)


def run_sources(root: str, *, sources: list[str], n: int, size: int, per_shard: int, batch_size: int,
                workers: list[int], repeats: int, epochs: int) -> list[dict[str, Any]]:
    paths = write_sources(root, n, size, per_shard)
    shard_bytes = os.path.getsize(os.path.join(paths["wds"], "00000.tar"))
    rows: list[dict[str, Any]] = []
    for kind in sources:
        with (s3_server(paths["wds"]) if kind == "s3" else _nothing()) as endpoint:
            location = "s3://bench/wds" if kind == "s3" else paths["wds" if kind == "s3" else kind]
            cache = os.path.join(root, f"cache-{kind}")
            # S3: a cache of 3 shards, so every epoch streams from the server again (steady state)
            cfg = dict(format="mds" if kind == "mds" else "wds", layout="plain", path=location, cond="caption",
                       batch_size=batch_size, image_size=size, streams=1, shuffle_window=per_shard,
                       fields={"image": "jpg"} if kind == "mds" else {}, cache_dir=cache,
                       cache_gb=(3.2 * shard_bytes if kind == "s3" else 64e9) / 1e9)
            for w in workers:
                pairs = []
                for _ in range(repeats):
                    raw = raw_rate(kind, paths["wds" if kind == "s3" else kind], size, endpoint or "")
                    shutil.rmtree(cache, ignore_errors=True)
                    pairs.append((raw, loader_rate(DataConfig(**cfg, num_workers=w), epochs, n)))
                med = statistics.median
                rows.append({"source": kind, "workers": w, "raw_samples_per_s": med(r[0] for r, _ in pairs),
                             "samples_per_s": med(ld[0] for _, ld in pairs), "ratio": med(ld[0] / r[0] for r, ld in pairs),
                             "overhead_ms": med(1e3 * (ld[1] - r[1]) for r, ld in pairs) if w == 0 else None,
                             "wall_overhead_ms": med(1e3 * (1 / ld[0] - 1 / r[0]) for r, ld in pairs),
                             "raw_cpu_ms": med(1e3 * r[1] for r, _ in pairs), "raw_checksum": pairs[0][0][2],
                             "loader_checksum": pairs[0][1][2], "raw_samples": pairs[0][0][3],
                             "loader_epoch_samples": pairs[0][1][3], "repeats": repeats})
    return rows


@contextmanager
def _nothing() -> Iterator[str]:
    yield ""


def verdicts(rows: list[dict[str, Any]]) -> dict[str, bool]:
    out = {}
    for r in rows:
        if r["workers"] == 0:
            out[f"{r['source']}: 0 workers add ≤ {OVERHEAD_BAR_MS} ms/sample"] = r["overhead_ms"] <= OVERHEAD_BAR_MS
        if r["workers"] == 2:
            out[f"{r['source']}: 2 workers ≥ {RATIO_BAR[r['source']]} × raw"] = r["ratio"] >= RATIO_BAR[r["source"]]
    return out


def print_rows(rows: list[dict[str, Any]], load: dict[str, Any], printer: Callable[[str], None] = print) -> None:
    printer(f"{'source':<6} {'workers':>7} {'raw/s':>8} {'loader/s':>9} {'ratio':>6} {'raw CPU ms':>10} "
            f"{'+CPU ms':>8} {'+wall ms':>8}")
    for r in rows:
        cpu = "-" if r["overhead_ms"] is None else f"{r['overhead_ms']:.3f}"
        printer(f"{r['source']:<6} {r['workers']:>7} {r['raw_samples_per_s']:>8.1f} {r['samples_per_s']:>9.1f} "
                f"{r['ratio']:>6.2f} {r['raw_cpu_ms']:>10.3f} {cpu:>8} {r['wall_overhead_ms']:>8.3f}")
    printer("raw: one process reading + decoding every image (no loader), measured just before each loader run; "
            "+CPU ms / +wall ms: what the loader adds per sample (CPU time of this process / wall time); "
            "every figure the median of the paired repeats")
