"""The order of a shard set nobody counted: streams of shards, shuffled block by block.

A DiTill shard directory has a manifest, so an epoch can be planned before a byte is read
(`data/plan.py`). A third-party set of hundreds of terabytes has no manifest and is not scanned
first: a shard's sample count becomes known only when its stats file or the shard itself is read.
So the order is defined so that it never needs a count beyond the shards being read:

- Epoch e of the set is its shards in a seeded order; stream k of K takes every K-th of them.
  Streams run on independently (a stream that ends its shards starts its next epoch).
- A stream reads its shards in *blocks*: consecutive shards until they hold ≥ `window` samples.
  The samples of a block are visited in a seeded permutation — the deterministic shuffle buffer.
  A block's permutation depends only on (seed, epoch, stream, where the block starts) and its
  counts, so a resume re-reads the block from its shards' start and lands on the same sample.
- A stream's position is a cursor (epoch, block start, offset in the block's permutation).
- Every global batch of G samples takes G/K consecutive samples from each stream, stream after
  stream; rank r takes positions [r·B, (r+1)·B) of that. The global batch is therefore the same
  for every world size with the same G, each rank reads only the streams its slice covers (one
  or a few when K is a multiple of the world size), and a resume with another G continues every
  stream from its cursor: nothing repeated, nothing lost.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import numpy as np

from data.plan import _rng

_ORDER, _BLOCK = 10, 11  # rng stream tags (plan.py uses 0..2)
Cursor = tuple[int, int, int]  # (epoch, index of the block's first shard in the stream's list, offset)


class EmptyStream(RuntimeError):
    """A stream whose shards hold no readable sample in a whole epoch."""


@dataclass(frozen=True)
class Block:
    shards: np.ndarray  # shard ids, in stream order
    ends: np.ndarray  # cumulative sample counts
    end: int  # index in the stream's list just past the block
    perm: np.ndarray  # visiting order of the block's samples

    @property
    def n(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def address(self, k: int) -> tuple[int, int]:
        p = int(self.perm[k])
        i = int(np.searchsorted(self.ends, p, side="right"))
        return int(self.shards[i]), p - (int(self.ends[i - 1]) if i else 0)


class Streams:
    """Addresses of stream samples; `count(shard)` is asked only for shards of blocks reached."""

    def __init__(self, shards: int, streams: int, *, seed: int, shuffle: bool, window: int, count: Callable[[int], int],
                 on_block: Optional[Callable[[np.ndarray], None]] = None):
        if streams > shards:
            raise ValueError(f"data.streams={streams} exceeds the {shards} shards of the set: each stream needs at least "
                             "one shard; lower data.streams")
        self.n_shards, self.k, self.seed, self.shuffle, self.window, self.count = shards, streams, seed, shuffle, window, count
        self.on_block = on_block  # told the shards that follow a block just reached (to prefetch them)
        self._orders: OrderedDict[int, np.ndarray] = OrderedDict()
        self._blocks: OrderedDict[tuple[int, int, int], Block] = OrderedDict()

    def stream_shards(self, stream: int, epoch: int) -> np.ndarray:
        order = self._orders.get(epoch)
        if order is None:
            order = _rng(self.seed, epoch, _ORDER).permutation(self.n_shards) if self.shuffle else np.arange(self.n_shards)
            self._orders[epoch] = order
            if len(self._orders) > 2:
                self._orders.popitem(last=False)
        return order[stream::self.k]

    def block(self, stream: int, epoch: int, start: int) -> Block:
        key = (stream, epoch, start)
        b = self._blocks.get(key)
        if b is None:
            ids = self.stream_shards(stream, epoch)
            counts: list[int] = []
            end = start
            while end < len(ids) and (not counts or (self.shuffle and sum(counts) < self.window)):
                counts.append(max(0, int(self.count(int(ids[end])))))
                end += 1
            n = sum(counts)
            perm = _rng(self.seed, epoch, _BLOCK, stream, start).permutation(n) if self.shuffle else np.arange(n)
            b = Block(ids[start:end], np.cumsum(counts, dtype=np.int64), end, perm)
            if self.on_block is not None:
                self.on_block(ids[end:end + max(1, end - start)])
            self._blocks[key] = b
            if len(self._blocks) > 4 * self.k + 8:
                self._blocks.popitem(last=False)
        self._blocks.move_to_end(key)
        return b

    def _settle(self, stream: int, cursor: Cursor) -> tuple[Cursor, Block]:
        """The cursor moved onto a block that holds its offset (empty blocks passed over)."""
        epoch, start, offset = cursor
        longest, empty = -(-self.n_shards // self.k), 0
        while True:
            b = self.block(stream, epoch, start)
            if offset < b.n:
                return (epoch, start, offset), b
            offset -= b.n
            empty = empty + (b.end - start) if b.n == 0 else 0
            if empty > longest:
                raise EmptyStream(f"stream {stream} of {self.k} holds no readable sample in a whole epoch")
            start = b.end
            if start >= len(self.stream_shards(stream, epoch)):
                epoch, start = epoch + 1, 0

    def advance(self, stream: int, cursor: Cursor, n: int) -> Cursor:
        epoch, start, offset = cursor
        return self._settle(stream, (epoch, start, offset + n))[0]

    def addresses(self, stream: int, cursor: Cursor) -> Iterator[tuple[int, int]]:
        """(shard, index in shard) of the stream's samples from `cursor` on, forever."""
        cursor, b = self._settle(stream, cursor)
        while True:
            epoch, start, offset = cursor
            for k in range(offset, b.n):
                yield b.address(k)
            cursor, b = self._settle(stream, (epoch, start, b.n))


def slice_streams(rank: int, batch_size: int, global_batch: int, streams: int) -> list[tuple[int, int, int]]:
    """(stream, first, last+1) of the per-step samples of each stream that rank `rank` takes."""
    q = global_batch // streams
    lo, hi = rank * batch_size, (rank + 1) * batch_size
    return [(k, max(lo, k * q) - k * q, min(hi, (k + 1) * q) - k * q) for k in range(lo // q, -(-hi // q))]
