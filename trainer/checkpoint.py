"""Sharded, asynchronous, atomic checkpoints.

Layout under `<run>/checkpoints/`:
  step_00001000/         complete: the engine's state (DCP shards + `.metadata`, or DeepSpeed's files),
                         `extra/rank*.json`, `sums/rank*.json`, `config.yaml`, and `manifest.json`, last
  .tmp-step_00002000/    a save in flight (or killed mid-way: removed, with a warning, at start)
  .trash-step_00000500/  a checkpoint retention is deleting (renamed first, so it vanishes atomically)
  discarded/             checkpoints set aside when a run resumes: invalid ones, and newer ones that
                         resuming from an older step supersedes (kept for inspection, never used)
  latest                 the name of the newest complete checkpoint: a hint for people and tools;
                         resume scans the directories and verifies instead of trusting it

A save: every rank writes its per-rank extras (RNG states, data position) and its share of the
engine state into the temporary directory — with DCP asynchronously, on a process group of its own
so it never collides with training collectives — then fsyncs and checksums the files it wrote.
Rank 0 waits for every rank's sums, writes the manifest (step, world size, format, config hash,
teacher identity, every file's size and sha256), renames the directory into place, moves `latest`,
and only then deletes the checkpoints retention no longer keeps. No rank gathers the full state.

A kill at any point leaves either the previous checkpoints untouched plus a `.tmp-` directory, or a
complete new checkpoint (perhaps with `latest` not yet moved, which resume does not need).
"""
from __future__ import annotations

import difflib
import json
import random
import shutil
import threading
import time
import warnings
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Callable, Protocol

import numpy as np
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from trainer.distributed import DistEnv, any_rank
from trainer.manifest import (
    MANIFEST, SUMS_DIR, file_entries, fsync_dir, read_manifest, verify, write_json_atomic, write_text_atomic,
)

PREFIX = "step_"
TMP = ".tmp-"
TRASH = ".trash-"
DISCARDED = "discarded"
CONFIG = "config.yaml"


class CheckpointError(RuntimeError):
    """A checkpoint that was asked for cannot be used (missing, incomplete, corrupt or incompatible)."""


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


# --- how an engine's state goes to disk ------------------------------------------------------------
class CheckpointState(Protocol):
    """What an engine hands the Checkpointer: its state, and how that state is written and read."""

    format: str  # recorded in the manifest; a checkpoint is only loaded by a state of the same format
    can_async: bool

    def write(self, path: Path, pg, asynchronous: bool) -> Future | None: ...

    def read(self, path: Path, pg, saved_world_size: int) -> None: ...

    def files(self, path: Path, rank: int, world_size: int) -> list[Path]:
        """The files of the engine state this rank checksums (together, all ranks cover them all)."""
        ...


class DCPState:
    """State dicts saved with `torch.distributed.checkpoint`: sharded DTensors stay sharded on disk
    and are resharded on load, so a checkpoint written by N ranks loads on M."""

    format = "dcp"
    can_async = True

    def __init__(self, get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]) -> None:
        self.app = {"engine": stateful(get, put)}

    def write(self, path: Path, pg, asynchronous: bool) -> Future | None:
        if asynchronous:
            return dcp.async_save(self.app, checkpoint_id=str(path), process_group=pg)
        dcp.save(self.app, checkpoint_id=str(path), process_group=pg)
        return None

    def read(self, path: Path, pg, saved_world_size: int) -> None:
        dcp.load(self.app, checkpoint_id=str(path), process_group=pg)

    def files(self, path: Path, rank: int, world_size: int) -> list[Path]:
        mine = sorted(path.glob(f"__{rank}_*.distcp"))
        return mine + ([path / ".metadata"] if rank == 0 else [])


def stateful(get: Callable[[], dict[str, Any]], put: Callable[[dict[str, Any]], None]):
    """Adapter so DCP calls the engine's state_dict/load_state_dict at save/load time."""
    from torch.distributed.checkpoint.stateful import Stateful

    class _S(Stateful):
        def state_dict(self) -> dict[str, Any]:
            return get()

        def load_state_dict(self, sd: dict[str, Any]) -> None:
            put(sd)

    return _S()


# --- identity checks on resume ---------------------------------------------------------------------
def check_teacher(manifest: dict[str, Any], teacher_id: dict[str, Any] | None, allow_changed: bool, path: Path) -> None:
    """The teacher is not saved, its identity is: resuming with another one is an error unless allowed."""
    saved = manifest.get("teacher") if isinstance(manifest.get("teacher"), dict) else None
    now = teacher_id or None
    if not saved and not now:
        return
    same = bool(saved and now and saved.get("sha256") == now.get("sha256"))
    if same:
        return
    was = f"{saved.get('path')} (sha256 {saved.get('sha256', '?')[:12]})" if saved else "no teacher"
    is_ = f"{now.get('path')} (sha256 {now.get('sha256', '?')[:12]})" if now else "no teacher"
    if not allow_changed:
        raise CheckpointError(
            f"the teacher changed since {path} was written (was {was}, now {is_}); resume with the same teacher, "
            "or set teacher.allow_changed=true to continue distilling from the new one"
        )
    warnings.warn(f"teacher changed since {path} (was {was}, now {is_}); continuing because teacher.allow_changed=true")


