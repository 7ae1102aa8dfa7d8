"""Reusable batch buffers ("slots"): decode into memory that is already mapped, not fresh pages.

A PixArt-sized batch is ~5 MB of float32 per sample. Allocating it afresh for every batch costs
more than decoding it (zeroed shared-memory pages, one page fault per 4 KB in the worker and again
in the trainer's process), so each producer keeps a few slots and refills them.

A slot is reused only once the trainer no longer holds any tensor viewing it: the consumer checks
the storage's use count (every view, `.numpy()` or slice holds a reference). With worker
processes, a worker allocates its slots in shared memory and sends each one to the trainer's
process once (torch passes the file descriptor); afterwards batches name the slot by id, and the
trainer's process hands ids back through a per-worker queue when they are free. A worker that
finds no free slot makes a new one, up to a cap, then falls back to a one-off buffer — so a
trainer that keeps many batches alive costs memory and speed, never correctness.
"""
from __future__ import annotations

import math
import queue
from typing import Any, Optional

import torch

from data.decode import TEXT_DTYPES, SampleSpec

Flat = dict[str, torch.Tensor]  # field → 1-D buffer large enough for the largest group's batch


def slot_layout(specs: tuple[SampleSpec, ...], batch_size: int) -> dict[str, tuple[int, torch.dtype]]:
    layout = {"x": (batch_size * max(math.prod(s.x_shape) for s in specs), torch.float32)}
    if any("cls" in s.fields for s in specs):
        layout["y"] = (batch_size, torch.int64)
    text = [s for s in specs if s.cond == "text_emb" and s.text_shape]
    if text:
        (L, D), dtype = text[0].text_shape, TEXT_DTYPES[text[0].text_dtype]
        layout["text_emb"] = (batch_size * L * D, dtype)  # as stored: half the bytes of fp32 to copy and ship
        layout["text_mask"] = (batch_size * L, torch.bool)
        if text[0].pooled_dim:
            layout["text_pooled"] = (batch_size * text[0].pooled_dim, dtype)
    return layout


def alloc(layout: dict[str, tuple[int, torch.dtype]], shared: bool) -> Flat:
    return {f: _empty(n, dtype, shared) for f, (n, dtype) in layout.items()}


def _empty(numel: int, dtype: torch.dtype, shared: bool) -> torch.Tensor:
    if not shared:
        return torch.empty(numel, dtype=dtype)
    # Straight into shared memory (as torch's default_collate does in workers); a plain tensor
    # would be copied into shared memory again when sent to the trainer's process.
    storage = torch.empty(0, dtype=dtype)._typed_storage()._new_shared(numel)
    return torch.empty(0, dtype=dtype).new(storage)


def batch_views(flat: Flat, spec: SampleSpec, batch_size: int) -> dict[str, torch.Tensor]:
    out = {"x": flat["x"][: batch_size * math.prod(spec.x_shape)].view(batch_size, *spec.x_shape)}
    if "cls" in spec.fields:
        out["y"] = flat["y"][:batch_size]
    if spec.cond == "text_emb":
        assert spec.text_shape is not None
        out["text_emb"] = flat["text_emb"].view(batch_size, *spec.text_shape)
        out["text_mask"] = flat["text_mask"].view(batch_size, spec.text_shape[0])
        if spec.pooled_dim:
            out["text_pooled"] = flat["text_pooled"].view(batch_size, spec.pooled_dim)
    return out


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


class _Tracked:
    """Slots whose views were handed to the trainer; free again when only our own references are left."""

    def __init__(self) -> None:
        self.baseline: dict[Any, dict[str, int]] = {}
        self.out: dict[Any, Flat] = {}

    def remember(self, sid: Any, flat: Flat) -> None:
        self.baseline.setdefault(sid, {f: _use_count(t) for f, t in flat.items()})

    def hand_out(self, sid: Any, flat: Flat) -> None:
        self.out[sid] = flat

    def collect_free(self) -> list[Any]:
        """Every field counts: a trainer that keeps only `text_emb` still holds the slot."""
        free = [sid for sid, flat in self.out.items()
                if all(_use_count(t) <= self.baseline[sid][f] for f, t in flat.items())]
        for sid in free:
            del self.out[sid]
        return free


class LocalSlots:
    """In-process producer and consumer (no workers)."""

    def __init__(self, layout: dict[str, tuple[int, torch.dtype]], cap: int):
        self.layout, self.cap = layout, cap
        self.slots: list[Flat] = []
        self.free: list[int] = []
        self.tracked = _Tracked()

    def acquire(self) -> tuple[Optional[int], Flat]:
        self.free += self.tracked.collect_free()
        if self.free:
            sid = self.free.pop(0)
            return sid, self.slots[sid]
        flat = alloc(self.layout, shared=False)
        if len(self.slots) >= self.cap:
            return None, flat  # one-off: the trainer holds every slot
        self.slots.append(flat)
        self.tracked.remember(len(self.slots) - 1, flat)
        return len(self.slots) - 1, flat

    def hand_out(self, sid: Optional[int]) -> None:
        if sid is not None:
            self.tracked.hand_out(sid, self.slots[sid])


class WorkerSlots:
    """A worker's own slots; `free_ids` brings back the ids the trainer's process released."""

    def __init__(self, layout: dict[str, tuple[int, torch.dtype]], cap: int, free_ids: Any):
        self.layout, self.cap, self.free_ids = layout, cap, free_ids
        self.slots: list[Flat] = []

    def acquire(self) -> tuple[Optional[int], Flat, bool]:
        """(slot id or None for a one-off, buffers, whether the trainer's process has not seen it yet)."""
        try:
            sid = self.free_ids.get_nowait()
            return sid, self.slots[sid], False
        except queue.Empty:
            pass
        flat = alloc(self.layout, shared=True)
        if len(self.slots) >= self.cap:
            return None, flat, True
        self.slots.append(flat)
        return len(self.slots) - 1, flat, True


class MainSlots:
    """The trainer-process side: maps each worker's slots once, returns free ids to their worker."""

    def __init__(self, free_ids: list[Any]):
        self.free_ids = free_ids
        self.mapped: dict[tuple[int, int], Flat] = {}
        self.tracked = _Tracked()

    def receive(self, worker: int, sid: Optional[int], flat: Optional[Flat]) -> Flat:
        if sid is None:
            assert flat is not None
            return flat
        if flat is not None:
            self.mapped[(worker, sid)] = flat
            self.tracked.remember((worker, sid), flat)
        flat = self.mapped[(worker, sid)]
        self.tracked.hand_out((worker, sid), flat)
        return flat

    def release_free(self) -> None:
        for worker, sid in self.tracked.collect_free():
            self.free_ids[worker].put(sid)
