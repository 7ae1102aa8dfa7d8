"""Third-party shard sets as a `Source` for the shard writers: resharding into DiTill's shards.

`launch.make_shards --source webdataset|mds` turns an img2dataset webdataset or an MDS set (local
or in object storage) into DiTill shards with a manifest — the exact-plan layout, aspect-ratio
buckets, and the input `launch.precompute` adds latents and text embeddings to. Each item keeps
its sample's key; images other than PNG/JPEG (WebP, MDS `pil` columns) are re-encoded as PNG;
`json` gets the original size for bucketing. A sample that cannot be read is skipped and reported
by the writer, like a broken file of an image folder.
"""
from __future__ import annotations

import io
import re
from collections import OrderedDict
from typing import Any

import numpy as np
from PIL import Image

from data.config import DataConfig
from data.readers import ShardError, ShardReader
from data.schema import SampleError, image_ext
from data.sources import Source, SourceItem, SourceItemError
from data.thirdparty import PlainShard, list_shards

OPTIONAL = ("caption", "cls")  # carried over when the set's first sample has them
MAX_OPEN = 8


class _Readers:
    """Open readers of the conversion, least recently used closed first."""

    def __init__(self) -> None:
        self.open: OrderedDict[str, ShardReader] = OrderedDict()

    def get(self, shard: PlainShard) -> ShardReader:
        reader = self.open.get(shard.path)
        if reader is None:
            reader = self.open[shard.path] = shard.open()
            if len(self.open) > MAX_OPEN:
                self.open.popitem(last=False)[1].close()
        self.open.move_to_end(shard.path)
        return reader


def thirdparty_source(fmt: str, location: str, fields: dict[str, str] | None = None, *, cache_dir: str | None = None,
                      cache_gb: float = 64.0) -> Source:
    """Every sample of the set at `location` (`fmt`: wds | mds), in shard order, as a lazy Source."""
    cfg = DataConfig(format=fmt, layout="plain", path=location, fields=dict(fields or {}), cond="none",
                     cache_dir=cache_dir, cache_gb=cache_gb)
    cfg.validate()
    shards = list_shards(cfg)
    readers = _Readers()
    wanted = _wanted(shards[0], readers)
    items: list[SourceItem] = []
    for s, shard in enumerate(shards):
        try:
            reader = readers.get(shard)
        except ShardError as e:
            items.append(SourceItem(f"{s:06d}", _failing(str(e)), shard.path))  # reported (and skipped) by the writer
            continue
        count = shard.known_count() if shard.kind == "mds" else len(reader.keys)  # type: ignore[attr-defined]
        for i in range(count):
            key = _key(reader, shard, s, i)
            items.append(SourceItem(key, (lambda sh=shard, i=i: _load(sh, i, readers, wanted)), f"{shard.path} #{i}"))
    return Source(f"{fmt}:{location}", items, channels=3)


def _wanted(first: PlainShard, readers: _Readers) -> frozenset[str]:
    try:
        raw = readers.get(first).read(0, frozenset({"image", *OPTIONAL}))
    except (ShardError, SampleError) as e:
        raise ValueError(f"the first sample of {first.path} cannot be read ({e}); fix or remove that shard") from e
    if "image" not in raw:
        raise ValueError(f"the first sample of {first.path} has no image; map its member extension or column with --fields image=EXT")
    return frozenset({"image", *(f for f in OPTIONAL if f in raw)})


def _key(reader: ShardReader, shard: PlainShard, s: int, i: int) -> str:
    """The sample's own key (webdataset key, MDS `key` column), made safe for a file name; else shard_index."""
    if shard.kind == "wds":
        key = str(reader.keys[i])  # type: ignore[attr-defined]
    else:
        try:
            key = str(reader.read(i, frozenset())["key"])
        except SampleError:
            key = ""
    if not key or ":" in key:  # no key of its own (the MDS reader's fallback names shard:index)
        return f"{s:06d}_{i:06d}"
    return re.sub(r"[^A-Za-z0-9_-]", "_", key)


def _failing(message: str):
    def load() -> dict[str, Any]:
        raise SourceItemError(message)

    return load


def _load(shard: PlainShard, index: int, readers: _Readers, wanted: frozenset[str]) -> dict[str, Any]:
    try:
        raw = readers.get(shard).read(index, wanted)
    except (ShardError, SampleError) as e:
        raise SourceItemError(f"{shard.path} #{index}: {e}") from e
    missing = sorted(wanted - raw.keys())
    if missing:
        raise SourceItemError(f"{shard.path} #{index} has no {', '.join(missing)} (the set's first sample has them)")
    image, (h, w) = _image(raw["image"], f"{shard.path} #{index}")
    out: dict[str, Any] = {"image": image, "json": {"source": f"{shard.path}#{index}", "original_size": [h, w],
                                                    "aspect_ratio": round(h / w, 6)}}
    if "caption" in wanted:
        out["caption"] = raw["caption"]
    if "cls" in wanted:
        out["cls"] = int(raw["cls"])
    return out


def _image(value: Any, where: str) -> tuple[bytes, tuple[int, int]]:
    """PNG/JPEG bytes kept as they are; anything else (WebP, raw pixels) becomes PNG."""
    try:
        if isinstance(value, np.ndarray):
            im = Image.fromarray(value)
        else:
            data = bytes(value)
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                size = im.size
                try:
                    image_ext(data)
                    return data, (size[1], size[0])
                except ValueError:
                    im = im.convert("RGB")
        buf = io.BytesIO()
        im.save(buf, format="PNG")
        return buf.getvalue(), (im.size[1], im.size[0])
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SourceItemError(f"{where}: image cannot be decoded: {type(e).__name__}: {e}") from e
