"""What makes a checkpoint directory trustworthy: a manifest of its files, sizes and checksums.

A checkpoint is complete only once `manifest.json` exists in its final (renamed) directory; the
manifest is written last, after every rank's files are on disk and fsync-ed. Verification is split
across ranks so no rank reads the whole checkpoint.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
SUMS_DIR = "sums"


def sha256_file(path: Path, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_text_atomic(path: Path, text: str) -> None:
    """Write, fsync, rename over `path`, fsync the directory: readers see the old or the new text."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


def write_json_atomic(path: Path, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=1, sort_keys=True))


def file_entries(root: Path, files: list[Path]) -> dict[str, dict[str, Any]]:
    """{relative name: {size, sha256}} after fsync-ing each file."""
    out = {}
    for f in files:
        with open(f, "rb") as fh:
            os.fsync(fh.fileno())
        out[str(f.relative_to(root))] = {"size": f.stat().st_size, "sha256": sha256_file(f)}
    return out


@dataclass
class Verdict:
    ok: bool
    reason: str = ""


def read_manifest(ckpt: Path) -> dict[str, Any] | None:
    try:
        return json.loads((ckpt / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def verify(ckpt: Path, rank: int = 0, world_size: int = 1, checksums: bool = True) -> Verdict:
    """Check this rank's share of the files (every file's existence and size; checksums strided)."""
    manifest = read_manifest(ckpt)
    if manifest is None:
        return Verdict(False, f"{ckpt}: missing or unreadable {MANIFEST}")
    files = manifest.get("files", {})
    if not files:
        return Verdict(False, f"{ckpt}: manifest lists no files")
    for i, (name, entry) in enumerate(sorted(files.items())):
        path = ckpt / name
        if not path.exists():
            return Verdict(False, f"{ckpt}: file {name} is missing")
        if path.stat().st_size != entry["size"]:
            return Verdict(False, f"{ckpt}: file {name} has {path.stat().st_size} bytes, manifest says {entry['size']}")
        if checksums and i % world_size == rank and sha256_file(path) != entry["sha256"]:
            return Verdict(False, f"{ckpt}: file {name} fails its checksum")
    return Verdict(True)
