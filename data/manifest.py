"""`manifest.json`: the index of a shard directory, the same for webdataset and MDS.

It lists every shard with its sample count and size, grouped by aspect-ratio bucket (one group,
key "", when not bucketed), and says what the samples hold, so a loader can plan an epoch and
check a task's needs without opening a shard. MDS directories also carry streaming's own
`index.json` per group, so they stay readable by `streaming.StreamingDataset`.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from typing import Any, Optional

MANIFEST = "manifest.json"
VERSION = 1


@dataclass
class ShardRecord:
    path: str  # relative to the dataset directory
    samples: int
    bytes: int


@dataclass
class Group:
    """Shards whose samples share one aspect-ratio bucket (`key` "" = not bucketed)."""

    key: str
    shards: list[ShardRecord]
    latent_shape: Optional[list[int]] = None  # (C, h, w) of every latent in the group

    @property
    def samples(self) -> int:
        return sum(s.samples for s in self.shards)


@dataclass
class Manifest:
    format: str  # wds | mds
    fields: list[str]  # sample fields present in every sample
    groups: list[Group]
    source: str = ""
    channels: Optional[int] = None  # image channels (1 for digits, 3 otherwise)
    classes: Optional[list[str]] = None  # class names, index = label
    bucket_resolution: Optional[int] = None  # resolution the images were bucketed at
    latent: Optional[dict[str, Any]] = None  # scaling_factor, shift_factor, vae
    text: Optional[dict[str, Any]] = None  # max_length, dim, encoder
    notes: dict[str, Any] = field(default_factory=dict)  # provenance: writer arguments

    @property
    def samples(self) -> int:
        return sum(g.samples for g in self.groups)

    @property
    def bucketed(self) -> bool:
        return any(g.key for g in self.groups)

    def to_json(self) -> dict[str, Any]:
        return {"ditill_shards": VERSION, **asdict(self)}

    @classmethod
    def from_json(cls, obj: dict[str, Any], where: str = "manifest") -> "Manifest":
        if obj.get("ditill_shards") != VERSION:
            raise ValueError(f"{where}: not a DiTill manifest of version {VERSION} (ditill_shards={obj.get('ditill_shards')!r})")
        obj = dict(obj)
        obj.pop("ditill_shards")
        groups = [Group(key=g["key"], shards=[ShardRecord(**s) for s in g["shards"]], latent_shape=g.get("latent_shape"))
                  for g in obj.pop("groups")]
        return cls(groups=groups, **obj)


def manifest_path(directory: str) -> str:
    return os.path.join(directory, MANIFEST)


def write_manifest(directory: str, manifest: Manifest) -> str:
    """Write atomically (temp file + rename): a reader never sees half a manifest."""
    path = manifest_path(directory)
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(manifest.to_json(), f, indent=1, sort_keys=True)
        f.write("\n")
    os.replace(tmp, path)
    return path


def read_manifest(directory: str) -> Manifest:
    path = manifest_path(directory)
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"shard directory {directory!r} does not exist; write shards with "
                                "`python -m launch.make_shards --out DIR` or fix data.path")
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} is missing: {directory!r} was not written by DiTill's shard writers; "
                                "write it with `python -m launch.make_shards` (or `launch.precompute`)")
    try:
        with open(path) as f:
            obj = json.load(f)
        return Manifest.from_json(obj, where=path)
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ValueError(f"{path} is not a valid manifest ({type(e).__name__}: {e}); rewrite the shards") from e
