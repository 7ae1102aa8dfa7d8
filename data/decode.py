"""Raw sample fields → rows of a batch, checking everything the task relies on.

A `BatchBuilder` decodes each sample straight into its row of preallocated batch tensors (see
`data/slots.py`): a float16 latent is converted once, by the copy into the float32 batch; a text
embedding keeps its stored 16-bit dtype (bf16, or float16 for the first shard layout: half the
bytes of float32 to copy and to ship to the device), and an unpadded one is padded back to
max_length with zeros (its mask says where). Flips and posterior draws come from `data.augment`.
A sample that fails a check raises `SampleError`; its half-written row is simply reused.
"""
from __future__ import annotations

import io
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import torch
from PIL import Image

from data.augment import Augment, flipped, posterior_noise, resolve_augment, sample_words
from data.config import DataConfig
from data.manifest import Manifest
from data.schema import SampleError
from data.transforms import prepare_image, to_chw

TEXT_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class SampleSpec:
    """What every sample of one group must decode to (derived from the config and the manifest)."""

    input: str  # image | latent
    cond: str  # class | text_emb | caption | none
    x_shape: tuple[int, int, int]  # (C, H, W) of batch["x"] rows
    num_classes: Optional[int] = None
    text_shape: Optional[tuple[int, int]] = None  # (L, D)
    scaling_factor: float = 1.0
    shift_factor: float = 0.0
    labels: bool = False  # batches carry `y`: the task needs it, or the data has it (an int costs nothing)
    text_dtype: str = "fp16"  # as stored: fp16, or bf16 (raw words in the shards)
    text_padded: bool = True  # False: (n, D) stored, padded back to (L, D) here
    pooled_dim: Optional[int] = None  # batches carry `text_pooled` (B, Dp)
    augment: Augment = field(default_factory=Augment)

    @property
    def fields(self) -> frozenset[str]:
        need = {self.input} | ({"cls"} if self.labels or self.cond == "class" else set())
        need |= {"class": set(), "text_emb": {"text_emb", "text_mask"}, "caption": {"caption"}, "none": set()}[self.cond]
        if self.cond == "text_emb" and self.pooled_dim:
            need.add("text_pooled")
        if self.input == "latent":
            aug = self.augment
            need |= ({"latent_std"} if aug.sample_latent else set()) | ({"latent_flip"} if aug.flip else set())
            need |= {"latent_flip_std"} if aug.flip and aug.sample_latent else set()
        return frozenset(need)


def spec_options(cfg: DataConfig, manifest: Optional[Manifest], where: str) -> dict[str, Any]:
    """The SampleSpec keywords that come from the manifest's text entry and the augmentation config."""
    fields = set(manifest.fields) if manifest else {"image", "cls", "caption"}
    source = manifest.source if manifest else "digits"
    augment = resolve_augment(cfg.flip, cfg.sample_latent, input=cfg.input, cond=cfg.cond, fields=fields, source=source, where=where)
    text = (manifest.text if manifest else None) or {}
    dtype = text.get("dtype", "fp16")
    if dtype not in TEXT_DTYPES:
        raise ValueError(f"{where}: text dtype {dtype!r} in the manifest is not one DiTill reads ({', '.join(TEXT_DTYPES)})")
    pooled = text.get("pooled_dim") if "text_pooled" in fields else None
    return {"text_dtype": dtype, "text_padded": text.get("storage", "padded") == "padded",
            "pooled_dim": int(pooled) if pooled else None, "augment": augment}


class BatchBuilder:
    def __init__(self, spec: SampleSpec, batch_size: int, out: dict[str, torch.Tensor], seed: int = 0, epoch: int = 0):
        """`out`: the batch tensors to fill (see `data.slots.batch_views`); seed and epoch key the draws."""
        self.spec = spec
        self.size = batch_size
        self.rows = 0
        self.seed, self.epoch = seed, epoch
        self.x = out["x"]
        self.y = out.get("y")
        self.text_emb, self.text_mask, self.text_pooled = out.get("text_emb"), out.get("text_mask"), out.get("text_pooled")
        self.keys: list[str] = []
        self.captions: list[str] = []

    @property
    def full(self) -> bool:
        return self.rows == self.size

    def add(self, raw: dict[str, Any], shard: int = 0, index: int = 0) -> None:
        """Decode `raw` (sample `index` of shard `shard`) into the next row, or raise SampleError and leave the row free."""
        spec, row = self.spec, self.rows
        missing = sorted(spec.fields - raw.keys())
        if missing:
            raise SampleError("missing_field", f"no {', '.join(missing)} (the task needs {', '.join(sorted(spec.fields))})")
        if self.y is not None:
            label = raw["cls"]
            if not isinstance(label, (int, np.integer)) or not 0 <= label < (spec.num_classes or 2**62):
                raise SampleError("bad_label", f"class label {label!r} is outside [0, {spec.num_classes})")
        words = sample_words(self.seed, self.epoch, shard, index) if spec.augment.random else None
        flip = words is not None and spec.augment.flip and flipped(words)
        if spec.input == "image":
            decode_image(raw["image"], spec.x_shape, out=self.x[row])
            if flip:
                self.x[row] = self.x[row].flip(-1)
        else:
            name = "latent_flip" if flip else "latent"
            _copy_array(self.x[row], raw[name], spec.x_shape, name)
            xr = self.x[row].numpy()
            if spec.augment.sample_latent:  # mean + std · ε, as the VAE's posterior sample()
                std = raw[f"{name}_std"]
                if tuple(std.shape) != spec.x_shape or not all_finite(std):
                    raise SampleError("bad_shape", f"{name}_std has shape {tuple(std.shape)} or non-finite values; expected {spec.x_shape}")
                xr += std.astype(np.float32) * posterior_noise(words, spec.x_shape)
            if spec.shift_factor:
                xr -= np.float32(spec.shift_factor)
            xr *= np.float32(spec.scaling_factor)
        if self.y is not None:
            self.y[row] = int(label)
        if spec.cond == "text_emb":
            self._text(row, raw)
        if spec.cond == "caption":
            self.captions.append(raw["caption"])
        self.keys.append(raw["key"])
        self.rows += 1

    def _text(self, row: int, raw: dict[str, Any]) -> None:
        spec = self.spec
        assert spec.text_shape is not None
        L, D = spec.text_shape
        mask = raw["text_mask"]
        if mask.shape != (L,):
            raise SampleError("bad_shape", f"text_mask has shape {tuple(mask.shape)}, expected ({L},)")
        emb = raw["text_emb"]
        n = L
        if not spec.text_padded:
            n = int(np.count_nonzero(mask))
            if emb.shape != (n, D):
                raise SampleError("bad_shape", f"unpadded text_emb has shape {tuple(emb.shape)}, its mask counts {n} tokens of dim {D}")
        _copy_text(self.text_emb[row], emb, (n, D), spec.text_dtype, "text_emb")
        self.text_mask[row] = torch.from_numpy(np.asarray(mask) != 0)
        if spec.pooled_dim:
            _copy_text(self.text_pooled[row], raw["text_pooled"], (spec.pooled_dim,), spec.text_dtype, "text_pooled")

