"""Third-party shard sets as other tools write them: img2dataset's webdataset layout, streaming's MDS."""
from __future__ import annotations

import io
import json
import os
import tarfile
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from data import DataConfig, build_loader
from data.transforms import prepare_image, to_chw


def jpeg(i: int, size: int = 16) -> bytes:
    rng = np.random.default_rng(i)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _add(tf: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tf.addfile(info, io.BytesIO(data))


def img2dataset_dir(root: str, counts: list[int], stats: Optional[dict[int, int]] = None, size: int = 16,
                    extra: Optional[dict[str, Any]] = None) -> dict[str, dict[str, Any]]:
    """Shards `00000.tar`… as img2dataset writes them (key = shard id + index; .jpg, .txt, .json),
    a `<shard>_stats.json` for the shards in `stats` (successes as given), and key → sample."""
    os.makedirs(root, exist_ok=True)
    samples: dict[str, dict[str, Any]] = {}
    n = 0
    for s, count in enumerate(counts):
        with tarfile.open(os.path.join(root, f"{s:05d}.tar"), "w", format=tarfile.USTAR_FORMAT) as tf:
            for i in range(count):
                key = f"{s:05d}{i:04d}"
                sample = {"jpg": jpeg(n, size), "txt": f"a photo number {n}".encode(),
                          "json": json.dumps({"key": key, "url": f"https://example.com/{n}.jpg", "status": "success"}).encode()}
                for ext, make in (extra or {}).items():
                    sample[ext] = make(n)
                for ext, data in sample.items():
                    _add(tf, f"{key}.{ext}", data)
                samples[key] = {"n": n, **sample}
                n += 1
        if stats and s in stats:
            with open(os.path.join(root, f"{s:05d}_stats.json"), "w") as f:
                json.dump({"count": count + 3, "successes": stats[s], "failed_to_download": 3}, f)
        with open(os.path.join(root, f"{s:05d}.parquet"), "wb") as f:
            f.write(b"PAR1 not read by DiTill")
    return samples


def expected_image(data: bytes, size: int) -> torch.Tensor:
    """The reference decode: PIL → RGB → DiTill's resize/crop, written out independently of the loader."""
    with Image.open(io.BytesIO(data)) as im:
        return prepare_image(to_chw(np.array(im.convert("RGB"))), (size, size))


def plain(path: str, fmt: str = "wds", **kw: Any) -> DataConfig:
    base = dict(format=fmt, layout="plain", path=path, cond="caption", batch_size=4, image_size=16, shuffle_window=12,
                streams=2, seed=5)
    return DataConfig(**{**base, **kw})


def batches(cfg: DataConfig, n: int, rank: int = 0, world: int = 1, loader=None) -> list[dict[str, Any]]:
    loader = loader or build_loader(cfg, rank, world)
    return [{k: v.clone() if torch.is_tensor(v) else list(v) for k, v in next(loader).items()} for _ in range(n)]
