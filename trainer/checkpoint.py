"""Sharded, asynchronous, atomic checkpoints with `torch.distributed.checkpoint`.

Layout under `<run>/checkpoints/`:
  step_00001000/        complete: DCP shards + `.metadata`, `extra/rank*.json`, `manifest.json`
  .tmp-step_00002000/   a save in flight (or killed mid-way: removed, with a warning, at start)
  latest                the name of the newest complete checkpoint, replaced atomically

A save: every rank writes its per-rank extras (RNG states, data position) and its DCP shards into
the temporary directory (asynchronously, on a process group of its own so it never collides with
training collectives), then checksums the files it wrote. Rank 0 waits for every rank's sums,
writes the manifest, renames the directory into place, moves `latest`, and only then deletes
checkpoints that retention no longer keeps. No rank ever gathers the full state.
"""
from __future__ import annotations

import json
import random
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.distributed import DistEnv, any_rank
from trainer.manifest import MANIFEST, SUMS_DIR, file_entries, fsync_dir, read_manifest, verify, write_json_atomic

PREFIX = "step_"
TMP = ".tmp-"


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for cannot be used (missing, incomplete or corrupt)."""


def step_dir_name(step: int) -> str:
    return f"{PREFIX}{step:08d}"


def parse_step(path: Path) -> int | None:
    name = path.name
    if name.startswith(PREFIX) and name[len(PREFIX):].isdigit():
        return int(name[len(PREFIX):])
    return None


# --- per-rank extras: RNG states and data position, as JSON (nothing unpickled on load) ----------
def rng_state() -> dict[str, Any]:
    state = {
        "torch": torch.get_rng_state().tolist(),
        "python": _jsonable(random.getstate()),
        "numpy": _jsonable(np.random.get_state()),
    }
    if torch.cuda.is_available():
        state["cuda"] = [s.tolist() for s in torch.cuda.get_rng_state_all()]
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(torch.tensor(state["torch"], dtype=torch.uint8))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    npy = state["numpy"]
    np.random.set_state((npy[0], np.array(npy[1], dtype=np.uint32), npy[2], npy[3], npy[4]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([torch.tensor(s, dtype=torch.uint8) for s in state["cuda"]])


def _jsonable(x: Any) -> Any:
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x


class Checkpointer:
    def __init__(
        self,
        run_dir: Path,
        env: DistEnv,
        *,
        keep_last: int = 2,
        keep_every: int = 0,
        async_save: bool = True,
        identity: dict[str, Any] | None = None,
        sums_timeout_s: float = 600.0,
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.env = env
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.identity = identity or {}
        self.sums_timeout_s = sums_timeout_s
        self._pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_blocking_s = 0.0
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_stale_tmp()
        if dist.is_initialized():
            dist.barrier()

    # --- discovery --------------------------------------------------------------------------------
    def _remove_stale_tmp(self) -> None:
        for tmp in self.root.glob(f"{TMP}*"):
            warnings.warn(f"removing incomplete checkpoint {tmp} (a save interrupted by a crash or kill)")
            shutil.rmtree(tmp, ignore_errors=True)

    def complete_steps(self) -> list[int]:
        steps = [parse_step(p) for p in self.root.glob(f"{PREFIX}*") if (p / MANIFEST).exists()]
        return sorted(s for s in steps if s is not None)

    def all_steps(self) -> list[int]:
        return sorted(s for s in (parse_step(p) for p in self.root.glob(f"{PREFIX}*")) if s is not None)

    def _verify(self, path: Path) -> tuple[bool, str]:
        """Every rank checks a share of the files; the verdict is agreed across ranks."""
        verdict = verify(path, self.env.rank, self.env.world_size) if path.exists() else None
        bad_local = verdict is None or not verdict.ok
        bad = any_rank(bad_local, self.env.device)
        reason = "" if verdict is None or verdict.ok else verdict.reason
        if verdict is None:
            reason = f"{path} does not exist"
        return (not bad), reason or f"{path}: failed verification on another rank"

    def find_resume(self, request: str) -> Path | None:
        """The checkpoint to resume from. `auto`: newest valid (warning about invalid newer ones);
        a step number: exactly that one, or an error; `never`: None."""
        if request == "never":
            return None
        if request != "auto":
            path = self.root / step_dir_name(int(request))
            ok, reason = self._verify(path)
            if not ok:
                have = self.complete_steps()
                raise CheckpointError(
                    f"checkpoint.resume={request} cannot be used: {reason}. Complete checkpoints here: {have or 'none'}"
                )
            return path
        for step in sorted(self.all_steps(), reverse=True):
            path = self.root / step_dir_name(step)
            ok, reason = self._verify(path)
            if ok:
                return path
            if self.env.is_main:
                warnings.warn(f"skipping invalid checkpoint: {reason}; falling back to an older one")
        return None

    # --- save -------------------------------------------------------------------------------------
    def wait(self) -> None:
        """Block until the save in flight is complete and finalised; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint save failed: {err!r}") from err

    def save(self, step: int, state: dict[str, Any], extra: dict[str, Any], blocking: bool = False) -> None:
        """Save `state` (DCP: sharded tensors + replicated values) and this rank's `extra` at `step`.

        Returns once the state is staged (async) or written (blocking); `last_blocking_s` records how
        long the training loop was held.
        """
        t0 = time.perf_counter()
        self.wait()
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP}{final.name}"
        if (final / MANIFEST).exists():  # this exact state is already saved (e.g. resumed at `step`)
            self.last_blocking_s = time.perf_counter() - t0
            return
        if self.env.is_main:
            shutil.rmtree(final, ignore_errors=True)  # a leftover without a manifest is not a checkpoint
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "extra").mkdir(parents=True)
            (tmp / SUMS_DIR).mkdir()
        if dist.is_initialized():
            dist.barrier()
        extra_path = tmp / "extra" / f"rank{self.env.rank:05d}.json"
        write_json_atomic(extra_path, extra)
        if self.async_save and not blocking:
            fut = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self._thread = threading.Thread(target=self._complete, args=(fut, tmp, final, step), daemon=True)
            self._thread.start()
        else:
            dcp.save(state, checkpoint_id=str(tmp), process_group=self._pg)
            self._complete(None, tmp, final, step)
            if self._error is not None:
                self.wait()
        self.last_blocking_s = time.perf_counter() - t0

    def _complete(self, fut: Future | None, tmp: Path, final: Path, step: int) -> None:
        try:
            if fut is not None:
                fut.result()
            r = self.env.rank
            mine = sorted(tmp.glob(f"__{r}_*.distcp")) + [tmp / "extra" / f"rank{r:05d}.json"]
            if self.env.is_main:
                mine.append(tmp / ".metadata")
            write_json_atomic(tmp / SUMS_DIR / f"rank{r:05d}.json", file_entries(tmp, mine))
            if self.env.is_main:
                self._finalise(tmp, final, step)
        except BaseException as e:  # surfaced on the training thread at the next wait()
            self._error = e

    def _finalise(self, tmp: Path, final: Path, step: int) -> None:
        sums_dir = tmp / SUMS_DIR
        deadline = time.monotonic() + self.sums_timeout_s
        while len(list(sums_dir.glob("rank*.json"))) < self.env.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish writing {tmp} within {self.sums_timeout_s}s")
            time.sleep(0.05)
        files: dict[str, Any] = {}
        for f in sorted(sums_dir.glob("rank*.json")):
            files.update(json.loads(f.read_text()))
        manifest = {"step": step, "world_size": self.env.world_size, "files": files, "created": time.time(), **self.identity}
        write_json_atomic(tmp / MANIFEST, manifest)
        fsync_dir(tmp)
        tmp.rename(final)
        fsync_dir(self.root)
        (self.root / "latest.tmp").write_text(final.name)
        (self.root / "latest.tmp").replace(self.root / "latest")
        fsync_dir(self.root)
        self._retain(step)

    def _retain(self, newest: int) -> None:
        steps = self.complete_steps()
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set()
        keep.add(newest)
        if self.keep_every > 0:
            keep.update(s for s in steps if s % self.keep_every == 0)
        for s in steps:
            if s not in keep:
                shutil.rmtree(self.root / step_dir_name(s), ignore_errors=True)

    # --- load -------------------------------------------------------------------------------------
    def load(self, path: Path, state: dict[str, Any]) -> dict[str, Any]:
        """Load `state` in place from `path` (resharding to this world size) and return this rank's
        extras, or the list of all ranks' extras when the world size changed."""
        dcp.load(state, checkpoint_id=str(path), process_group=self._pg)
        manifest = read_manifest(path) or {}
        old_world = int(manifest.get("world_size", self.env.world_size))
        if old_world == self.env.world_size:
            return json.loads((path / "extra" / f"rank{self.env.rank:05d}.json").read_text())
        return {"resharded_from": [json.loads((path / "extra" / f"rank{r:05d}.json").read_text()) for r in range(old_world)]}

    def manifest(self, path: Path) -> dict[str, Any]:
        return read_manifest(path) or {}


def stateful(get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]):
    """Adapter so DCP calls the engine's state_dict/load_state_dict at save/load time."""
    from torch.distributed.checkpoint.stateful import Stateful

    class _S(Stateful):
        def state_dict(self) -> dict[str, Any]:
            return get()

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            put(sd)

    return _S()
