"""Shard writers: samples → webdataset tars or MDS shards, a manifest with sample counts.

Output is deterministic (same input and seed → same bytes): tar headers carry a fixed mtime and
owner, JSON is key-sorted, and the sample order is a seeded permutation (so shards are not sorted
by class). Every shard is written under a temporary name and renamed when complete, so a reader
or a resumed precompute never sees a partial shard.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import numpy as np

from data.buckets import nearest_bucket
from data.manifest import Group, Manifest, ShardRecord, write_manifest
from data.schema import mds_columns, mds_encoding, wds_members
from data.sources import Source, SourceItemError

log = logging.getLogger("ditill.data")

BLOCK, RECORD = 512, 10240  # tar: a member is a header block + data padded to blocks; files are whole records


def shard_size(fmt: str, payload: int) -> int:
    """File size of a shard whose samples add up to `payload` bytes (as `sample_bytes` counts them)."""
    if fmt == "wds":
        return -(-(payload + 2 * BLOCK) // RECORD) * RECORD  # + the end-of-archive blocks, rounded to records
    return 4 + 4 + payload  # MDS: sample count + the offset table's final entry


def shard_name(fmt: str, index: int) -> str:
    return f"shard-{index:06d}.tar" if fmt == "wds" else f"shard.{index:05d}.mds"


def group_dir(key: str) -> str:
    """Bucketed groups live in their own folder (an MDS stream each); the unbucketed group at the top."""
    return f"bucket-{key}" if key else ""


def sample_bytes(sample: dict[str, Any], fmt: str) -> int:
    """Bytes the sample adds to a shard (an upper bound), counted against the bytes-per-shard limit."""
    if fmt == "wds":
        members = wds_members(sample)
        return sum(BLOCK + -(-len(v) // BLOCK) * BLOCK for k, v in members.items() if k != "__key__")
    sizes = {bytes: len, str: lambda v: len(v.encode("utf-8")), np.ndarray: lambda v: v.nbytes + 2 + 8 * v.ndim, int: lambda v: 8}
    return 4 + sum(4 + sizes[type(v)](v) for v in mds_columns(sample).values())  # offset-table entry + columns


def write_shard(fmt: str, path: str, samples: list[dict[str, Any]]) -> tuple[int, Optional[dict[str, Any]]]:
    """Write one shard atomically; return its size in bytes and, for MDS, its `index.json` entry."""
    if not samples:
        raise ValueError(f"refusing to write an empty shard {path}")
    fields = set(samples[0])
    for s in samples:
        if set(s) != fields:
            raise ValueError(f"sample {s.get('key')!r} has fields {sorted(s)}, the shard's first has {sorted(fields)}; "
                             "every sample of a dataset must carry the same fields")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    entry = None
    if fmt == "wds":
        _write_tar(tmp, samples)
    elif fmt == "mds":
        entry = _write_mds(tmp, samples)
        entry["raw_data"]["basename"] = os.path.basename(path)
    else:
        raise ValueError(f"unknown shard format {fmt!r}: wds or mds")
    os.replace(tmp, path)
    return os.path.getsize(path), entry


def _write_tar(path: str, samples: list[dict[str, Any]]) -> None:
    from webdataset import TarWriter

    with open(path, "wb") as f:
        # An integer mtime keeps each member to one 512-byte header (a float adds a pax header).
        writer = TarWriter(f, encoder=False, mtime=0, user="ditill", group="ditill", mode=0o444)
        for s in samples:
            writer.write(wds_members(s))
        writer.close()


def _write_mds(path: str, samples: list[dict[str, Any]]) -> dict[str, Any]:
    """One shard with streaming's MDSWriter (so the bytes are exactly what its readers expect)."""
    from streaming import MDSWriter

    columns = {f: mds_encoding(f, v) for f, v in samples[0].items()}
    tmp = f"{path}.d"  # `path` is already a per-process temporary name; the folder goes with it
    try:
        with MDSWriter(out=tmp, columns=columns, compression=None, hashes=[], size_limit=None) as writer:
            for s in samples:
                writer.write(mds_columns(s))
        with open(os.path.join(tmp, "index.json")) as f:
            (entry,) = json.load(f)["shards"]
        os.replace(os.path.join(tmp, entry["raw_data"]["basename"]), path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return entry


def write_mds_index(directory: str, entries: list[dict[str, Any]]) -> None:
    """streaming's `index.json` for one group folder (atomic), so StreamingDataset can read it too."""
    path = os.path.join(directory, "index.json")
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump({"shards": entries, "version": 2}, f, sort_keys=True)
    os.replace(tmp, path)


@dataclass
class GroupSink:
    """Buffers one group's samples and writes a shard whenever a count or bytes limit is reached."""

    root: str
    key: str
    fmt: str
    samples_per_shard: int
    shard_bytes: Optional[int]
    records: list[ShardRecord] = field(default_factory=list)
    entries: list[dict[str, Any]] = field(default_factory=list)
    latent_shape: Optional[list[int]] = None
    _buffer: list[dict[str, Any]] = field(default_factory=list)
    _bytes: int = 0

    def add(self, sample: dict[str, Any]) -> None:
        if "latent" in sample:
            shape = list(sample["latent"].shape)
            if self.latent_shape is None:
                self.latent_shape = shape
            elif shape != self.latent_shape:
                raise ValueError(f"latent of {sample['key']!r} has shape {shape}, its group {self.key!r} has {self.latent_shape}")
        size = sample_bytes(sample, self.fmt)
        if self._buffer and (len(self._buffer) >= self.samples_per_shard
                             or (self.shard_bytes and shard_size(self.fmt, self._bytes + size) > self.shard_bytes)):
            self.flush()
        self._buffer.append(sample)
        self._bytes += size

    def flush(self) -> None:
        if not self._buffer:
            return
        rel = os.path.join(group_dir(self.key), shard_name(self.fmt, len(self.records)))
        nbytes, entry = write_shard(self.fmt, os.path.join(self.root, rel), self._buffer)
        self.records.append(ShardRecord(rel, len(self._buffer), nbytes))
        if entry is not None:
            self.entries.append(entry)
        self._buffer, self._bytes = [], 0

    def close(self) -> Group:
        self.flush()
        if self.fmt == "mds":
            write_mds_index(os.path.join(self.root, group_dir(self.key)), self.entries)
        return Group(self.key, self.records, self.latent_shape)


@dataclass
class WriteReport:
    manifest: Manifest
    skipped: list[str]  # messages naming each input that could not be written


def write_dataset(source: Source, out: str, fmt: str, *, samples_per_shard: int = 1000,
                  shard_bytes: Optional[int] = None, bucket_resolution: Optional[int] = None,
                  seed: int = 0) -> WriteReport:
    """Write `source` as shards under `out` (which must be new or empty) and its manifest."""
    if fmt not in ("wds", "mds"):
        raise ValueError(f"--format {fmt!r} is not allowed: wds or mds")
    if samples_per_shard < 1:
        raise ValueError(f"samples per shard must be ≥ 1, got {samples_per_shard}")
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"output directory {out!r} is not empty; choose a new one or remove it first")
    os.makedirs(out, exist_ok=True)
    order = np.random.default_rng(seed).permutation(len(source.items))
    sinks: dict[str, GroupSink] = {}
    skipped: list[str] = []
    fields: Optional[list[str]] = None
    for i in order:
        item = source.items[int(i)]
        try:
            sample = {"key": item.key, **item.load()}
        except SourceItemError as e:
            log.warning("skipped input %s: %s", item.where, e)
            skipped.append(str(e))
            continue
        fields = fields or sorted(sample)
        key = nearest_bucket(*sample["json"]["original_size"]) if bucket_resolution else ""
        if key not in sinks:
            sinks[key] = GroupSink(out, key, fmt, samples_per_shard, shard_bytes)
        sinks[key].add(sample)
    if fields is None:
        raise ValueError(f"no sample of source {source.name!r} could be read ({len(skipped)} failed); see the warnings")
    groups = [sinks[k].close() for k in sorted(sinks, key=lambda k: float(k) if k else 0.0)]
    manifest = Manifest(format=fmt, fields=fields, groups=groups, source=source.name, channels=source.channels,
                        classes=source.classes, bucket_resolution=bucket_resolution,
                        notes={"writer": "data.writers.write_dataset", "seed": seed, "samples_per_shard": samples_per_shard,
                               "shard_bytes": shard_bytes, "skipped_inputs": len(skipped)})
    write_manifest(out, manifest)
    return WriteReport(manifest, skipped)


