"""`build_loader(cfg, rank, world_size)`: an endless, resumable stream of batches for one rank.

Position = (epoch, step) in a plan fixed before reading (see `data/plan.py`). With N worker
processes, worker w produces steps w, w+N, … from the current position and torch's DataLoader
returns them in that round-robin order, so the stream is the same for any number of workers, and
the loader's state is just the position of the next batch plus a few counters.

Bad samples never shift the plan: a batch is its planned slice minus the bad samples, topped up
with the next readable samples of the same bucket (those are counted as `data/repeated`, since
they come round again in their own turn). Every skip is counted by reason and logged with the
sample's key and shard; past `max_skipped_fraction` the run stops with `DataError`.
"""
from __future__ import annotations

import logging
import multiprocessing
from collections import Counter, OrderedDict
from typing import Any, Iterable, Iterator, Optional

from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from data.catalog import Catalog, build_catalog
from data.config import DataConfig
from data.decode import BatchBuilder
from data.plan import EpochPlan
from data.readers import ShardError, ShardReader
from data.schema import REASONS, SampleError
from data.slots import Flat, LocalSlots, MainSlots, WorkerSlots, batch_views, slot_layout

log = logging.getLogger("ditill.data")

STATE_VERSION = 1
MAX_OPEN_SHARDS = 16
WARNINGS_PER_REASON = 100  # per process; counters keep counting after that
SLOTS_EXTRA = 3  # slots per producer beyond those in flight: batches the trainer still holds

Position = tuple[int, Optional[list[int]], int]  # (epoch, base of the epoch's plan, step)


class DataError(RuntimeError):
    """The data cannot keep the run going (too many bad samples, a bucket with none readable)."""


class _ShardPool:
    """Open shard readers of one process, least recently used closed first; failures remembered."""

    def __init__(self, catalog: Any):
        self.catalog = catalog
        self.open: OrderedDict[int, ShardReader] = OrderedDict()
        self.failed: dict[int, str] = {}

    def reader(self, shard: int, notes: list[tuple[str, str]]) -> ShardReader:
        reader = self.open.get(shard)
        if reader is None:
            if shard in self.failed:
                raise SampleError("shard_error", self.failed[shard])
            try:
                reader = self.catalog.shards[shard].open()
            except ShardError as e:
                self.failed[shard] = str(e)
                notes.append(("shard_error", f"shard {self.catalog.shards[shard].path} is skipped: {e}"))
                raise SampleError("shard_error", str(e)) from e
            self.open[shard] = reader
            if len(self.open) > MAX_OPEN_SHARDS:
                self.open.popitem(last=False)[1].close()
        self.open.move_to_end(shard)
        return reader

    def read(self, shard: int, index: int, fields: frozenset[str], notes: list[tuple[str, str]]) -> dict[str, Any]:
        return self.reader(shard, notes).read(index, fields)

    def close(self) -> None:
        for reader in self.open.values():
            reader.close()
        self.open.clear()


def fill_batch(builder: BatchBuilder, pool: _ShardPool, addresses: Iterable[tuple[int, int]],
               top_up: Iterable[tuple[int, int]], counts: Counter[str], notes: list[tuple[str, str]]) -> None:
    """Decode the planned samples into `builder`, skipping (and counting) bad ones, then fill the
    rows left from `top_up` (the samples after the slice, counted as repeated)."""
    fields, paths = builder.spec.fields, pool.catalog.shards
    for s, i in addresses:
        raw: dict[str, Any] = {}
        try:
            raw = pool.read(s, i, fields, notes)
            builder.add(raw, s, i)
        except SampleError as e:
            counts[f"skipped/{e.reason}"] += 1
            if e.reason != "shard_error":  # the shard itself was reported once
                key = raw.get("key", f"#{i}")
                notes.append((e.reason, f"skipped sample {key} (index {i}) of {paths[s].path}: {e.reason}: {e}"))
    for s, i in top_up:
        if builder.full:
            break
        try:
            builder.add(pool.read(s, i, fields, notes), s, i)
            counts["repeated"] += 1
        except SampleError:
            pass  # counted in its own turn