def config_changes(old_yaml: str, new_yaml: str, limit: int = 20) -> list[str]:
    """The lines that differ between two saved configs (unified diff, without the context)."""
    diff = difflib.unified_diff(old_yaml.splitlines(), new_yaml.splitlines(), lineterm="", n=0)
    lines = [d for d in diff if d[:1] in "+-" and not d.startswith(("+++", "---"))]
    return lines[:limit]


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
        config_yaml: str | None = None,
        sums_timeout_s: float = 600.0,
        before_commit: Callable[[], None] | None = None,
    ) -> None:
        self.root = Path(run_dir) / "checkpoints"
        self.env = env
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.async_save = async_save
        self.identity = identity or {}
        self.config_yaml = config_yaml
        self.sums_timeout_s = sums_timeout_s
        self.before_commit = before_commit
        self.resumed_step: int | None = None
        self._pg = dist.new_group(backend="gloo") if dist.is_initialized() else None
        self._thread: threading.Thread | None = None
        self._error: BaseException | None = None
        self.last_blocking_s = 0.0
        if env.is_main:
            self.root.mkdir(parents=True, exist_ok=True)
            self._remove_leftovers()
        self._barrier()

    def _barrier(self) -> None:
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.barrier()

    # --- discovery --------------------------------------------------------------------------------
    def _remove_leftovers(self) -> None:
        for tmp in sorted(self.root.glob(f"{TMP}*")):
            warnings.warn(f"removing incomplete checkpoint {tmp} (a save interrupted by a crash or kill)")
            shutil.rmtree(tmp, ignore_errors=True)
        for trash in self.root.glob(f"{TRASH}*"):
            shutil.rmtree(trash, ignore_errors=True)
        (self.root / "latest.tmp").unlink(missing_ok=True)

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
        """The checkpoint to resume from. `auto`: the newest valid one (invalid newer ones are reported
        and set aside), None when there is none, an error when there are only invalid ones; a step
        number: exactly that one, or an error (newer ones are superseded and set aside); `never`: None."""
        if request == "never":
            return None
        chosen: Path | None = None
        invalid: list[tuple[int, str]] = []
        if request != "auto":
            chosen = self.root / step_dir_name(int(request))
            ok, reason = self._verify(chosen)
            if not ok:
                have = self.complete_steps()
                raise CheckpointError(
                    f"checkpoint.resume={request} cannot be used: {reason}. Complete checkpoints here: {have or 'none'}"
                )
        else:
            for step in sorted(self.all_steps(), reverse=True):
                path = self.root / step_dir_name(step)
                ok, reason = self._verify(path)
                if ok:
                    chosen = path
                    break
                invalid.append((step, reason))
                if self.env.is_main:
                    warnings.warn(f"skipping invalid checkpoint: {reason}; falling back to an older one")
            if chosen is None and invalid:  # never start over silently when there was progress to resume
                raise CheckpointError(
                    f"no valid checkpoint in {self.root}: " + "; ".join(r for _, r in invalid)
                    + ". Repair or remove them (or use a new run_dir) to start over"
                )
        resumed = parse_step(chosen) if chosen is not None else -1
        if self.env.is_main:
            bad = {s for s, _ in invalid}
            for step in self.all_steps():
                if step > resumed:
                    why = "invalid" if step in bad else "superseded"
                    if why == "superseded":
                        warnings.warn(f"checkpoint {step_dir_name(step)} is newer than the one resumed from "
                                      f"({chosen.name if chosen else 'none'}): setting it aside in {self.root / DISCARDED}")
                    self._set_aside(self.root / step_dir_name(step), why)
            if chosen is not None:
                write_text_atomic(self.root / "latest", chosen.name)  # repairs a `latest` a crash left behind
            elif (self.root / "latest").exists():
                (self.root / "latest").unlink()
        self._barrier()
        self.resumed_step = resumed if chosen is not None else None
        return chosen

    def _set_aside(self, path: Path, why: str) -> None:
        dest_dir = self.root / DISCARDED
        dest_dir.mkdir(exist_ok=True)
        dest = dest_dir / f"{path.name}.{why}"
        if dest.exists():
            dest = dest_dir / f"{path.name}.{why}.{int(time.time() * 1000)}"
        path.rename(dest)
        fsync_dir(self.root)

    # --- save -------------------------------------------------------------------------------------
    def in_flight(self) -> bool:
        """An asynchronous save is still being written or finalised in the background."""
        return self._thread is not None and self._thread.is_alive()

    def wait(self) -> None:
        """Block until the save in flight is complete and finalised; re-raise its failure."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        if self._error is not None:
            err, self._error = self._error, None
            raise CheckpointError(f"checkpoint save failed: {err!r}") from err

    def save(self, step: int, state: CheckpointState, extra: dict[str, Any], blocking: bool = False) -> None:
        """Save the engine `state` and this rank's `extra` at `step`.

        Returns once the state is staged (async) or written and finalised (blocking);
        `last_blocking_s` records how long the training loop was held.
        """
        t0 = time.perf_counter()
        self.wait()
        if step == self.resumed_step:  # this exact state is on disk already
            self.last_blocking_s = time.perf_counter() - t0
            return
        final = self.root / step_dir_name(step)
        tmp = self.root / f"{TMP}{final.name}"
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            (tmp / "extra").mkdir(parents=True)
            (tmp / SUMS_DIR).mkdir()
            if self.config_yaml is not None:
                (tmp / CONFIG).write_text(self.config_yaml)
        self._barrier()
        write_json_atomic(tmp / "extra" / f"rank{self.env.rank:05d}.json", extra)
        asynchronous = self.async_save and not blocking and state.can_async
        fut = state.write(tmp, self._pg, asynchronous)
        if asynchronous:
            self._thread = threading.Thread(target=self._complete, args=(state, fut, tmp, final, step), daemon=True)
            self._thread.start()
        else:
            self._complete(state, fut, tmp, final, step)
            self.wait()
        self.last_blocking_s = time.perf_counter() - t0

    def _complete(self, state: CheckpointState, fut: Future | None, tmp: Path, final: Path, step: int) -> None:
        try:
            if fut is not None:
                fut.result()
            if self.before_commit is not None:
                self.before_commit()
            r = self.env.rank
            mine = state.files(tmp, r, self.env.world_size) + [tmp / "extra" / f"rank{r:05d}.json"]
            if self.env.is_main and (tmp / CONFIG).exists():
                mine.append(tmp / CONFIG)
            write_json_atomic(tmp / SUMS_DIR / f"rank{r:05d}.json", file_entries(tmp, mine))
            if self.env.is_main:
                self._finalise(state, tmp, final, step)
        except BaseException as e:  # surfaced on the training thread at the next wait()
            self._error = e

    def _finalise(self, state: CheckpointState, tmp: Path, final: Path, step: int) -> None:
        sums_dir = tmp / SUMS_DIR
        deadline = time.monotonic() + self.sums_timeout_s
        while len(list(sums_dir.glob("rank*.json"))) < self.env.world_size:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks did not finish writing {tmp} within {self.sums_timeout_s}s")
            time.sleep(0.05)
        files: dict[str, Any] = {}
        for f in sorted(sums_dir.glob("rank*.json")):
            files.update(json.loads(f.read_text()))
        for sub in {p.parent for p in tmp.rglob("*") if p.is_file()}:
            fsync_dir(sub)
        manifest = {
            "step": step, "world_size": self.env.world_size, "format": state.format,
            "files": files, "created": time.time(), **self.identity,
        }
        write_json_atomic(tmp / MANIFEST, manifest)
        if final.exists():  # only a leftover of another trajectory can be here
            self._set_aside(final, "superseded")
        tmp.rename(final)
        fsync_dir(self.root)
        write_text_atomic(self.root / "latest", final.name)
        self._retain(step)

    def retained(self, steps: list[int], newest: int) -> set[int]:
        """Retention: the newest `keep_last` (all when 0), every `keep_every`-th step, and `newest`."""
        keep = set(steps[-self.keep_last:]) if self.keep_last > 0 else set(steps)
        keep.add(newest)
        if self.keep_every > 0:
            keep.update(s for s in steps if s % self.keep_every == 0)
        return keep

    def _retain(self, newest: int) -> None:
        steps = self.complete_steps()
        keep = self.retained(steps, newest)
        for s in steps:
            if s not in keep:
                path = self.root / step_dir_name(s)
                trash = self.root / f"{TRASH}{path.name}"
                path.rename(trash)  # gone from view atomically; a kill mid-delete leaves only trash
                shutil.rmtree(trash, ignore_errors=True)
        fsync_dir(self.root)

    # --- load -------------------------------------------------------------------------------------
    def load(self, path: Path, state: CheckpointState) -> dict[str, Any]:
        """Load `state` in place from `path` (resharding to this world size where the format can) and
        return this rank's extras, or `{"resharded_from": [every old rank's extras]}` when the world
        size changed."""
        manifest = read_manifest(path) or {}
        fmt = manifest.get("format", "dcp")
        if fmt != state.format:
            raise CheckpointError(
                f"{path} holds a {fmt!r} checkpoint but this engine reads {state.format!r}; resume with the engine that "
                f"wrote it, or export it (python -m launch.export) and start from it with student.init=path"
            )
        old_world = int(manifest.get("world_size", self.env.world_size))
        state.read(path, self._pg, old_world)
        if old_world == self.env.world_size:
            return json.loads((path / "extra" / f"rank{self.env.rank:05d}.json").read_text())
        return {"resharded_from": [json.loads((path / "extra" / f"rank{r:05d}.json").read_text()) for r in range(old_world)]}

    def manifest(self, path: Path) -> dict[str, Any]:
        return read_manifest(path) or {}

    def saved_config(self, path: Path) -> str | None:
        p = path / CONFIG
        return p.read_text() if p.exists() else None
