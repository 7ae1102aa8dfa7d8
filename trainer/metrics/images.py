"""Sample and reference image sets, read in order and in chunks so memory stays bounded.

Three kinds, chosen by what the path is:
- an ADM `.npz` (`arr_0`: uint8 N×H×W×3, as DiT's `sample_ddp.py` and ADM's reference batches write
  it); `arr_0` is streamed out of the zip member a chunk at a time (50,000 samples at 256² are
  9.8 GB), optional `latents` (N, C, h, w) likewise, optional `captions` (N,) read whole;
- a DiTill shard directory (`manifest.json`, webdataset or MDS): `image`, `latent`, `caption` fields;
- a folder of image files (sorted paths, recursively).
Files and shard images are centre-cropped to the resolution the way ADM made its reference batches
(`center_crop_arr`: halve with a box filter while the short side is ≥ 2× the target, bicubic to the
target, centre crop), so a reference computed here sees what ADM's would.
"""
from __future__ import annotations

import io
import logging
import os
import zipfile
from typing import Iterator, Optional

import numpy as np
from PIL import Image

from data.catalog import mds_entries
from data.manifest import MANIFEST, read_manifest
from data.readers import MdsShard, ShardError, ShardReader, WdsShard
from data.schema import SampleError
from data.sources import IMAGE_EXTS

log = logging.getLogger("ditill.metrics")


