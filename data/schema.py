"""One sample schema for both shard formats, and the reasons a sample can be rejected.

A sample is a dict of optional fields (a task checks the ones it needs):

| field       | value                                   | webdataset member  | MDS column            |
|-------------|-----------------------------------------|--------------------|-----------------------|
| key         | str, unique, no dots                    | `__key__`          | `key: str`            |
| image       | encoded PNG or JPEG bytes               | `.png` / `.jpg`    | `image: bytes`        |
| latent      | float16 (C, h, w), *unscaled* VAE mean  | `.latent.npy`      | `latent: ndarray:float16` |
| latent_std  | float16 (C, h, w), VAE posterior std    | `.latent_std.npy`  | `latent_std: ndarray:float16` |
| latent_flip | float16 (C, h, w), mean of the mirrored image (+ `latent_flip_std`) | `.latent_flip.npy` | `latent_flip: ndarray:float16` |
| caption     | str                                     | `.txt`             | `caption: str`        |
| text_emb    | text-encoder output, see below          | `.text_emb.npy`    | `text_emb: ndarray:<dtype>` |
| text_mask   | uint8 (L,) tokenizer mask (1 = token)   | `.text_mask.npy`   | `text_mask: ndarray:uint8` |
| text_pooled | (Dp,) CLIP pooled vector (FLUX), dtype as text_emb | `.text_pooled.npy` | `text_pooled: ndarray:<dtype>` |
| cls         | int class label                         | `.cls` (ASCII)     | `cls: int`            |
| json        | dict: original_size [h, w], aspect_ratio (h/w), source, … | `.json` | `json: json` |

`text_emb` comes in the layouts the manifest's `text` entry names: `dtype: bf16` stores the raw
16-bit words of bf16 values as uint16 (numpy has no bf16), `dtype: fp16` (the first layout, the
default when the key is absent) float16; `storage: unpadded` keeps only the n real tokens (n, D) —
n = the mask's count, the loader pads back to (L, D) with zeros — while `storage: padded` (the
default) keeps all L positions, as a mask-free encoder (FLUX) needs: its pads are encoded and seen.

Latents are stored unscaled so one set of shards serves any scaling convention; the manifest
records the factor the loader multiplies by. Encodings here are byte-exact and deterministic
(sorted JSON keys, npy version 1.0 headers) so writing the same data twice gives the same files.
"""
from __future__ import annotations

import ast
import io
import json
from functools import lru_cache
from typing import Any

import numpy as np

ARRAY_FIELDS = ("latent", "latent_std", "latent_flip", "latent_flip_std", "text_emb", "text_mask", "text_pooled")
FIELDS = ("key", "image", *ARRAY_FIELDS, "caption", "cls", "json")

# webdataset member extension per field (images get png/jpg from their bytes).
WDS_EXT = {**{f: f"{f}.npy" for f in ARRAY_FIELDS}, "caption": "txt", "cls": "cls", "json": "json"}
WDS_FIELD = {ext: field for field, ext in WDS_EXT.items()} | {"png": "image", "jpg": "image", "jpeg": "image"}

# MDS column encodings; an array column's dtype is the stored array's (see `mds_encoding`)
MDS_ENCODING = {"key": "str", "image": "bytes", **{f: "ndarray:float16" for f in ARRAY_FIELDS}, "caption": "str",
                "text_mask": "ndarray:uint8", "cls": "int", "json": "json"}

# Why a sample was skipped; each becomes the counter `data/skipped/<reason>`.
REASONS = ("decode_error", "truncated", "missing_field", "bad_shape", "bad_label", "nonfinite", "shard_error")


class SampleError(Exception):
    """A sample that cannot be used; `reason` is one of REASONS, the message says what was wrong."""

    def __init__(self, reason: str, message: str):
        assert reason in REASONS, reason
        super().__init__(message)
        self.reason = reason


