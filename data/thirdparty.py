"""Third-party shard sets (`data.layout: plain`): webdataset tars and MDS sets DiTill did not write.

No manifest and no scan: the shard list comes from a directory listing, a brace pattern
(`s3://b/laion/{00000..41407}.tar`, img2dataset's naming) or an MDS `index.json`; a tar's sample
count comes from img2dataset's `<shard>_stats.json` ("successes") where it exists, else from the
tar itself when it is first opened. Remote shards, and compressed MDS shards anywhere, are read
from the node's bounded cache (`data/cache.py`); local uncompressed shards are read in place.
Nothing is written next to the data.

MDS columns are decoded here beyond DiTill's own encodings (`jpeg`, `png`, `pil`, scalars, the
`str_*` numbers); the compression codecs (zstd, gz, bz2, br, snappy) and the hashes are
mosaicml-streaming's own, so any set its `MDSWriter` wrote reads the same here.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from data.cache import ShardCache
from data.config import DataConfig
from data.decode import SampleSpec
from data.readers import MdsShard, ShardError, ShardReader, WdsShard
from data.schema import SampleError, mds_decode_column
from data.stores import Missing, RetryPolicy, is_remote, join, local_path, store_for

log = logging.getLogger("ditill.data")

# DiTill field → member extensions (wds) or column names (mds), first present wins
WDS_DEFAULTS = {"image": "jpg;jpeg;png;webp", "caption": "txt", "cls": "cls", "latent": "latent.npy",
                "text_emb": "text_emb.npy", "text_mask": "text_mask.npy"}
MDS_DEFAULTS = {"image": "image;jpg;jpeg;png;img", "caption": "caption;txt;text", "cls": "cls;label;class",
                "latent": "latent", "text_emb": "text_emb", "text_mask": "text_mask"}
MDS_IMAGE_ENCODINGS = ("jpeg", "png", "pil", "bytes")
MDS_SCALARS = ("uint8", "uint16", "uint32", "uint64", "int8", "int16", "int32", "int64", "float16", "float32", "float64")


def field_map(cfg: DataConfig) -> dict[str, list[str]]:
    base = WDS_DEFAULTS if cfg.format == "wds" else MDS_DEFAULTS
    return {f: [a for a in v.split(";") if a] for f, v in {**base, **cfg.fields}.items()}


@dataclass(frozen=True)
class Access:
    """How a process reaches shards: retry policy, cache, hash checks (picklable, built per process)."""

    cache_dir: Optional[str]
    cache_bytes: int
    policy: RetryPolicy
    verify_hashes: bool

    @classmethod
    def from_config(cls, cfg: DataConfig) -> "Access":
        return cls(cfg.cache_dir, int(cfg.cache_gb * 1e9), RetryPolicy(cfg.retries, cfg.retry_wait_s), cfg.verify_hashes)

    def cache(self) -> ShardCache:
        key = (self.cache_dir, self.cache_bytes, os.getpid())
        if _CACHES.get("key") != key:
            _CACHES.clear()
            _CACHES.update(key=key, cache=ShardCache(self.cache_dir, self.cache_bytes))
        return _CACHES["cache"]


_CACHES: dict[str, Any] = {}
_STATS: dict[str, Optional[int]] = {}  # stats location → successes (None: no stats file), per process


@dataclass(frozen=True)
class PlainShard:
    kind: str  # wds | mds
    path: str  # its location, as named in messages
    access: Access
    stats: Optional[str] = None  # img2dataset's stats file that may count it
    entry: Optional[dict[str, Any]] = None  # MDS: its index.json entry
    mapping: dict[str, str] = field(default_factory=dict)  # wds: ext → field; mds: column → field

    def known_count(self) -> Optional[int]:
        """Samples counted without opening the shard: the MDS index, or a stats file (None: open it)."""
        if self.entry is not None:
            return int(self.entry["samples"])
        if self.stats is None:
            return None
        if self.stats not in _STATS:
            try:
                stats = json.loads(store_for(self.stats, self.access.policy).read(self.stats))
                _STATS[self.stats] = int(stats["successes"])
            except Missing:
                _STATS[self.stats] = None
            except (ValueError, KeyError, TypeError) as e:
                log.warning("%s is not an img2dataset stats file (%s); the tar is counted instead", self.stats, e)
                _STATS[self.stats] = None
        return _STATS[self.stats]

    def open(self) -> ShardReader:
        local = self._local()
        if self.kind == "wds":
            return WdsShard(local, self.known_count(), self.mapping)
        assert self.entry is not None
        return MdsShard(local, {**self.entry, "compression": None}, self.mapping, decode_column)

    def _local(self) -> str:
        """A local file with the shard's (decompressed, verified) bytes; Missing → ShardError."""
        compression = (self.entry or {}).get("compression")
        try:
            if not is_remote(self.path) and not compression:
                if self.entry is not None and self.access.verify_hashes:
                    _verify_in_place(local_path(self.path), self.entry)
                return local_path(self.path)
            store = store_for(self.path, self.access.policy)
            finish = None
            if self.entry is not None and (compression or (self.access.verify_hashes and _hashes(self.entry, "raw_data"))):
                finish = _mds_finisher(self.entry, self.access.verify_hashes, self.path)
            return self.access.cache().fetch(self.path, store, suffix=".mds" if compression else "", finish=finish)
        except Missing as e:
            raise ShardError(f"{self.path} does not exist ({e})") from e
        except OSError as e:
            raise ShardError(f"cannot read {self.path}: {e}") from e


