"""`DataConfig`: what the trainer embeds as `cfg.data`, validated before any process group starts.

A plain dataclass so OmegaConf can use it as a structured config; every field has a default, so a
YAML file only names what it changes.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

FORMATS = ("digits", "wds", "mds")
LAYOUTS = ("ditill", "plain")
MAPPABLE = ("image", "latent", "caption", "text_emb", "text_mask", "cls")  # DiTill fields `data.fields` can map
INPUTS = ("image", "latent")
CONDS = ("class", "text_emb", "caption", "none")


@dataclass
class DataConfig:
    """Where samples come from, what a batch must hold, and how the stream is ordered.

    format: `digits` (scikit-learn digits in memory, no shards), `wds` (webdataset tar shards) or
        `mds` (MosaicML streaming shards); `path` is the shard directory for wds/mds.
    input: what `batch["x"]` is: `image` (float32 in [-1, 1]) or `latent` (precomputed, scaled).
    cond: the conditioning the task needs: `class` (`y`), `text_emb` (`text_emb` + `text_mask`),
        `caption` (raw strings, `caption`) or `none`. Samples lacking it are skipped and counted.
    batch_size: per-rank micro-batch; the global batch is batch_size × world_size.
    shuffle_window: samples shuffled together after the shard order is shuffled (bigger mixes
        more; the whole epoch when ≥ the dataset).
    image_size: side of square images (digits are 8×8 natively; other values resize), or the base
        resolution of the aspect-ratio buckets when `buckets` is on. Latents keep the shape the
        shards hold (precompute fixed it), so it does not apply to them.
    buckets: each batch from one aspect-ratio bucket (shards written with buckets).
    max_skipped_fraction: stop the run when more than this fraction of the samples read were bad,
        checked once `skip_check_after` samples have been read.
    drop_last: drop each bucket's last partial global batch every epoch; when false it is filled
        with samples from the start of that bucket (counted as `data/repeated`).
    flip: random horizontal flip, drawn per sample from (seed, epoch, its place in the shards).
        Unset (null): on for class-conditional data (DiT's recipe), off for text (PixArt-Σ's) and
        for the bundled digits (not mirror-symmetric). Latents need a stored mirrored copy
        (`launch.precompute --flip-copy`).
    sample_latent: draw each step's latent from the stored VAE posterior (mean + std · ε, as DiT's
        online VAE) instead of using its mean. Unset: on when the shards hold the std
        (`launch.precompute --posterior`).

    layout: `ditill` (shards written by DiTill, with `manifest.json`: one exact plan per epoch) or
        `plain` (any webdataset tars or MDS set, local or in object storage, no manifest: see
        `data/streams.py`). The keys below apply to `plain` only.
    fields: DiTill field → webdataset member extension or MDS column, alternatives split by `;`
        (e.g. `{image: "jpg;png;webp", caption: "txt"}`); unnamed fields keep their defaults.
    streams: the sample stream is `streams` lanes of shards; each rank reads only the lanes of its
        slice of the global batch, so set it to a multiple of the number of ranks. It must divide
        the global batch (batch_size × world size) and stay fixed for a run's life.
    latent_scale, latent_shift: what `launch.precompute` records in a manifest (x = (latent − shift) × scale).
    cache_dir, cache_gb: where remote and compressed shards are kept on local disk, and the bound.
    retries, retry_wait_s: attempts after a transient storage error, and the first back-off (doubling).
    verify_hashes: check each MDS shard against the hashes its index.json records.
    """

    format: str = "digits"
    path: Optional[str] = None
    input: str = "image"
    cond: str = "class"
    batch_size: int = 64
    num_workers: int = 0
    prefetch_factor: int = 2
    seed: int = 0
    shuffle: bool = True
    shuffle_window: int = 8192
    image_size: int = 8
    buckets: bool = False
    max_skipped_fraction: float = 0.01
    skip_check_after: int = 1000
    drop_last: bool = True
    flip: Optional[bool] = None
    sample_latent: Optional[bool] = None
    layout: str = "ditill"
    fields: dict[str, str] = field(default_factory=dict)
    streams: int = 1
    latent_scale: Optional[float] = None
    latent_shift: float = 0.0
    cache_dir: Optional[str] = None
    cache_gb: float = 64.0
    retries: int = 8
    retry_wait_s: float = 0.5
    verify_hashes: bool = True

    def validate(self, world_size: Optional[int] = None) -> None:
        """Raise ValueError naming the key, the bad value and what is allowed (`world_size` adds the streams check)."""
        _one_of("format", self.format, FORMATS)
        _one_of("layout", self.layout, LAYOUTS)
        _one_of("input", self.input, INPUTS)
        _one_of("cond", self.cond, CONDS)
        if self.format == "digits":
            if self.path is not None:
                raise ValueError(
                    f"data.path={self.path!r} is set but data.format='digits' loads the bundled digits in memory; "
                    "remove data.path, or set data.format to 'wds' or 'mds' to read shards"
                )
            for key, value, why in (
                ("input", self.input == "latent", "digits are images; precompute latents into shards first"),
                ("cond", self.cond == "text_emb", "digits carry no text embeddings; precompute them into shards first"),
                ("buckets", self.buckets, "digits are all 8×8: there is nothing to bucket"),
                ("sample_latent", self.sample_latent, "digits are images, there is no VAE posterior to draw from"),
            ):
                if value:
                    raise ValueError(f"data.{key}={getattr(self, key)!r} is not allowed with data.format='digits': {why}")
        elif not self.path:
            raise ValueError(f"data.path is required with data.format={self.format!r}: the directory holding the shards")
        self._validate_plain(world_size)
        for key, low in (("batch_size", 1), ("num_workers", 0), ("prefetch_factor", 1), ("shuffle_window", 1),
                         ("image_size", 1), ("skip_check_after", 1), ("streams", 1), ("retries", 0)):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"data.{key}={value!r} is not allowed: an integer ≥ {low}")
        if self.buckets and self.image_size % 16:
            raise ValueError(f"data.image_size={self.image_size!r} is not allowed with data.buckets=true: the bucket "
                             "base resolution must be a multiple of 16 (e.g. 256, 512, 1024)")
        if not 0.0 <= float(self.max_skipped_fraction) <= 1.0:
            raise ValueError(f"data.max_skipped_fraction={self.max_skipped_fraction!r} is not allowed: a number in [0, 1]")
        for key in ("flip", "sample_latent"):
            value = getattr(self, key)
            if value is not None and not isinstance(value, bool):
                raise ValueError(f"data.{key}={value!r} is not allowed: true, false, or null (the default for the data)")
        if self.sample_latent and self.input != "latent":
            raise ValueError(f"data.sample_latent={self.sample_latent!r} is not allowed with data.input={self.input!r}: it draws latents "
                             "from their stored posterior; set data.input='latent' or remove data.sample_latent")
        if self.seed < 0:
            raise ValueError(f"data.seed={self.seed!r} is not allowed: an integer ≥ 0")
        for key in ("cache_gb", "retry_wait_s"):
            if not float(getattr(self, key)) > 0:
                raise ValueError(f"data.{key}={getattr(self, key)!r} is not allowed: a number > 0")

    def _validate_plain(self, world_size: Optional[int]) -> None:
        remote = "://" in (self.path or "")
        if self.layout == "ditill":
            if self.fields:
                raise ValueError(f"data.fields={dict(self.fields)!r} is not allowed with data.layout='ditill': DiTill shards "
                                 "name their fields in manifest.json; remove data.fields, or set data.layout=plain")
            if remote:
                raise ValueError(f"data.path={self.path!r} is not allowed with data.layout='ditill': its exact plan reads "
                                 "samples across all shards and is meant for local or shared filesystems; set "
                                 "data.layout=plain to stream shards from object storage")
            return
        if self.format == "digits":
            raise ValueError("data.layout='plain' is not allowed with data.format='digits': set data.format to 'wds' or 'mds'")
        for key, value in self.fields.items():
            if key not in MAPPABLE:
                raise ValueError(f"data.fields has key {key!r}, which is not allowed: one of {', '.join(MAPPABLE)}")
            if not isinstance(value, str) or not value.strip(";") or any(c.isspace() for c in value):
                raise ValueError(f"data.fields.{key}={value!r} is not allowed: member extensions or column names "
                                 "separated by ';' (e.g. 'jpg;png')")
        if self.buckets:
            raise ValueError("data.buckets=true is not allowed with data.layout='plain': aspect-ratio buckets need "
                             "shards written by DiTill; convert with `python -m launch.make_shards --source "
                             f"{'webdataset' if self.format == 'wds' else 'mds'} --buckets RESOLUTION`")
        if self.input == "latent" and self.latent_scale is None:
            raise ValueError("data.latent_scale is required with data.input='latent' and data.layout='plain': no manifest "
                             "records the VAE's scaling factor (e.g. 0.18215 for SD's VAE, 0.13025 for SDXL's)")
        if world_size is not None and self.streams >= 1 and (self.batch_size * world_size) % self.streams:
            raise ValueError(f"data.streams={self.streams!r} is not allowed: it must divide the global batch "
                             f"{self.batch_size} × {world_size} ranks = {self.batch_size * world_size} (each step takes "
                             "the same number of samples from every stream); choose a divisor, e.g. the number of ranks")


def _one_of(key: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"data.{key}={value!r} is not allowed: one of {', '.join(allowed)}")