def image_ext(data: bytes) -> str:
    """`png` or `jpg` from the magic bytes; other formats are re-encoded to PNG by the sources."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    raise ValueError("image bytes are neither PNG nor JPEG")


def json_bytes(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode("utf-8")


def npy_bytes(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.lib.format.write_array(buf, np.ascontiguousarray(arr), version=(1, 0), allow_pickle=False)
    return buf.getvalue()


def npy_array(data: bytes | memoryview) -> np.ndarray:
    """Parse .npy bytes without copying the payload (np.load through BytesIO copies it)."""
    mv = memoryview(data)
    if bytes(mv[:6]) != b"\x93NUMPY":
        raise ValueError("not an .npy array")
    hlen_size = 2 if mv[6] == 1 else 4
    start = 8 + hlen_size + int.from_bytes(mv[8:8 + hlen_size], "little")
    dtype, shape, count = _npy_header(bytes(mv[8 + hlen_size:start]))
    if len(mv) - start < count * dtype.itemsize:
        raise ValueError(f".npy payload holds {len(mv) - start} bytes, its header promises {count * dtype.itemsize}")
    return np.frombuffer(mv, dtype=dtype, count=count, offset=start).reshape(shape)


@lru_cache(maxsize=64)
def _npy_header(text: bytes) -> tuple[np.dtype, tuple[int, ...], int]:
    """Parsed once per distinct header (every latent of a bucket shares one)."""
    header = ast.literal_eval(text.decode("latin1"))
    if header["fortran_order"]:
        raise ValueError("Fortran-ordered .npy arrays are not supported")
    dtype = np.dtype(header["descr"])
    if dtype.hasobject:
        raise ValueError("object arrays are not allowed")
    shape = tuple(int(s) for s in header["shape"])
    return dtype, shape, int(np.prod(shape, dtype=np.int64))


def wds_members(sample: dict[str, Any]) -> dict[str, bytes]:
    """Sample dict → webdataset members (extension → bytes), `__key__` included."""
    out: dict[str, Any] = {"__key__": sample["key"]}
    for field, value in sample.items():
        if field == "key":
            continue
        if field == "image":
            out[image_ext(value)] = bytes(value)
        elif field in ARRAY_FIELDS:
            out[WDS_EXT[field]] = npy_bytes(value)
        elif field == "caption":
            out["txt"] = value.encode("utf-8")
        elif field == "cls":
            out["cls"] = str(int(value)).encode("ascii")
        elif field == "json":
            out["json"] = json_bytes(value)
        else:
            raise KeyError(f"unknown sample field {field!r}; the schema has {FIELDS}")
    return out


def mds_encoding(field: str, value: Any) -> str:
    """The MDS column encoding of `field`; an array column takes its array's dtype (bf16 words are uint16)."""
    if field not in MDS_ENCODING:
        raise KeyError(f"unknown sample field {field!r}; the schema has {FIELDS}")
    if field in ARRAY_FIELDS and field != "text_mask":
        return f"ndarray:{np.asarray(value).dtype.name}"
    return MDS_ENCODING[field]


def mds_columns(sample: dict[str, Any]) -> dict[str, Any]:
    """Sample dict → MDS column values (JSON pre-encoded so its bytes are deterministic)."""
    out: dict[str, Any] = {}
    for field, value in sample.items():
        if field not in MDS_ENCODING:
            raise KeyError(f"unknown sample field {field!r}; the schema has {FIELDS}")
        if field == "json":
            value = json_bytes(value)
        elif field == "image":
            value = bytes(value)
        elif field == "text_mask":
            value = np.asarray(value, dtype=np.uint8)
        elif field == "cls":
            value = int(value)
        out[field] = value
    return out


# --- MDS column decoding (the reader side; no `import streaming`, which takes seconds) ---------

_MDS_NDARRAY_DTYPES = {8: "uint8", 9: "int8", 16: "uint16", 17: "int16", 18: "float16", 32: "uint32",
                       33: "int32", 34: "float32", 64: "uint64", 65: "int64", 66: "float64"}
_MDS_SHAPE_DTYPES = {0: "uint8", 1: "uint16", 2: "uint32", 3: "uint64"}


def mds_decode_column(encoding: str, data: memoryview) -> Any:
    """Decode one MDS column value; the layouts are those of streaming's MDS encodings."""
    name, _, arg = encoding.partition(":")
    if name == "bytes":
        return data
    if name == "str":
        return bytes(data).decode("utf-8")
    if name == "int":
        return int(np.frombuffer(data, np.int64)[0])
    if name == "json":
        return json.loads(bytes(data).decode("utf-8"))
    if name == "ndarray":
        return _mds_ndarray(arg, data)
    raise ValueError(f"MDS encoding {encoding!r} is not one DiTill reads ({sorted(set(MDS_ENCODING.values()))})")


def _mds_ndarray(arg: str, data: memoryview) -> np.ndarray:
    parts = arg.split(":") if arg else []
    index = 0
    if parts:
        dtype = parts[0]
    else:
        dtype = _MDS_NDARRAY_DTYPES[data[0]]
        index = 1
    if len(parts) == 2:
        shape = tuple(int(s) for s in parts[1].split(","))
    else:
        byte = data[index]
        index += 1
        ndim, shape_dtype = byte >> 2, _MDS_SHAPE_DTYPES[byte % 4]
        nbytes = ndim * np.dtype(shape_dtype).itemsize
        shape = tuple(int(s) for s in np.frombuffer(data[index:index + nbytes], shape_dtype))
        index += nbytes
    count = int(np.prod(shape, dtype=np.int64))
    if len(data) - index < count * np.dtype(dtype).itemsize:
        raise ValueError(f"MDS array payload holds {len(data) - index} bytes, its shape {shape} needs more")
    return np.frombuffer(data, dtype=dtype, count=count, offset=index).reshape(shape)
