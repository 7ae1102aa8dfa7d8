"""Lazy weights: a tensor named by where it is stored, read a row range at a time.

Why: a rank of a sharded teacher needs rows [a, b) of each tensor (FSDP2 shards dim 0; a ZeRO-3
partition is a flat range, i.e. the rows that cover it), and a converter's surgery is renaming plus
concatenations, slices and permutations along dim 0 (diffusers' `to_q/k/v` → `qkv`, FLUX's `linear1`
= [q; k; v; mlp], a final adaLN whose halves are swapped). So a lazy tensor is a file-backed leaf
(`SafetensorsTensor`: `safe_open(...).get_slice(key)[a:b]`; `HeldTensor`: a tensor already at hand,
e.g. one `torch.load(weights_only=True, mmap=True)` maps from a pickle) or a dim-0 composition of lazy tensors
(`Concat`, `RowSlice`, `RowTake`, `RowReshape`), and reading rows of a composition reads only the
rows of its sources that land there.

Converters use the helpers (`cat_rows`, `slice_rows`, `split_rows`, `take_rows`, `reshape_rows`,
`materialise`), which accept plain tensors too (then they are the eager torch ops), so one converter
serves the full path (`models.convert.read_checkpoint`) and the lazy one (`lazy=True`). Any other
torch operation on a lazy tensor raises `LazyOpError` naming the fix: elementwise math on weights
cannot be read row by row.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Iterator, Sequence

import torch

SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


class LazyOpError(TypeError):
    """A torch operation other than a dim-0 concatenation/slice/permutation was applied to a lazy tensor."""


class LazyTensor(ABC):
    """A tensor of known shape and dtype whose values are read on demand, by rows along dim 0."""

    shape: torch.Size
    dtype: torch.dtype

    @abstractmethod
    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) in the stored dtype, reading nothing else. The result may share memory
        with a file mapping: copy it (e.g. `dst.copy_(...)`) before keeping it."""

    def leaves(self) -> Iterator["LazyTensor"]:
        """The file-backed tensors this one reads from."""
        yield self

    def read(self) -> torch.Tensor:
        """The whole tensor."""
        if not self.shape:
            raise ValueError(f"{self!r}: a 0-d lazy tensor has no rows; its leaf must override read()")
        return self.rows(0, self.shape[0])

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def numel(self) -> int:
        return self.shape.numel()

    @property
    def nbytes(self) -> int:
        return self.numel() * self.dtype.itemsize

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", str(func))
        raise LazyOpError(
            f"torch.{name} on a lazy tensor: weights are read row by row from the file, so a converter may only "
            "rename them and concatenate, slice, permute or row-preserving reshape them along dim 0 "
            "(models.lazy: cat_rows, slice_rows, split_rows, take_rows, reshape_rows); use materialise() where a "
            "small tensor must be compared or computed on"
        )

    def _check_range(self, start: int, stop: int) -> None:
        n = self.shape[0] if self.shape else 0
        if not 0 <= start <= stop <= n:
            raise IndexError(f"rows [{start}, {stop}) out of range for {tuple(self.shape)}")

    def __repr__(self) -> str:
        return f"{type(self).__name__}({tuple(self.shape)}, {self.dtype})"


# --- leaves ----------------------------------------------------------------------------------------
class SafetensorsFile:
    """One safetensors file, opened once (memory-mapped) for all of its tensors; `close()` unmaps it."""

    def __init__(self, path: str) -> None:
        self.path = str(path)
        self._handle: Any = None

    def handle(self):
        if self._handle is None:
            from safetensors import safe_open

            self._handle = safe_open(self.path, framework="pt", device="cpu")
        return self._handle

    def close(self) -> None:
        self._handle = None

    def keys(self) -> list[str]:
        return list(self.handle().keys())

    def metadata(self) -> dict[str, str]:
        return dict(self.handle().metadata() or {})

    def tensor(self, key: str) -> "SafetensorsTensor":
        sl = self.handle().get_slice(key)
        dtype = SAFETENSORS_DTYPES.get(sl.get_dtype())
        if dtype is None:
            raise ValueError(f"{self.path}: tensor {key!r} has dtype {sl.get_dtype()}, which torch cannot hold")
        return SafetensorsTensor(self, key, torch.Size(sl.get_shape()), dtype)

    def tensors(self) -> dict[str, "SafetensorsTensor"]:
        return {k: self.tensor(k) for k in self.keys()}