class _Plans:
    """EpochPlan per (epoch, base), the current one cached; the walk from one position to the next."""

    def __init__(self, catalog: Catalog, cfg: DataConfig, world_size: int):
        self.catalog, self.cfg, self.world_size = catalog, cfg, world_size
        self._cache: tuple[Any, EpochPlan] | None = None

    def get(self, epoch: int, base: Optional[list[int]]) -> EpochPlan:
        key = (epoch, tuple(base) if base else None)
        if self._cache is None or self._cache[0] != key:
            cfg = self.cfg
            plan = EpochPlan(list(self.catalog.layouts), seed=cfg.seed, epoch=epoch, global_batch=cfg.batch_size * self.world_size,
                             shuffle=cfg.shuffle, drop_last=cfg.drop_last, window=cfg.shuffle_window, base=base)
            self._cache = (key, plan)
        return self._cache[1]

    def settle(self, epoch: int, base: Optional[list[int]], step: int) -> Position:
        """Roll a position that lies at/after the end of its epoch into the next epoch."""
        for _ in range(3):
            if step < self.get(epoch, base).steps:
                return epoch, base, step
            epoch, base, step = epoch + 1, None, 0
        raise DataError(f"{self.catalog.where}: an epoch holds no full global batch of {self.cfg.batch_size} × "
                        f"{self.world_size} ranks ({self.catalog.samples} samples); lower data.batch_size or set data.drop_last=false")

    def walk(self, epoch: int, base: Optional[list[int]], step: int) -> Iterator[Position]:
        while True:
            epoch, base, step = self.settle(epoch, base, step)
            yield epoch, base, step
            step += 1


class SlotStream(IterableDataset):
    """Runs in each worker (or in-process with 0 workers): produces every N-th planned batch.

    It yields messages, not batches: the tensors live in slots (`data/slots.py`) and the message
    names the slot, plus the keys, the counters and the warnings of that batch. A subclass says
    what the planned batches are (`jobs`, cheap to walk past) and how one is made (`produce`).
    """

    def __init__(self, catalog: Any, cfg: DataConfig, rank: int, world_size: int, free_ids: Optional[list[Any]] = None):
        self.catalog, self.cfg, self.rank, self.world_size = catalog, cfg, rank, world_size
        self.free_ids = free_ids
        self.layout = slot_layout(catalog.specs, cfg.batch_size)
        self.local_slots = LocalSlots(self.layout, SLOTS_EXTRA + 1)

    def jobs(self) -> Iterator[Any]:
        raise NotImplementedError

    def produce(self, job: Any, pool: _ShardPool, flat: Flat) -> dict[str, Any]:
        raise NotImplementedError

    def __iter__(self) -> Iterator[dict[str, Any]]:
        info = get_worker_info()
        wid, nw = (info.id, info.num_workers) if info else (0, 1)
        self.pool = pool = _ShardPool(self.catalog)
        worker_slots = None
        if info is not None:
            assert self.free_ids is not None
            worker_slots = WorkerSlots(self.layout, self.cfg.prefetch_factor + SLOTS_EXTRA, self.free_ids[wid])
        try:
            for t, job in enumerate(self.jobs()):
                if t % nw != wid:
                    continue
                if worker_slots is None:
                    sid, flat = self.local_slots.acquire()
                    send: Optional[Flat] = flat
                else:
                    sid, flat, new = worker_slots.acquire()
                    send = flat if new else None  # the trainer's process maps each slot once
                msg = self.produce(job, pool, flat)
                msg.update(worker=wid, slot=sid, flat=send)
                yield msg
        finally:
            pool.close()


class _BatchStream(SlotStream):
    """Batches of the epoch plans (DiTill shards with a manifest, or the digits)."""

    def __init__(self, catalog: Catalog, cfg: DataConfig, rank: int, world_size: int, start: Position,
                 free_ids: Optional[list[Any]] = None):
        super().__init__(catalog, cfg, rank, world_size, free_ids)
        self.start = start
        self.plans = _Plans(catalog, cfg, world_size)

    def jobs(self) -> Iterator[Position]:
        return self.plans.walk(*self.start)

    def produce(self, job: Position, pool: _ShardPool, flat: Flat) -> dict[str, Any]:
        epoch, base, step = job
        plan = self.plans.get(epoch, base)
        B = self.cfg.batch_size
        g, positions, wrapped = plan.slice(step, self.rank, B)
        seq, spec = plan.sequence(g), self.catalog.specs[g]
        builder = BatchBuilder(spec, B, batch_views(flat, spec, B), seed=self.cfg.seed, epoch=epoch)
        counts: Counter[str] = Counter(read=B, repeated=wrapped)
        notes: list[tuple[str, str]] = []
        shards, local = seq.addresses(positions)
        after = int(positions[-1]) + 1  # top up from the positions after this slice (same bucket, so same shapes)
        top_up = ((int(a[0]), int(b[0])) for a, b in (seq.addresses([after + k]) for k in range(seq.n)))
        fill_batch(builder, pool, zip(shards.tolist(), local.tolist()), top_up, counts, notes)
        if not builder.full:
            raise DataError(f"no readable sample left in bucket {plan.layouts[g].key or '(all)'} of {self.catalog.where}; "
                            "see the warnings above for the damaged shards")
        return {"epoch": epoch, "step": step, "group": g, "key": builder.keys, "caption": builder.captions,
                "counts": dict(counts), "notes": notes}


