"""The loader for third-party shard sets (`data.layout: plain`): batches from streams of shards.

The order is `data/streams.py`'s; a rank's position is one cursor per stream its slice covers,
plus the step. Workers produce steps round-robin as the plan-driven loader does (so the stream
does not depend on the number of workers): each walks every step to move the cursors, and reads
samples only for its own steps. Every batch message carries the cursors after it, which is what
`state_dict()` saves. Ranks hold only their own streams' cursors: a resume on another world size
merges every old rank's state first (`merge_rank_states`).
"""
from __future__ import annotations

import logging
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from itertools import islice
from typing import Any, Iterator, Optional

from data.config import DataConfig
from data.decode import BatchBuilder
from data.loader import DataError, LoaderBase, SlotStream, _ShardPool, fill_batch
from data.schema import SampleError
from data.slots import Flat, batch_views
from data.streams import Cursor, EmptyStream, Streams, slice_streams
from data.stores import is_remote
from data.thirdparty import StreamCatalog

log = logging.getLogger("ditill.data")

STATE_VERSION = 1
TOP_UP_LIMIT = 4096  # samples looked at, past a batch, for readable replacements of bad ones

Job = tuple[int, dict[int, Cursor], dict[int, Cursor], list[tuple[str, str]]]  # step, cursors before/after, notes


class _StreamBatches(SlotStream):
    def __init__(self, catalog: StreamCatalog, cfg: DataConfig, rank: int, world_size: int, step: int,
                 cursors: dict[int, Cursor], free_ids: Optional[list[Any]] = None):
        super().__init__(catalog, cfg, rank, world_size, free_ids)
        self.step, self.cursors = step, cursors
        self.global_batch = cfg.batch_size * world_size
        self.q = self.global_batch // cfg.streams
        self.pieces = slice_streams(rank, cfg.batch_size, self.global_batch, cfg.streams)
        self._events: list[tuple[str, str]] = []
        self._prefetcher: Optional[ThreadPoolExecutor] = None

    def _streams(self) -> Streams:
        cfg = self.cfg
        return Streams(len(self.catalog.shards), cfg.streams, seed=cfg.seed, shuffle=cfg.shuffle, window=cfg.shuffle_window,
                       count=self._count, on_block=self._prefetch)

    def _count(self, shard: int) -> int:
        known = self.catalog.shards[shard].known_count()
        if known is not None:
            return known
        try:
            return len(self.pool.reader(shard, self._events).keys)  # type: ignore[attr-defined]
        except SampleError:
            return 0  # the shard cannot be opened: reported (through _events) by the step that reached it

    def _prefetch(self, shards: Any) -> None:
        wanted = [self.catalog.shards[int(s)] for s in shards]
        wanted = [s for s in wanted if is_remote(s.path) or (s.entry or {}).get("compression")]
        if not wanted:
            return
        if self._prefetcher is None:
            self._prefetcher = ThreadPoolExecutor(2, thread_name_prefix="ditill-prefetch")
        for s in wanted:
            self._prefetcher.submit(_quietly, s)

    def jobs(self) -> Iterator[Job]:
        self.streams = streams = self._streams()
        cursors, step = dict(self.cursors), self.step
        while True:
            try:
                after = {k: streams.advance(k, c, self.q) for k, c in cursors.items()}
            except EmptyStream as e:
                raise DataError(f"{self.catalog.where}: {e}; every shard of it failed (see the warnings above)") from e
            events, self._events = self._events, []
            yield step, cursors, after, events
            cursors, step = after, step + 1

    def produce(self, job: Job, pool: _ShardPool, flat: Flat) -> dict[str, Any]:
        step, before, after, events = job
        B, spec, streams = self.cfg.batch_size, self.catalog.specs[0], self.streams
        # augmentation draws keyed on (seed, the slowest lane's epoch, shard, index): resume-exact
        builder = BatchBuilder(spec, B, batch_views(flat, spec, B), seed=self.cfg.seed,
                               epoch=min(int(c[0]) for c in before.values()))
        counts: Counter[str] = Counter(read=B, bad_shards=len(events))
        notes = list(events)
        planned = (a for k, lo, hi in self.pieces
                   for a in islice(streams.addresses(k, streams.advance(k, before[k], lo)), hi - lo))
        last = self.pieces[-1][0]
        try:
            fill_batch(builder, pool, planned, islice(streams.addresses(last, after[last]), TOP_UP_LIMIT), counts, notes)
        except EmptyStream as e:
            raise DataError(f"{self.catalog.where}: {e}") from e
        notes += self._events
        counts["bad_shards"] += len(self._events)
        self._events = []
        if not builder.full:
            raise DataError(f"no readable sample among the {TOP_UP_LIMIT} after step {step}'s in stream {last} of "
                            f"{self.catalog.where}; see the warnings above for the damaged shards")
        return {"step": step, "cursors": {k: list(c) for k, c in after.items()}, "group": 0, "key": builder.keys,
                "caption": builder.captions, "counts": dict(counts), "notes": notes}


