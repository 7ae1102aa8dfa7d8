"""What a loader reads: the shard list, the groups (buckets) and what each group's samples decode to.

Built once in the trainer's process from `DataConfig` and the shard directory's manifest; every
mismatch between what the task needs and what the shards hold is a clear error here, before any
worker starts.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Optional

from data.buckets import bucket_size
from data.config import DataConfig
from data.decode import SampleSpec, spec_options
from data.manifest import Manifest, read_manifest
from data.plan import GroupLayout
from data.readers import MdsShard, MemoryShard, ShardReader, WdsShard

DIGITS_SAMPLES = 1797


@dataclass(frozen=True)
class ShardLocator:
    kind: str  # wds | mds | memory
    path: str
    samples: int
    entry: Optional[dict[str, Any]] = None  # the MDS shard's index.json entry

    def open(self) -> ShardReader:
        if self.kind == "wds":
            return WdsShard(self.path, self.samples)
        if self.kind == "mds":
            assert self.entry is not None
            return MdsShard(self.path, self.entry)
        from data.sources import digits_pixels

        return MemoryShard(*digits_pixels())


@dataclass(frozen=True)
class Catalog:
    shards: tuple[ShardLocator, ...]
    layouts: tuple[GroupLayout, ...]
    specs: tuple[SampleSpec, ...]  # per group
    where: str  # for messages

    @property
    def samples(self) -> int:
        return sum(g.samples for g in self.layouts)


def build_catalog(cfg: DataConfig) -> Catalog:
    if cfg.format == "digits":
        spec = SampleSpec(cfg.input, cfg.cond, (1, cfg.image_size, cfg.image_size), num_classes=10, labels=True,
                          **spec_options(cfg, None, "the bundled digits"))
        return Catalog((ShardLocator("memory", "<digits>", DIGITS_SAMPLES),),
                       (GroupLayout("", (0,), (DIGITS_SAMPLES,)),), (spec,), "the bundled digits")
    assert cfg.path is not None
    manifest = read_manifest(cfg.path)
    where = f"the shards at {cfg.path}"
    if manifest.format != cfg.format:
        raise ValueError(f"data.format={cfg.format!r} but {where} are {manifest.format!r} shards; set data.format={manifest.format!r}")
    _check_fields(cfg, manifest, where)
    groups = [g for g in manifest.groups if g.samples > 0]
    if not groups:
        raise ValueError(f"{where} hold no samples")
    if manifest.bucketed and not cfg.buckets:
        if cfg.input == "latent" and len({tuple(g.latent_shape or ()) for g in groups}) > 1:
            raise ValueError(f"{where} hold latents of several aspect-ratio buckets (shapes differ) and data.buckets=false "
                             "cannot batch them together; set data.buckets=true")
    if cfg.buckets and not manifest.bucketed and cfg.input == "image":
        raise ValueError(f"data.buckets=true but {where} were written without aspect-ratio buckets; write them with "
                         "`python -m launch.make_shards --buckets RESOLUTION`, or set data.buckets=false")
    shards: list[ShardLocator] = []
    layouts: list[GroupLayout] = []
    specs: list[SampleSpec] = []
    entries = mds_entries(cfg.path, manifest) if cfg.format == "mds" else {}
    for group in groups:
        ids = []
        for rec in group.shards:
            ids.append(len(shards))
            shards.append(ShardLocator(cfg.format, os.path.join(cfg.path, rec.path), rec.samples, entries.get(rec.path)))
        layouts.append(GroupLayout(group.key if cfg.buckets else "", tuple(ids), tuple(r.samples for r in group.shards)))
        specs.append(_spec(cfg, manifest, group.key, group.latent_shape, where))
    if not cfg.buckets and len(layouts) > 1:  # unbucketed reading of bucketed shards: one group
        layouts = [GroupLayout("", sum((l.shard_ids for l in layouts), ()), sum((l.counts for l in layouts), ()))]
        specs = specs[:1]
    return Catalog(tuple(shards), tuple(layouts), tuple(specs), where)


def _check_fields(cfg: DataConfig, manifest: Manifest, where: str) -> None:
    have = set(manifest.fields)
    need = {cfg.input} | {"class": {"cls"}, "text_emb": {"text_emb", "text_mask"}, "caption": {"caption"}, "none": set()}[cfg.cond]
    missing = sorted(need - have)
    if missing:
        hint = " (run `python -m launch.precompute` to add latents and text embeddings)" if set(missing) & {"latent", "text_emb"} else ""
        raise ValueError(f"data.input={cfg.input!r} / data.cond={cfg.cond!r} need the sample fields {sorted(need)}, but {where} "
                         f"hold {sorted(have)}: {', '.join(missing)} missing{hint}; choose data.input/data.cond to match")
    if cfg.input == "latent" and not manifest.latent:
        raise ValueError(f"{where} hold latents but the manifest has no 'latent' entry with the scaling factor; rewrite them with launch.precompute")
    if cfg.cond == "text_emb" and not manifest.text:
        raise ValueError(f"{where} hold text embeddings but the manifest has no 'text' entry (max_length, dim); rewrite them with launch.precompute")


def _spec(cfg: DataConfig, manifest: Manifest, key: str, latent_shape: Optional[list[int]], where: str) -> SampleSpec:
    text_shape = (int(manifest.text["max_length"]), int(manifest.text["dim"])) if manifest.text else None
    num_classes = len(manifest.classes) if manifest.classes else None
    labels = "cls" in manifest.fields
    extra = spec_options(cfg, manifest, where)
    if cfg.input == "latent":
        if not latent_shape:
            raise ValueError(f"{where}: group {key!r} has no latent_shape in the manifest; rewrite it with launch.precompute")
        x_shape = tuple(int(s) for s in latent_shape)
        assert manifest.latent is not None
        return SampleSpec("latent", cfg.cond, x_shape, num_classes, text_shape,  # type: ignore[arg-type]
                          float(manifest.latent["scaling_factor"]), float(manifest.latent.get("shift_factor") or 0.0), labels, **extra)
    channels = manifest.channels or 3
    size = bucket_size(key, cfg.image_size) if cfg.buckets else (cfg.image_size, cfg.image_size)
    return SampleSpec("image", cfg.cond, (channels, *size), num_classes, text_shape, labels=labels, **extra)


def mds_entries(root: str, manifest: Manifest) -> dict[str, dict[str, Any]]:
    """Manifest shard path → its entry in the group folder's streaming index.json."""
    out: dict[str, dict[str, Any]] = {}
    for group in manifest.groups:
        folders = {os.path.dirname(r.path) for r in group.shards}
        for folder in folders:
            index = os.path.join(root, folder, "index.json")
            try:
                with open(index) as f:
                    shards = json.load(f)["shards"]
            except (OSError, ValueError, KeyError) as e:
                raise FileNotFoundError(f"{index} is missing or unreadable ({e}); MDS shards need it — rewrite the shards") from e
            for entry in shards:
                out[os.path.join(folder, entry["raw_data"]["basename"])] = entry
    missing = [r.path for g in manifest.groups for r in g.shards if r.path not in out]
    if missing:
        raise ValueError(f"{root}: shards {missing[:3]} are in manifest.json but not in their index.json; rewrite the shards")
    return out