def _hashes(entry: dict[str, Any], part: str) -> dict[str, str]:
    return dict((entry.get(part) or {}).get("hashes") or {})


def _check_hash(path: str, want: dict[str, str], where: str) -> None:
    """Against one recorded hash (the cheapest of those recorded), with streaming's hash functions."""
    if not want:
        return
    from streaming.base.hashing import get_hash

    algo = min(want, key=lambda a: (not a.startswith("xxh"), a))
    with open(path, "rb") as f:
        got = get_hash(algo, f.read())
    if got != want[algo]:
        raise ShardError(f"{where}: its {algo} hash is {got}, index.json records {want[algo]}: the shard is damaged "
                         "(or index.json belongs to other shards)")


_VERIFIED: set[tuple[str, int, float]] = set()


def _verify_in_place(path: str, entry: dict[str, Any]) -> None:
    try:
        st = os.stat(path)
    except FileNotFoundError as e:
        raise Missing(path) from e
    key = (path, st.st_size, st.st_mtime)
    if key not in _VERIFIED:
        _check_hash(path, _hashes(entry, "raw_data"), path)
        _VERIFIED.add(key)


def _mds_finisher(entry: dict[str, Any], verify: bool, where: str):
    def finish(downloaded: str, out: str) -> None:
        compression = entry.get("compression")
        if verify:
            _check_hash(downloaded, _hashes(entry, "zip_data" if compression else "raw_data"), where)
        if not compression:
            os.replace(downloaded, out)
            return
        from streaming.base.compression import decompress

        with open(downloaded, "rb") as f:
            try:
                raw = decompress(compression, f.read())
            except Exception as e:  # each codec raises its own error type
                raise ShardError(f"{where}: cannot decompress ({compression}): {type(e).__name__}: {e}") from e
        with open(out, "wb") as f:
            f.write(raw)
        if verify:
            _check_hash(out, _hashes(entry, "raw_data"), where)

    return finish


def decode_column(encoding: str, data: memoryview) -> Any:
    """DiTill's MDS decoders plus the encodings third-party sets use for images and labels."""
    name = encoding.split(":")[0]
    if name in ("jpeg", "png"):
        return data  # the encoded file: decoded (and resized) like any image
    if name in MDS_SCALARS:
        return np.frombuffer(data, name)[0].item()
    if name in ("str_int", "str_float", "str_decimal"):
        text = bytes(data).decode("utf-8")
        return int(text) if name == "str_int" else float(text)
    if name == "pil":  # streaming's raw PIL layout: [width u32][height u32][mode size u32][mode][pixels]
        from PIL import Image

        try:
            w, h, n = (int(v) for v in np.frombuffer(data[:12], np.uint32))
            im = Image.frombytes(bytes(data[12:12 + n]).decode("utf-8"), (w, h), bytes(data[12 + n:]))
            return np.array(im if im.mode in ("L", "RGB") else im.convert("RGB"))
        except (OSError, ValueError, UnicodeDecodeError) as e:
            raise ValueError(f"pil column: {e}") from e
    return mds_decode_column(encoding, data)


# --- discovering a set ---------------------------------------------------------------------------

@dataclass(frozen=True)
class StreamCatalog:
    """What the stream loader reads: shards in listed order, one spec, and a fingerprint of the set."""

    shards: tuple[PlainShard, ...]
    specs: tuple[SampleSpec, ...]
    where: str
    fingerprint: str


def list_shards(cfg: DataConfig) -> list[PlainShard]:
    """The shards of a third-party set, in listed order (a listing, a brace pattern or index.json: no shard is read)."""
    assert cfg.path is not None
    access = Access.from_config(cfg)
    shards = _wds_shards(cfg, access) if cfg.format == "wds" else _mds_shards(cfg, access, f"the mds shards at {cfg.path}")
    if not shards:
        raise ValueError(f"the {cfg.format} shards at {cfg.path}: no {'.tar shards' if cfg.format == 'wds' else 'shards in index.json'} "
                         "found; fix data.path")
    return shards


def build_stream_catalog(cfg: DataConfig) -> StreamCatalog:
    where = f"the {cfg.format} shards at {cfg.path}"
    shards = list_shards(cfg)
    digest = hashlib.sha1("\n".join(s.path for s in shards).encode("utf-8")).hexdigest()[:16]
    spec = _peek_spec(cfg, shards, where)
    return StreamCatalog(tuple(shards), (spec,), where, f"{len(shards)}:{digest}")