class SafetensorsTensor(LazyTensor):
    """A tensor of a safetensors file: rows are slice reads of the mapped file."""

    def __init__(self, file: SafetensorsFile, key: str, shape: torch.Size, dtype: torch.dtype) -> None:
        self.file, self.key, self.shape, self.dtype = file, key, shape, dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return self.file.handle().get_slice(self.key)[start:stop]

    def read(self) -> torch.Tensor:
        return self.file.handle().get_tensor(self.key)

    def __repr__(self) -> str:
        return f"SafetensorsTensor({self.file.path}:{self.key}, {tuple(self.shape)}, {self.dtype})"


class HeldTensor(LazyTensor):
    """A tensor already at hand: one `torch.load(weights_only=True, mmap=True)` maps from a file (its pages are read when
    touched), or a small computed one (DiT's fixed position embedding)."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self.tensor, self.shape, self.dtype = tensor, tensor.shape, tensor.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return self.tensor[start:stop]

    def read(self) -> torch.Tensor:
        return self.tensor


# --- compositions along dim 0 ------------------------------------------------------------------------
class Concat(LazyTensor):
    """[part_0; part_1; …] along dim 0."""

    def __init__(self, parts: Sequence[LazyTensor]) -> None:
        if not parts:
            raise ValueError("cannot concatenate no tensors")
        tails = {tuple(p.shape[1:]) for p in parts}
        dtypes = {p.dtype for p in parts}
        if any(not p.shape for p in parts) or len(tails) > 1 or len(dtypes) > 1:
            raise ValueError(f"cannot concatenate along dim 0: {[repr(p) for p in parts]}")
        self.parts = list(parts)
        self.starts = [0]
        for p in self.parts:
            self.starts.append(self.starts[-1] + p.shape[0])
        self.shape = torch.Size((self.starts[-1], *parts[0].shape[1:]))
        self.dtype = parts[0].dtype

    def leaves(self) -> Iterator[LazyTensor]:
        for p in self.parts:
            yield from p.leaves()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        pieces = []
        for part, lo, hi in zip(self.parts, self.starts, self.starts[1:]):
            a, b = max(start, lo), min(stop, hi)
            if a < b:
                pieces.append(part.rows(a - lo, b - lo))
        if not pieces:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


class RowSlice(LazyTensor):
    """Rows [start, stop) of another lazy tensor."""

    def __init__(self, base: LazyTensor, start: int, stop: int) -> None:
        base._check_range(start, stop)
        self.base, self.start = base, start
        self.shape = torch.Size((stop - start, *base.shape[1:]))
        self.dtype = base.dtype

    def leaves(self) -> Iterator[LazyTensor]:
        yield from self.base.leaves()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        return self.base.rows(self.start + start, self.start + stop)


class RowTake(LazyTensor):
    """Rows `index` of another lazy tensor, in that order (a permutation, a reordering of blocks)."""

    def __init__(self, base: LazyTensor, index: Sequence[int] | torch.Tensor) -> None:
        index = torch.as_tensor(index, dtype=torch.long).reshape(-1)
        if index.numel() and not (0 <= int(index.min()) and int(index.max()) < base.shape[0]):
            raise IndexError(f"row index out of range for {tuple(base.shape)}")
        self.base, self.index = base, index
        self.shape = torch.Size((index.numel(), *base.shape[1:]))
        self.dtype = base.dtype

    def leaves(self) -> Iterator[LazyTensor]:
        yield from self.base.leaves()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        pieces = [self.base.rows(a, b) for a, b in runs(self.index[start:stop].tolist())]
        if not pieces:
            return torch.empty((0, *self.shape[1:]), dtype=self.dtype)
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


class RowReshape(LazyTensor):
    """Another lazy tensor with each row reshaped (dim 0 unchanged): e.g. a conv kernel as a matrix."""

    def __init__(self, base: LazyTensor, shape: Sequence[int]) -> None:
        shape = torch.Size(shape)
        if not shape or shape[0] != base.shape[0] or shape.numel() != base.numel():
            raise ValueError(f"reshape_rows: {tuple(base.shape)} → {tuple(shape)} must keep dim 0 and the size")
        self.base, self.shape, self.dtype = base, shape, base.dtype

    def leaves(self) -> Iterator[LazyTensor]:
        yield from self.base.leaves()

    def rows(self, start: int, stop: int) -> torch.Tensor:
        return self.base.rows(start, stop).reshape(stop - start, *self.shape[1:])


def runs(index: list[int]) -> list[tuple[int, int]]:
    """[3, 4, 5, 0, 1] → [(3, 6), (0, 2)]: maximal runs of consecutive rows, each one read."""
    out: list[tuple[int, int]] = []
    for i in index:
        if out and out[-1][1] == i:
            out[-1] = (out[-1][0], i + 1)
        else:
            out.append((i, i + 1))
    return out


# --- helpers a converter uses: plain tensors in, eager ops; any lazy tensor in, a lazy result ------
Weight = Any  # torch.Tensor | LazyTensor


def is_lazy(t: Any) -> bool:
    return isinstance(t, LazyTensor)


def as_lazy(t: Weight) -> LazyTensor:
    return t if isinstance(t, LazyTensor) else HeldTensor(t)


def cat_rows(parts: Sequence[Weight]) -> Weight:
    """torch.cat(parts, dim=0), lazily when any part is lazy."""
    if not any(is_lazy(p) for p in parts):
        return torch.cat(list(parts), dim=0)
    return Concat([as_lazy(p) for p in parts])


def slice_rows(t: Weight, start: int, stop: int) -> Weight:
    return RowSlice(t, start, stop) if is_lazy(t) else t[start:stop]


def split_rows(t: Weight, sizes: Sequence[int]) -> list[Weight]:
    """torch.split(t, sizes, dim=0)."""
    if sum(sizes) != t.shape[0]:
        raise ValueError(f"split_rows: sizes {list(sizes)} do not add up to {t.shape[0]} rows")
    out, at = [], 0
    for n in sizes:
        out.append(slice_rows(t, at, at + n))
        at += n
    return out


def take_rows(t: Weight, index: Sequence[int] | torch.Tensor) -> Weight:
    """t[index] along dim 0 (e.g. swapping the two halves of FLUX's final adaLN)."""
    return RowTake(t, index) if is_lazy(t) else t[torch.as_tensor(index, dtype=torch.long)]


def reshape_rows(t: Weight, shape: Sequence[int]) -> Weight:
    return RowReshape(t, shape) if is_lazy(t) else t.reshape(shape)


def materialise(t: Weight) -> torch.Tensor:
    """The whole tensor (for small ones a converter must compare or compute on)."""
    return t.read() if is_lazy(t) else t


def read_rows(t: Weight, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of a lazy or plain tensor (a view of a plain one: copy before keeping)."""
    return t.rows(start, stop) if is_lazy(t) else t[start:stop]


def read_flat(t: Weight, start: int, stop: int) -> torch.Tensor:
    """Elements [start, stop) of the flattened tensor (a ZeRO-3 partition), reading only the rows that
    hold them."""
    if not t.shape:
        return materialise(t).reshape(1)[start:stop]
    per_row = max(1, t.shape[1:].numel())
    r0, r1 = start // per_row, -(-stop // per_row)
    block = read_rows(t, r0, r1).reshape(-1)
    return block[start - r0 * per_row: stop - r0 * per_row]


def close_sources(state: dict[str, Weight]) -> None:
    """Unmap every file a lazy state dict reads from."""
    for t in state.values():
        if is_lazy(t):
            for leaf in t.leaves():
                if isinstance(leaf, SafetensorsTensor):
                    leaf.file.close()
