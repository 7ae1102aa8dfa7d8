"""Where raw samples come from: the bundled digits, an image folder of classes, image+caption tables.

A `Source` is a list of items in a fixed order (sorted paths, row order), each keyed by its index,
so the same input always gives the same keys. Items load lazily: a writer opens one image at a time.
"""
from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any, Callable, Optional

import numpy as np
import torch
from PIL import Image

from data.schema import image_ext
from data.transforms import prepare_image

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff")


class SourceItemError(Exception):
    """An item that cannot be written (missing or undecodable image); writers skip and report it."""


@dataclass(frozen=True)
class SourceItem:
    key: str
    load: Callable[[], dict[str, Any]]  # → sample dict (image bytes, cls/caption, json metadata)
    where: str  # the input it came from, for messages


@dataclass
class Source:
    name: str
    items: list[SourceItem]
    channels: int
    classes: Optional[list[str]] = None


# --- digits ---------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def digits_pixels() -> tuple[np.ndarray, np.ndarray]:  # (1797, 8, 8) uint8, (1797,) int64
    """The 1,797 8×8 digits as 8-bit grey levels: round(v·255/16) of scikit-learn's 0..16 values.

    8-bit is the canonical form because it is what a PNG in a shard holds losslessly, so in-memory
    and shard-backed digits give identical tensors.
    """
    from sklearn.datasets import load_digits

    d = load_digits()
    pixels = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)
    return pixels, d.target.astype(np.int64)


def digits_arrays(image_size: int = 8) -> tuple[np.ndarray, np.ndarray]:
    """Digits as float32 (N, 1, S, S) in [-1, 1] and int64 labels (N,); S = image_size (resized if not 8)."""
    pixels, labels = digits_pixels()
    x = torch.from_numpy(pixels).unsqueeze(1)
    if image_size == 8:
        images = x.to(torch.float32) / 127.5 - 1.0
    else:
        images = torch.stack([prepare_image(p, (image_size, image_size)) for p in x])
    return images.numpy(), labels.copy()


def digit_caption(label: int) -> str:
    return f"a handwritten digit {label}"


def digits_source() -> Source:
    pixels, labels = digits_pixels()

    def load(i: int) -> dict[str, Any]:
        label = int(labels[i])
        return {"image": png_bytes(pixels[i]), "cls": label, "caption": digit_caption(label),
                "json": {"source": "sklearn-digits", "index": i, "original_size": [8, 8], "aspect_ratio": 1.0}}

    items = [SourceItem(f"{i:05d}", (lambda i=i: load(i)), f"digits[{i}]") for i in range(len(labels))]
    return Source("digits", items, channels=1, classes=[str(d) for d in range(10)])


# --- image folders and caption tables ----------------------------------------------------------------

def imagefolder_source(root: str) -> Source:
    """ImageNet layout: root/<class>/<image>; classes are the sorted sub-folder names."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"image folder {root!r} does not exist")
    classes = sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)))
    if not classes:
        raise ValueError(f"{root!r} has no class sub-folders; expected root/<class>/<image> (ImageNet layout)")
    paths: list[tuple[str, int]] = []
    for label, name in enumerate(classes):
        for dirpath, dirnames, filenames in os.walk(os.path.join(root, name)):
            dirnames.sort()
            paths += [(os.path.join(dirpath, f), label) for f in sorted(filenames) if f.lower().endswith(IMAGE_EXTS)]
    if not paths:
        raise ValueError(f"{root!r} has class folders but no images ({', '.join(IMAGE_EXTS)})")
    items = [SourceItem(f"{i:08d}", (lambda p=p, c=c: {"cls": c, **_image_file(p, root)}), p)
             for i, (p, c) in enumerate(paths)]
    return Source("imagefolder", items, channels=3, classes=classes)


def pairs_source(table: str, image_column: str = "image", caption_column: str = "caption") -> Source:
    """Image + caption rows from a JSONL or CSV file; image paths are relative to the file's folder."""
    if not os.path.isfile(table):
        raise FileNotFoundError(f"pairs table {table!r} does not exist")
    rows = _read_rows(table)
    base = os.path.dirname(os.path.abspath(table))
    items = []
    for n, row in enumerate(rows):
        for col in (image_column, caption_column):
            if not isinstance(row.get(col), str) or not row[col]:
                raise ValueError(f"{table} row {n + 1}: column {col!r} is missing or empty; every row needs "
                                 f"{image_column!r} (a path) and {caption_column!r} (text)")
        path = os.path.join(base, row[image_column])
        items.append(SourceItem(f"{n:08d}", (lambda p=path, c=row[caption_column]: {"caption": c, **_image_file(p, base)}), path))
    if not items:
        raise ValueError(f"{table} has no rows")
    return Source("pairs", items, channels=3)


def _read_rows(table: str) -> list[dict[str, Any]]:
    if table.endswith((".jsonl", ".json")):
        rows = []
        with open(table) as f:
            for n, line in enumerate(f):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError as e:
                        raise ValueError(f"{table} line {n + 1} is not JSON: {e}") from e
        return rows
    if table.endswith(".csv"):
        with open(table, newline="") as f:
            return list(csv.DictReader(f))
    raise ValueError(f"pairs table {table!r}: use a .jsonl or .csv file")


def _image_file(path: str, root: str) -> dict[str, Any]:
    """Keep PNG/JPEG bytes as they are (no re-encoding loss); other formats become PNG."""
    try:
        with open(path, "rb") as f:
            data = f.read()
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decode fully: a truncated file fails here, not in training
            width, height = im.size
            try:
                image_ext(data)
            except ValueError:
                data = png_bytes(np.asarray(im.convert("RGB")))
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        raise SourceItemError(f"{path}: {type(e).__name__}: {e}") from e
    meta = {"source": os.path.relpath(path, root), "original_size": [height, width], "aspect_ratio": round(height / width, 6)}
    return {"image": data, "json": meta}


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()