def _wds_shards(cfg: DataConfig, access: Access) -> list[PlainShard]:
    path = cfg.path or ""
    store = store_for(path, access.policy)
    mapping: dict[str, str] = {}
    for f, alternatives in field_map(cfg).items():
        for ext in alternatives:
            mapping.setdefault(ext.lower(), f)
    mapping.setdefault("json", "json")
    if "{" in path:  # a brace pattern names every shard: nothing to list
        from braceexpand import braceexpand

        locations = list(braceexpand(path))
        try:
            store.size(locations[0])
        except Missing as e:
            raise ValueError(f"data.path={path!r}: its first shard {locations[0]} does not exist; fix the pattern") from e
        return [PlainShard("wds", loc, access, _stats_name(loc), mapping=mapping) for loc in locations]
    if path.endswith(".tar"):
        return [PlainShard("wds", path, access, _stats_name(path), mapping=mapping)]
    listed = [loc for loc, _ in store.list(path)]
    names = set(listed)
    return [PlainShard("wds", loc, access, _stats_name(loc) if _stats_name(loc) in names else None, mapping=mapping)
            for loc in listed if loc.endswith(".tar")]


def _stats_name(tar: str) -> str:
    return tar[: -len(".tar")] + "_stats.json"


def _mds_shards(cfg: DataConfig, access: Access, where: str) -> list[PlainShard]:
    root = cfg.path or ""
    index = join(root, "index.json")
    try:
        obj = json.loads(store_for(index, access.policy).read(index))
        entries = obj["shards"]
    except Missing as e:
        raise ValueError(f"{index} does not exist: an MDS set is read through its index.json (as streaming's MDSWriter "
                         "writes it); fix data.path") from e
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{index} is not an MDS index ({type(e).__name__}: {e})") from e
    wanted = field_map(cfg)
    shards = []
    for n, entry in enumerate(entries):
        if entry.get("format") != "mds":
            raise ValueError(f"{index}: shard {n} has format {entry.get('format')!r}; only 'mds' shards are read")
        rename = _mds_rename(entry, wanted, f"{index} shard {n}")
        part = "zip_data" if entry.get("compression") else "raw_data"
        shards.append(PlainShard("mds", join(root, entry[part]["basename"]), access, entry=entry, mapping=rename))
    return shards


def _mds_rename(entry: dict[str, Any], wanted: dict[str, list[str]], where: str) -> dict[str, str]:
    columns = dict(zip(entry["column_names"], entry["column_encodings"]))
    rename: dict[str, str] = {}
    for f, alternatives in wanted.items():
        col = next((c for c in alternatives if c in columns), None)
        if col is None:
            continue
        enc = columns[col].split(":")[0]
        ok = {"image": MDS_IMAGE_ENCODINGS, "caption": ("str",), "cls": ("int", "str_int") + MDS_SCALARS,
              "latent": ("ndarray",), "text_emb": ("ndarray",), "text_mask": ("ndarray",)}[f]
        if enc not in ok:
            raise ValueError(f"{where}: column {col!r} (mapped to field {f!r}) is encoded {columns[col]!r}, which DiTill "
                             f"cannot use as {f} ({', '.join(ok)}); map another column with data.fields.{f}"
                             + (" (pickled columns are never unpickled: they could run code)" if enc == "pkl" else ""))
        rename[col] = f
    if "key" in columns and columns["key"] == "str":
        rename.setdefault("key", "key")
    return rename


def _peek_spec(cfg: DataConfig, shards: list[PlainShard], where: str) -> SampleSpec:
    """The batch shapes and a check that the task's fields are there, from one sample of one shard."""
    labels = cfg.cond == "class"
    spec = SampleSpec(cfg.input, cfg.cond, (3, cfg.image_size, cfg.image_size), labels=labels)
    first = shards[0]
    try:
        reader = first.open()
        try:
            raw = reader.read(0, spec.fields)
        finally:
            reader.close()
    except (ShardError, SampleError) as e:
        raise ValueError(f"{where}: the first shard {first.path} cannot be read ({e}); it is read before training to "
                         "check the field mapping: fix or remove it") from e
    missing = sorted(spec.fields - raw.keys())
    if missing:
        defaults = WDS_DEFAULTS if cfg.format == "wds" else MDS_DEFAULTS
        hint = ", ".join(f"data.fields.{m} (now {cfg.fields.get(m, defaults[m])!r})" for m in missing)
        raise ValueError(f"data.input={cfg.input!r} / data.cond={cfg.cond!r} need the fields {sorted(spec.fields)}, but the "
                         f"first sample of {first.path} has no {', '.join(missing)}: map its member extension or column with {hint}")
    if cfg.input == "image" and cfg.cond != "text_emb":
        return spec
    x_shape = tuple(int(s) for s in np.shape(raw["latent"])) if cfg.input == "latent" else spec.x_shape
    text = tuple(int(s) for s in np.shape(raw["text_emb"])) if cfg.cond == "text_emb" else None
    if len(x_shape) != 3 or (text is not None and len(text) != 2):
        raise ValueError(f"{where}: the first sample's latent {x_shape} / text_emb {text} are not (C, h, w) / (L, D) arrays")
    return SampleSpec(cfg.input, cfg.cond, x_shape, None, text,  # type: ignore[arg-type]
                      float(cfg.latent_scale or 1.0), float(cfg.latent_shift), labels)