class LoaderBase:
    """What every loader shares: the trainer-side iteration over worker messages, the slots, the
    counters and warnings of bad samples. A subclass owns the position (`_make_stream`, `_accept`)."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, catalog: Any):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.cfg, self.rank, self.world_size, self.catalog = cfg, rank, world_size, catalog
        self._counts: Counter[str] = Counter()
        self._warned: Counter[str] = Counter()
        self._it: Optional[Iterator[dict[str, Any]]] = None
        self._stream: Optional[SlotStream] = None
        self._main_slots: Optional[MainSlots] = None

    def _make_stream(self, free_ids: Optional[list[Any]]) -> SlotStream:
        raise NotImplementedError

    def _accept(self, msg: dict[str, Any]) -> None:
        """Check that `msg` is the batch expected next (never guess) and move the position past it."""
        raise NotImplementedError

    # -- iteration ---------------------------------------------------------------------------------
    def __iter__(self) -> "LoaderBase":
        return self

    def __next__(self) -> dict[str, Any]:
        if self._it is None:
            self._start()
        assert self._it is not None and self._stream is not None
        if self._main_slots is not None:
            self._main_slots.release_free()  # slots of batches the trainer has let go of
        msg = next(self._it)
        self._accept(msg)
        if self._main_slots is None:
            flat = msg["flat"]
            self._stream.local_slots.hand_out(msg["slot"])
        else:
            flat = self._main_slots.receive(msg["worker"], msg["slot"], msg["flat"])
        spec = self.catalog.specs[msg["group"]]
        batch: dict[str, Any] = {**batch_views(flat, spec, self.cfg.batch_size), "key": msg["key"]}
        if spec.cond == "caption":
            batch["caption"] = msg["caption"]
        self._counts.update(msg["counts"])
        self._counts["samples"] += self.cfg.batch_size
        self._counts["batches"] += 1
        for reason, note in msg["notes"]:
            self._warn(reason, note)
        self._check_skipped()
        return batch

    def _start(self) -> None:
        nw = self.cfg.num_workers
        free_ids = [multiprocessing.get_context().Queue() for _ in range(nw)] if nw else None
        self._stream = self._make_stream(free_ids)
        if nw == 0:
            self._main_slots = None
            self._it = iter(self._stream)
        else:
            self._main_slots = MainSlots(free_ids or [])
            self._it = iter(DataLoader(self._stream, batch_size=None, num_workers=nw,
                                       prefetch_factor=self.cfg.prefetch_factor, persistent_workers=False))

    def close(self) -> None:
        """Stop the worker processes (iteration restarts them from the current position)."""
        if self._stream is not None:
            for q in self._stream.free_ids or []:
                q.cancel_join_thread()  # never block interpreter exit on ids nobody will read
        self._it = self._stream = self._main_slots = None

    def _warn(self, reason: str, note: str) -> None:
        self._warned[reason] += 1
        if self._warned[reason] <= WARNINGS_PER_REASON:
            log.warning("rank %d: %s", self.rank, note)
        if self._warned[reason] == WARNINGS_PER_REASON:
            log.warning("rank %d: further '%s' warnings are not printed; data/skipped/* keep counting", self.rank, reason)

    def _check_skipped(self) -> None:
        read = self._counts["read"]
        skipped = sum(v for k, v in self._counts.items() if k.startswith("skipped/"))
        if read >= self.cfg.skip_check_after and skipped > self.cfg.max_skipped_fraction * read:
            by_reason = ", ".join(f"{k[8:]}: {v}" for k, v in sorted(self._counts.items()) if k.startswith("skipped/") and v)
            raise DataError(f"rank {self.rank}: {skipped} of {read} samples read ({skipped / read:.2%}) were skipped ({by_reason}), "
                            f"above data.max_skipped_fraction={self.cfg.max_skipped_fraction} for {self.catalog.where}. "
                            "The warnings above name the keys and shards: repair or remove those shards, "
                            "or raise data.max_skipped_fraction if this loss is acceptable")

    def _skip_stats(self) -> dict[str, int | float]:
        read = self._counts["read"]
        skipped = {f"data/skipped/{r}": self._counts[f"skipped/{r}"] for r in REASONS}
        return {"data/samples": self._counts["samples"], "data/batches": self._counts["batches"],
                "data/read": read, "data/repeated": self._counts["repeated"], **skipped,
                "data/skipped_fraction": sum(skipped.values()) / read if read else 0.0}


class Loader(LoaderBase):
    """Iterate for batches (forever); `state_dict()` after a batch, `load_state_dict()` to resume."""

    def __init__(self, cfg: DataConfig, rank: int, world_size: int, catalog: Catalog):
        super().__init__(cfg, rank, world_size, catalog)
        self._plans = _Plans(catalog, cfg, world_size)
        self._pos: Position = self._plans.settle(0, None, 0)
        G = cfg.batch_size * world_size
        for layout in catalog.layouts:
            if cfg.drop_last and layout.samples < G:
                log.warning("bucket %s of %s holds %d samples, fewer than one global batch (%d): with data.drop_last=true "
                            "it is never used", layout.key or "(all)", catalog.where, layout.samples, G)

    def _make_stream(self, free_ids: Optional[list[Any]]) -> SlotStream:
        return _BatchStream(self.catalog, self.cfg, self.rank, self.world_size, self._pos, free_ids)

    def _accept(self, msg: dict[str, Any]) -> None:
        epoch, base, step = self._pos
        if (msg["epoch"], msg["step"]) != (epoch, step):  # the round-robin contract is broken: never guess
            raise DataError(f"internal: got batch (epoch {msg['epoch']}, step {msg['step']}), expected ({epoch}, {step})")
        self._pos = self._plans.settle(epoch, base, step + 1)

    # -- state -------------------------------------------------------------------------------------
    @property
    def steps_per_epoch(self) -> int:
        """Batches per rank in a full epoch (the current one may be shorter after an elastic resume)."""
        return self._plans.get(self._pos[0] + 1, None).steps

    def stats(self) -> dict[str, int | float]:
        return {**self._skip_stats(), "data/epoch": self._pos[0]}

    def state_dict(self) -> dict[str, Any]:
        epoch, base, step = self._pos
        return {"version": STATE_VERSION, "epoch": epoch, "step": step,
                "base": list(base) if base else [0] * len(self.catalog.layouts),
                "global_batch": self.cfg.batch_size * self.world_size, "world_size": self.world_size,
                "drop_last": self.cfg.drop_last, "seed": self.cfg.seed, "shuffle": self.cfg.shuffle,
                "shuffle_window": self.cfg.shuffle_window,
                "groups": [[g.key, g.samples] for g in self.catalog.layouts], "counters": dict(self._counts)}

    def load_state_dict(self, sd: dict[str, Any]) -> None:
        """Resume at the saved position; with another global batch (world size), re-plan the rest of its epoch."""
        if sd.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {sd.get('version')!r} is not {STATE_VERSION}; it was saved by another DiTill version")
        groups = [[g.key, g.samples] for g in self.catalog.layouts]
        if [list(g) for g in sd["groups"]] != groups:
            raise ValueError(f"the loader state was saved for a dataset with groups (bucket, samples) {sd['groups']}, but "
                             f"{self.catalog.where} has {groups}; resume on the same shards and data.buckets setting, "
                             "or start the data from scratch by not loading its state")
        for key in ("seed", "shuffle", "shuffle_window"):
            if sd[key] != getattr(self.cfg, key):
                raise ValueError(f"data.{key} was {sd[key]!r} when the loader state was saved and is {getattr(self.cfg, key)!r} now; "
                                 f"set data.{key}={sd[key]!r} to resume (the epoch order depends on it)")
        epoch, step, base = int(sd["epoch"]), int(sd["step"]), [int(b) for b in sd["base"]]
        same = sd["global_batch"] == self.cfg.batch_size * self.world_size and sd["drop_last"] == self.cfg.drop_last
        if not same:  # what all old ranks consumed of this epoch becomes the base of a new plan
            old = EpochPlan(list(self.catalog.layouts), seed=self.cfg.seed, epoch=epoch, global_batch=int(sd["global_batch"]),
                            shuffle=self.cfg.shuffle, drop_last=bool(sd["drop_last"]), window=self.cfg.shuffle_window, base=base)
            base, step = old.consumed(step), 0
        self._pos = self._plans.settle(epoch, base if any(base) else None, step)
        self._counts = Counter({k: int(v) for k, v in sd.get("counters", {}).items()})
        self.close()


def build_loader(cfg: DataConfig, rank: int, world_size: int) -> LoaderBase:
    """Validate `cfg`, index the shards, and return this rank's loader (workers start on first batch)."""
    cfg.validate(world_size)
    if cfg.layout == "plain":
        from data.stream_loader import StreamLoader
        from data.thirdparty import build_stream_catalog

        return StreamLoader(cfg, rank, world_size, build_stream_catalog(cfg))
    return Loader(cfg, rank, world_size, build_catalog(cfg))
