"""The order of an epoch, decided before any byte is read — which is what makes resume exact.

Each group (aspect-ratio bucket, or the whole dataset) has one sample *sequence* per epoch: its
shards in a seeded order, then positions shuffled within windows of `window` samples (a window
spans shards, so a batch mixes shards). The sequence does not depend on the world size.

An epoch is a *schedule* of global steps. Step j takes G = batch_size × world_size consecutive
positions of one group's sequence (which group: a seeded permutation of each group's step count);
rank r gets positions [r·B, (r+1)·B) of it. So the whole epoch is a pure function of
(seed, epoch, counts, G, base) and a loader's position is just (epoch, step). `base` holds, per
group, the positions already consumed before this plan began: zero at an epoch start, non-zero
only when a run resumes mid-epoch with a different global batch (another world size), in which
case the rest of each group's sequence is re-planned for the new G — nothing repeated, nothing lost.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import numpy as np

_SHARDS, _WINDOW, _SCHEDULE = 0, 1, 2  # rng stream tags


@dataclass(frozen=True)
class GroupLayout:
    key: str
    shard_ids: tuple[int, ...]  # indices into the loader's shard list
    counts: tuple[int, ...]  # samples per shard (from the manifest)

    @property
    def samples(self) -> int:
        return sum(self.counts)


def _rng(*words: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([int(w) for w in words]))


class GroupSequence:
    """Position → (shard id, index in shard) for one group in one epoch."""

    def __init__(self, layout: GroupLayout, group: int, seed: int, epoch: int, shuffle: bool, window: int):
        self.n = layout.samples
        self.shuffle, self.window = shuffle, window
        self._words = (seed, epoch, group)
        ids, counts = np.asarray(layout.shard_ids, np.int64), np.asarray(layout.counts, np.int64)
        order = _rng(*self._words, _SHARDS).permutation(len(ids)) if shuffle else np.arange(len(ids))
        self.shards = ids[order]
        self.ends = np.cumsum(counts[order])
        self.starts = self.ends - counts[order]
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()

    def _perm(self, w: int) -> np.ndarray:
        perm = self._perms.get(w)
        if perm is None:
            size = min(self.window, self.n - w * self.window)
            perm = _rng(*self._words, _WINDOW, w).permutation(size)
            self._perms[w] = perm
            if len(self._perms) > 4:
                self._perms.popitem(last=False)
        return perm

    def addresses(self, positions: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        pos = np.asarray(positions, np.int64) % self.n
        if self.shuffle:
            win = pos // self.window
            pos = np.array([w * self.window + self._perm(int(w))[o] for w, o in zip(win, pos % self.window)], np.int64)
        i = np.searchsorted(self.ends, pos, side="right")
        return self.shards[i], pos - self.starts[i]


class EpochPlan:
    """The schedule of one epoch for global batch `global_batch`, starting from `base`."""

    def __init__(self, layouts: list[GroupLayout], *, seed: int, epoch: int, global_batch: int, shuffle: bool,
                 drop_last: bool, window: int, base: list[int] | None = None):
        self.layouts, self.seed, self.epoch = layouts, seed, epoch
        self.global_batch, self.shuffle, self.window = global_batch, shuffle, window
        self.base = list(base) if base is not None else [0] * len(layouts)
        remaining = [max(0, g.samples - b) for g, b in zip(layouts, self.base)]
        steps = [r // global_batch + (0 if drop_last or r % global_batch == 0 else 1) for r in remaining]
        schedule = np.repeat(np.arange(len(layouts)), steps)
        if shuffle:
            # `base` enters the seed so a re-plan after an elastic resume is deterministic too.
            schedule = _rng(seed, epoch, _SCHEDULE, *self.base).permutation(schedule)
        self.schedule = schedule
        self.nth = np.zeros(len(schedule), np.int64)  # step's index among its group's steps
        for g in range(len(layouts)):
            where = schedule == g
            self.nth[where] = np.arange(int(where.sum()))
        self._sequences: dict[int, GroupSequence] = {}

    @property
    def steps(self) -> int:
        return len(self.schedule)

    def sequence(self, group: int) -> GroupSequence:
        if group not in self._sequences:
            self._sequences[group] = GroupSequence(self.layouts[group], group, self.seed, self.epoch, self.shuffle, self.window)
        return self._sequences[group]

    def slice(self, step: int, rank: int, batch_size: int) -> tuple[int, np.ndarray, int]:
        """(group, positions, how many wrapped past the group's end) of `rank`'s batch at `step`."""
        g = int(self.schedule[step])
        start = self.base[g] + int(self.nth[step]) * self.global_batch + rank * batch_size
        positions = np.arange(start, start + batch_size, dtype=np.int64)
        return g, positions, int((positions >= self.layouts[g].samples).sum())

    def consumed(self, step: int) -> list[int]:
        """Per group, positions consumed by all ranks once `step` steps are done (the next plan's base)."""
        done = np.bincount(self.schedule[:step], minlength=len(self.layouts))
        return [min(g.samples, b + int(d) * self.global_batch) for g, b, d in zip(self.layouts, self.base, done)]