def _quietly(shard: Any) -> None:
    """Prefetch: errors surface again (and are handled) when the shard is really opened."""
    try:
        shard._local()
    except Exception as e:  # noqa: BLE001 - a prefetch never decides anything
        log.debug("prefetch of %s failed: %s", shard.path, e)


class StreamLoader(LoaderBase):
    """Iterate for batches (forever); `state_dict()` after a batch, `load_state_dict()` to resume."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, catalog: StreamCatalog):
        super().__init__(cfg, rank, world_size, catalog)
        G = cfg.batch_size * world_size
        if G % cfg.streams:
            raise ValueError(f"data.streams={cfg.streams} must divide the global batch {cfg.batch_size} × {world_size} = {G}")
        if cfg.streams > len(catalog.shards):
            raise ValueError(f"data.streams={cfg.streams} exceeds the {len(catalog.shards)} shards of {catalog.where}: "
                             "each stream needs at least one shard; lower data.streams")
        self.mine = [k for k, _, _ in slice_streams(rank, cfg.batch_size, G, cfg.streams)]
        self._step = 0
        self._cursors: dict[int, Cursor] = {k: (0, 0, 0) for k in self.mine}

    def _make_stream(self, free_ids: Optional[list[Any]]) -> SlotStream:
        return _StreamBatches(self.catalog, self.cfg, self.rank, self.world_size, self._step, dict(self._cursors), free_ids)

    def _accept(self, msg: dict[str, Any]) -> None:
        if msg["step"] != self._step:  # the round-robin contract is broken: never guess
            raise DataError(f"internal: got batch of step {msg['step']}, expected {self._step}")
        self._cursors = {int(k): (int(c[0]), int(c[1]), int(c[2])) for k, c in msg["cursors"].items()}
        self._step += 1

    @property
    def steps_per_epoch(self) -> None:
        """Unknown: nobody counted the set (streams reach their epoch ends at their own pace)."""
        return None

    def stats(self) -> dict[str, int | float]:
        return {**self._skip_stats(), "data/epoch": min(c[0] for c in self._cursors.values()),
                "data/bad_shards": self._counts["bad_shards"]}

    def state_dict(self) -> dict[str, Any]:
        return {"version": STATE_VERSION, "kind": "streams", "step": self._step,
                "cursors": {str(k): list(c) for k, c in self._cursors.items()},
                "streams": self.cfg.streams, "seed": self.cfg.seed, "shuffle": self.cfg.shuffle,
                "shuffle_window": self.cfg.shuffle_window, "shards": self.catalog.fingerprint,
                "global_batch": self.cfg.batch_size * self.world_size, "world_size": self.world_size,
                "counters": dict(self._counts)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume every stream at its saved cursor (any world size whose slice streams the state holds)."""
        if sd.get("kind") != "streams" or sd.get("version") != STATE_VERSION:
            raise ValueError(f"this loader state (kind {sd.get('kind')!r}, version {sd.get('version')!r}) was not saved by "
                             f"the streams loader of this DiTill version; data.layout must be what it was when it was saved")
        if sd["shards"] != self.catalog.fingerprint:
            raise ValueError(f"the loader state was saved for another shard set ({sd['shards']}) than {self.catalog.where} "
                             f"({self.catalog.fingerprint}); resume on the same shards, or start the data from scratch")
        for key in ("streams", "seed", "shuffle", "shuffle_window"):
            now = getattr(self.cfg, key)
            if sd[key] != now:
                raise ValueError(f"data.{key} was {sd[key]!r} when the loader state was saved and is {now!r} now; "
                                 f"set data.{key}={sd[key]!r} to resume (the order depends on it)")
        saved = {int(k): (int(c[0]), int(c[1]), int(c[2])) for k, c in sd["cursors"].items()}
        missing = [k for k in self.mine if k not in saved]
        if missing:
            raise ValueError(f"the loader state holds the cursors of streams {sorted(saved)}, rank {self.rank} needs {missing}: "
                             "a resume on another world size must merge every old rank's state (data.merge_rank_states)")
        self._cursors = {k: saved[k] for k in self.mine}
        self._step = int(sd["step"])
        self._counts = Counter({k: int(v) for k, v in sd.get("counters", {}).items()})
        self.close()


def merge_rank_states(states: list[dict[str, Any]]) -> dict[str, Any]:
    """One loader state from every old rank's, for a resume on another world size.

    The plan-driven loader's position is global (rank 0's state says it all); the streams loader's
    cursors are per rank, so they are united.
    """
    first = states[0]
    if first.get("kind") != "streams":
        return first
    steps = {s["step"] for s in states}
    if len(steps) != 1:
        raise ValueError(f"the old ranks' loader states are at different steps {sorted(steps)}; they belong to different checkpoints")
    cursors: dict[str, list[int]] = {}
    for s in states:
        cursors.update(s["cursors"])
    return {**first, "cursors": cursors}
