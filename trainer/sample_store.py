"""Where `launch.sample` keeps its work: one file per finished chunk, then the assembled outputs.

A chunk file (`<out>/chunks/chunk_000123.npz`) is written under a temporary name and renamed into
place, so its existence means it is complete; a relaunch samples only the chunks that have none.
The outputs are assembled from the chunk files in sample order by one process, streaming, so
50,000 ImageNet samples (9.8 GB of pixels) never sit in memory at once:

- `samples.npz`: ADM's layout (`arr_0` uint8 N×H×W×3), plus `latents` (N, C, h, w) float32 (the
  model's output before decoding), `labels` or `captions`, and `realised_flops` for dynamic models;
- `png/000123.png` (optional), one per sample;
- training shards (optional, `data.writers`): key = the sample index (zero-padded, so key order is
  sample order, which is how the evaluator pairs a student's sample i with the teacher's).
"""
from __future__ import annotations

import glob
import json
import os
import zipfile
from pathlib import Path
from typing import Any, Callable, Iterator, Optional

import numpy as np

CHUNKS = "chunks"
SETTINGS = "settings.json"
NPZ = "samples.npz"
REPORT = "samples.json"


def chunk_path(out: str | Path, index: int) -> Path:
    return Path(out) / CHUNKS / f"chunk_{index:06d}.npz"


def write_chunk(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Atomically: a temporary file of this process, flushed, then renamed into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        np.savez(f, **arrays)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_chunk(path: Path, rows: int) -> Optional[dict[str, np.ndarray]]:
    """A finished chunk's arrays, or None when the file is missing, unreadable or of another size."""
    if not path.is_file():
        return None
    try:
        with np.load(path, allow_pickle=False) as z:
            arrays = {k: z[k] for k in z.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return None
    if any(len(v) != rows for v in arrays.values()) or "images" not in arrays:
        return None
    return arrays


def chunk_is_done(path: Path, rows: int) -> bool:
    """Cheap check (headers only) that a chunk file is complete and of the right size."""
    if not path.is_file():
        return False
    try:
        with zipfile.ZipFile(path) as zf:
            for name in zf.namelist():
                with zf.open(name) as f:
                    version = np.lib.format.read_magic(f)
                    read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                    shape, _, dtype = read(f)
                    if not shape or shape[0] != rows or zf.getinfo(name).file_size < np.prod(shape) * dtype.itemsize:
                        return False
            return "images.npy" in zf.namelist()
    except (OSError, ValueError, zipfile.BadZipFile, EOFError):
        return False


def remove_stale(path: Path) -> None:
    """Temporary files a killed process left for this chunk."""
    for stale in glob.glob(glob.escape(str(path)) + ".tmp-*"):
        os.remove(stale)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, sort_keys=True) + "\n")
    os.replace(tmp, path)


def write_npz(path: Path, members: dict[str, tuple[tuple[int, ...], np.dtype, Callable[[], Iterator[np.ndarray]]]]) -> None:
    """An `.npz` whose arrays are written chunk by chunk: {name: (shape, dtype, chunks())}, atomically."""
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    with zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as zf:
        for name, (shape, dtype, chunks) in members.items():
            with zf.open(f"{name}.npy", "w", force_zip64=True) as f:
                header = {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": tuple(shape)}
                np.lib.format.write_array_header_1_0(f, header)
                rows = 0
                for chunk in chunks():
                    c = np.ascontiguousarray(chunk, dtype=dtype)
                    f.write(c.tobytes())
                    rows += len(c)
                if rows != shape[0]:
                    raise RuntimeError(f"{path}: {name} got {rows} rows, its header says {shape[0]}")
    os.replace(tmp, path)


def write_pngs(directory: Path, images: Iterator[tuple[int, np.ndarray]]) -> int:
    """`directory/000123.png` per (index, H×W×C uint8) image, skipping files already there; returns how
    many were written."""
    from PIL import Image

    directory.mkdir(parents=True, exist_ok=True)
    written = 0
    for i, img in images:
        path = directory / f"{i:06d}.png"
        if path.exists():
            continue
        tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
        Image.fromarray(img[..., 0] if img.shape[-1] == 1 else img).save(tmp, format="PNG")
        os.replace(tmp, path)
        written += 1
    return written


def sample_key(index: int, total: int) -> str:
    """Zero-padded, so sorting keys sorts samples (at least 8 digits)."""
    return f"{index:0{max(8, len(str(total - 1)))}d}"