# (unsigned view, mask without the sign bit, bits of +inf): a value is NaN/Inf exactly when its
# exponent bits are all ones, i.e. when |bits| >= inf's bits.
_FLOAT_BITS = {
    np.dtype(np.float16): (np.uint16, 0x7FFF, 0x7C00),
    np.dtype(np.float32): (np.uint32, 0x7FFFFFFF, 0x7F800000),
    np.dtype(np.float64): (np.uint64, 0x7FFFFFFFFFFFFFFF, 0x7FF0000000000000),
}


def all_finite(arr: np.ndarray) -> bool:
    """One integer pass over the raw bits: ~10x cheaper than np.isfinite on fp16 (no float decode)."""
    bits = _FLOAT_BITS.get(arr.dtype)
    if bits is None or not arr.flags.c_contiguous:
        return bool(np.isfinite(arr).all())
    utype, mask, inf = bits
    return arr.size == 0 or int((arr.view(utype) & mask).max()) < inf


def _copy_text(dst: torch.Tensor, arr: np.ndarray, shape: tuple[int, ...], dtype: str, name: str) -> None:
    """Copy into the first shape[0] rows of `dst` and zero the rest (a reused slot holds the last batch)."""
    if dtype == "fp16":
        _copy_array(dst[: shape[0]], arr, shape, name)
    else:  # bf16 as raw words: a bit copy, finite when no exponent field is all ones
        if tuple(arr.shape) != tuple(shape):
            raise SampleError("bad_shape", f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
        if arr.dtype != np.uint16:
            raise SampleError("bad_shape", f"{name} has dtype {arr.dtype}, expected uint16 (bf16 words, as the manifest says)")
        if arr.size and int((arr & 0x7FFF).max()) >= 0x7F80:
            raise SampleError("nonfinite", f"{name} holds NaN/Inf values")
        np.copyto(dst[: shape[0]].view(torch.int16).numpy(), arr.view(np.int16))
    if shape[0] < dst.shape[0]:
        dst[shape[0]:].view(torch.int16).numpy().fill(0)


def _copy_array(dst: torch.Tensor, arr: np.ndarray, shape: tuple[int, ...], name: str) -> None:
    if tuple(arr.shape) != tuple(shape):
        raise SampleError("bad_shape", f"{name} has shape {tuple(arr.shape)}, expected {tuple(shape)}")
    if arr.dtype.kind != "f":
        raise SampleError("bad_shape", f"{name} has dtype {arr.dtype}, expected a float array")
    if not all_finite(arr):
        raise SampleError("nonfinite", f"{name} holds {int((~np.isfinite(arr)).sum())} NaN/Inf values")
    # numpy, not torch: a loader must not wake torch's intra-op thread pool for every row (on a
    # busy 2-core box that pool made a 2.5 MB copy 20x slower than this memcpy-speed copy)
    np.copyto(dst.numpy(), arr, casting="same_kind")


def decode_image(data: Any, shape: tuple[int, int, int], out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Encoded bytes (or the digits' pixels) → float32 (C, h, w) in [-1, 1], into `out` when given."""
    channels, h, w = shape
    if isinstance(data, np.ndarray):  # the in-memory digits: already pixels
        pixels = data
    else:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                pixels = np.array(im.convert("L" if channels == 1 else "RGB"))
        except (OSError, ValueError, Image.DecompressionBombError, SyntaxError) as e:
            raise SampleError("decode_error", f"image cannot be decoded: {type(e).__name__}: {e}") from e
    chw = to_chw(pixels)
    if out is None or tuple(chw.shape) != tuple(shape):
        x = prepare_image(chw, (h, w))
        return x if out is None else out.copy_(x)
    # Already the batch's size: straight into the row, no full-size temporary (bit-identical to
    # prepare_image, whose clamp cannot bite on 8-bit values).
    return out.copy_(chw).div_(127.5).sub_(1.0)