def write_samples(samples: Iterable[dict[str, Any]], out: str, fmt: str, manifest_fields: dict[str, Any],
                  *, samples_per_shard: int = 1000, shard_bytes: Optional[int] = None) -> Manifest:
    """Write ready-made samples (all one group) in the given order, e.g. synthetic benchmark data."""
    if os.path.isdir(out) and os.listdir(out):
        raise FileExistsError(f"output directory {out!r} is not empty; choose a new one or remove it first")
    sink = GroupSink(out, "", fmt, samples_per_shard, shard_bytes)
    fields: Optional[list[str]] = None
    for sample in samples:
        fields = fields or sorted(sample)
        sink.add(sample)
    manifest = Manifest(format=fmt, fields=fields or [], groups=[sink.close()], **manifest_fields)
    write_manifest(out, manifest)
    return manifest


def parse_bytes(text: str) -> int:
    """'256MB', '1.5GB', '4096' → bytes (decimal units; KiB/MiB/GiB are binary)."""
    units = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 2**10, "MIB": 2**20, "GIB": 2**30}
    t = text.strip().upper()
    num = t.rstrip("KMGIB")
    try:
        value = float(num) * units[t[len(num):]]
    except (ValueError, KeyError):
        raise ValueError(f"{text!r} is not a size; write e.g. 4096, 256MB, 1GB or 512MiB") from None
    if value < 1:
        raise ValueError(f"size {text!r} must be at least one byte")
    return int(value)