def center_crop_arr(image: Image.Image, size: int) -> np.ndarray:
    """ADM's (and DiT's) preprocessing: box-halve, bicubic resize of the short side, centre crop."""
    while min(*image.size) >= 2 * size:
        image = image.resize(tuple(x // 2 for x in image.size), resample=Image.BOX)
    scale = size / min(*image.size)
    image = image.resize(tuple(round(x * scale) for x in image.size), resample=Image.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def _rgb(pixels: np.ndarray, where: str) -> np.ndarray:
    """(n, H, W) or (n, H, W, 1|3) uint8 → (n, H, W, 3): grey images are repeated over RGB."""
    if pixels.dtype != np.uint8:
        raise ValueError(f"{where}: images must be uint8 (ADM format: arr_0 uint8 N×H×W×3), got {pixels.dtype}")
    if pixels.ndim == 3:
        pixels = pixels[..., None]
    if pixels.ndim != 4 or pixels.shape[-1] not in (1, 3):
        raise ValueError(f"{where}: images must be N×H×W×3 (or N×H×W grey), got shape {pixels.shape}")
    return np.repeat(pixels, 3, axis=-1) if pixels.shape[-1] == 1 else pixels


class NpyStream:
    """One array of an `.npz`, read front to back in row chunks without loading it whole."""

    def __init__(self, path: str, key: str) -> None:
        self.path, self.key = path, key
        with zipfile.ZipFile(path) as zf, zf.open(f"{key}.npy") as f:
            self.shape, self.dtype = self._header(f)

    @staticmethod
    def _header(f) -> tuple[tuple[int, ...], np.dtype]:
        version = np.lib.format.read_magic(f)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
        if fortran and len(shape) > 1:
            raise ValueError("Fortran-ordered arrays cannot be streamed; save with np.savez from a C-ordered array")
        if dtype.hasobject:
            raise ValueError("object arrays are not read (they would need pickle)")
        return tuple(shape), dtype

    def __len__(self) -> int:
        return self.shape[0] if self.shape else 0

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        row = int(np.prod(self.shape[1:], dtype=np.int64)) * self.dtype.itemsize
        with zipfile.ZipFile(self.path) as zf, zf.open(f"{self.key}.npy") as f:
            self._header(f)
            for start in range(0, len(self), size):
                n = min(size, len(self) - start)
                data = f.read(n * row)
                if len(data) != n * row:
                    raise ValueError(f"{self.path}: {self.key} ends after {start + len(data) // max(row, 1)} of "
                                     f"{len(self)} rows; the file is truncated")
                yield np.frombuffer(data, dtype=self.dtype).reshape(n, *self.shape[1:])


def npz_keys(path: str) -> list[str]:
    with zipfile.ZipFile(path) as zf:
        return [n[:-4] for n in zf.namelist() if n.endswith(".npy")]


class ImageSet:
    """Same-sized RGB images in a fixed order; `latents` and `captions` when the source has them."""

    kind = ""
    path = ""
    count = 0
    resolution: Optional[tuple[int, int]] = None

    def __len__(self) -> int:
        return self.count

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        raise NotImplementedError

    def latent_chunks(self, size: int) -> Optional[Iterator[np.ndarray]]:
        return None

    def captions(self) -> Optional[list[str]]:
        return None

    def describe(self) -> dict[str, object]:
        return {"path": self.path, "kind": self.kind, "images": self.count,
                "resolution": list(self.resolution) if self.resolution else None}


class NpzImages(ImageSet):
    kind = "npz"

    def __init__(self, path: str) -> None:
        self.path = path
        self.keys = npz_keys(path)
        if "arr_0" not in self.keys:
            raise ValueError(f"{path} has no arr_0 (it holds {self.keys}); an ADM sample batch keeps its images in arr_0")
        self.images = NpyStream(path, "arr_0")
        shape = self.images.shape
        _rgb(np.zeros((0, *shape[1:]), self.images.dtype), f"{path} arr_0")  # dtype/shape check, no data read
        self.count, self.resolution = shape[0], (shape[1], shape[2])

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for c in self.images.chunks(size):
            yield _rgb(c, self.path)

    def latent_chunks(self, size: int) -> Optional[Iterator[np.ndarray]]:
        return NpyStream(self.path, "latents").chunks(size) if "latents" in self.keys else None

    def captions(self) -> Optional[list[str]]:
        if "captions" not in self.keys:
            return None
        with np.load(self.path, allow_pickle=False) as z:
            return [str(c) for c in z["captions"]]


class FolderImages(ImageSet):
    kind = "folder"

    def __init__(self, path: str, resolution: Optional[int]) -> None:
        self.path = path
        self.files = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs if f.lower().endswith(IMAGE_EXTS))
        if not self.files:
            raise ValueError(f"{path} holds no image files ({', '.join(IMAGE_EXTS)})")
        self.size = resolution
        self.count = len(self.files)
        if resolution:
            self.resolution = (resolution, resolution)
        else:
            with Image.open(self.files[0]) as im:
                self.resolution = (im.height, im.width)

    def _load(self, path: str) -> np.ndarray:
        with Image.open(path) as im:
            im = im.convert("RGB")
            if self.size:
                return center_crop_arr(im, self.size)
            arr = np.asarray(im)
        if arr.shape[:2] != self.resolution:
            raise ValueError(f"{path} is {arr.shape[1]}×{arr.shape[0]} but {self.files[0]} is {self.resolution[1]}×"
                             f"{self.resolution[0]}; give --resolution to centre-crop them all")
        return arr

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        for i in range(0, self.count, size):
            yield np.stack([self._load(p) for p in self.files[i:i + size]])


class ShardImages(ImageSet):
    """A DiTill shard directory, read in key order: shard writers shuffle samples across shards, and
    the key (the source's index, or the sample index for generated sets) is the order that pairs a
    student's sample i with the teacher's. Unreadable shards and samples are skipped and counted."""

    kind = "shards"

    def __init__(self, path: str, resolution: Optional[int]) -> None:
        self.path = path
        self.manifest = read_manifest(path)
        self.fields = set(self.manifest.fields)
        self.entries = mds_entries(path, self.manifest) if self.manifest.format == "mds" else {}
        self.count = self.manifest.samples
        self.size = resolution
        self.resolution = (resolution, resolution) if resolution else None
        self.skipped = 0
        self._order: Optional[list[tuple[str, int, int]]] = None  # (key, shard, row), sorted by key

    def _open(self) -> list[Optional[ShardReader]]:
        readers: list[Optional[ShardReader]] = []
        for rec in (r for g in self.manifest.groups for r in g.shards):
            where = os.path.join(self.path, rec.path)
            try:
                readers.append(MdsShard(where, self.entries[rec.path]) if self.entries else WdsShard(where, rec.samples))
            except ShardError as e:
                log.warning("shard skipped: %s", e)
                readers.append(None)
        return readers

    def _samples(self, fields: frozenset[str]) -> Iterator[dict]:
        readers = self._open()
        try:
            if self._order is None:
                self._order = sorted(self._keys(readers))
                self.skipped = self.count - len(self._order)
            for key, shard, row in self._order:
                try:
                    yield readers[shard].read(row, fields)
                except SampleError as e:
                    log.warning("sample %s of %s skipped: %s", key, readers[shard].path, e)
        finally:
            for r in readers:
                if r is not None:
                    r.close()

    def _keys(self, readers: list[Optional[ShardReader]]) -> Iterator[tuple[str, int, int]]:
        records = [r for g in self.manifest.groups for r in g.shards]
        for shard, (rec, reader) in enumerate(zip(records, readers)):
            for row in range(rec.samples if reader is not None else 0):
                try:
                    yield reader.read(row, frozenset())["key"], shard, row
                except SampleError as e:
                    log.warning("sample %d of %s skipped: %s", row, reader.path, e)

    def _image(self, data) -> np.ndarray:
        if isinstance(data, np.ndarray):  # in-memory pixels
            im = Image.fromarray(data)
        else:
            im = Image.open(io.BytesIO(bytes(data)))
        im = im.convert("RGB")
        if self.size is None:
            self.size = min(im.size)
            self.resolution = (self.size, self.size)
        return center_crop_arr(im, self.size)

    def _need(self, field: str, what: str) -> None:
        if field not in self.fields:
            raise ValueError(f"{self.path}: {what} needs the '{field}' field, but the shards hold {sorted(self.fields)}")

    def chunks(self, size: int) -> Iterator[np.ndarray]:
        self._need("image", "image metrics")
        return _batched((self._image(s["image"]) for s in self._samples(frozenset({"image"}))), size)

    def latent_chunks(self, size: int) -> Optional[Iterator[np.ndarray]]:
        if "latent" not in self.fields:
            return None
        return _batched((np.asarray(s["latent"]) for s in self._samples(frozenset({"latent"}))), size)

    def captions(self) -> Optional[list[str]]:
        if "caption" not in self.fields:
            return None
        return [s["caption"] for s in self._samples(frozenset({"caption"}))]


def _batched(rows: Iterator[np.ndarray], size: int) -> Iterator[np.ndarray]:
    batch = []
    for r in rows:
        batch.append(r)
        if len(batch) == size:
            yield np.stack(batch)
            batch = []
    if batch:
        yield np.stack(batch)


def open_images(path: str, resolution: Optional[int] = None) -> ImageSet:
    """The image set at `path`: an ADM `.npz`, a DiTill shard directory or a folder of images."""
    if os.path.isfile(path):
        if not path.endswith(".npz"):
            raise ValueError(f"{path} is a file but not an .npz; give an ADM .npz, a shard directory or an image folder")
        return NpzImages(path)
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, MANIFEST)):
            return ShardImages(path, resolution)
        return FolderImages(path, resolution)
    raise FileNotFoundError(f"{path} does not exist (expected an ADM .npz, a DiTill shard directory or an image folder)")
