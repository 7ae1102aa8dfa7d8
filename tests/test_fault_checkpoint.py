"""The Checkpointer on its own (one process, in-process process group): atomic saves, retention,
corrupt or incomplete checkpoints detected and skipped with a warning, explicit steps enforced."""
from __future__ import annotations

import json
import threading
import warnings
from pathlib import Path

import pytest
import torch

from trainer.checkpoint import CheckpointError, Checkpointer, DCPState, step_dir_name
from trainer.distributed import destroy_distributed, init_distributed
from trainer.manifest import MANIFEST, read_manifest


@pytest.fixture
def env():
    e = init_distributed(60)
    yield e
    destroy_distributed()


class Model:
    """A stand-in engine state: a few tensors whose values encode the step."""

    def __init__(self) -> None:
        self.t = {"w": torch.zeros(64, 32), "b": torch.zeros(7)}

    def set(self, step: int) -> None:
        for v in self.t.values():
            v.fill_(float(step))

    def state(self) -> DCPState:
        return DCPState(lambda: {k: v for k, v in self.t.items()}, lambda sd: [self.t[k].copy_(v) for k, v in sd.items()])


def _save_steps(ckpt: Checkpointer, model: Model, steps, blocking: bool = False) -> None:
    for s in steps:
        model.set(s)
        ckpt.save(s, model.state(), {"train": {"step": s}}, blocking=blocking)
    ckpt.wait()


def _resume(tmp_path: Path, env, request: str = "auto") -> tuple[Path | None, Model, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ckpt = Checkpointer(tmp_path, env)
        path = ckpt.find_resume(request)
        model = Model()
        if path is not None:
            extra = ckpt.load(path, model.state())
            assert extra["train"]["step"] == int(model.t["w"][0, 0])
    return path, model, [str(w.message) for w in caught]


def test_async_saves_are_complete_verified_and_retained(tmp_path, env):
    ckpt = Checkpointer(tmp_path, env, keep_last=2, keep_every=4, identity={"config_hash": "abc"}, config_yaml="x: 1\n")
    _save_steps(ckpt, Model(), range(1, 10))
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in root.iterdir()) == ["latest", *(step_dir_name(s) for s in (4, 8, 9))]
    assert (root / "latest").read_text() == step_dir_name(9)
    m = read_manifest(root / step_dir_name(9))
    assert m["step"] == 9 and m["world_size"] == 1 and m["format"] == "dcp" and m["config_hash"] == "abc"
    assert set(m["files"]) == {".metadata", "__0_0.distcp", "extra/rank00000.json", "config.yaml"}
    assert all(e["size"] > 0 and len(e["sha256"]) == 64 for e in m["files"].values())
    path, model, _ = _resume(tmp_path, env)
    assert path.name == step_dir_name(9) and float(model.t["b"][0]) == 9.0


def test_an_async_save_returns_before_it_commits_and_keeps_the_values_it_was_given(tmp_path, env):
    gate = threading.Event()
    ckpt = Checkpointer(tmp_path, env, before_commit=lambda: gate.wait(30))
    model = Model()
    model.set(2)
    ckpt.save(2, model.state(), {"train": {"step": 2}})
    assert ckpt.in_flight() and not (tmp_path / "checkpoints" / step_dir_name(2)).exists()
    model.set(3)  # the loop trains on while the save is written in the background
    gate.set()
    ckpt.wait()
    path, restored, _ = _resume(tmp_path, env)
    assert path.name == step_dir_name(2) and float(restored.t["w"][0, 0]) == 2.0


def _truncate_shard(p: Path) -> None:
    shard = next(p.glob("*.distcp"))
    shard.write_bytes(shard.read_bytes()[:-100])


def _remove_manifest(p: Path) -> None:
    (p / MANIFEST).unlink()


def _flip_a_byte(p: Path) -> None:
    shard = next(p.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))


@pytest.mark.parametrize("corrupt", [_truncate_shard, _remove_manifest, _flip_a_byte], ids=["truncated", "no-manifest", "checksum"])
def test_corrupt_newest_checkpoint_falls_back_with_a_warning(tmp_path, env, corrupt):
    _save_steps(Checkpointer(tmp_path, env, keep_last=0), Model(), [2, 4, 6])
    corrupt(tmp_path / "checkpoints" / step_dir_name(6))
    path, model, messages = _resume(tmp_path, env)
    assert path.name == step_dir_name(4) and float(model.t["w"][0, 0]) == 4.0
    assert any("skipping invalid checkpoint" in m and step_dir_name(6) in m for m in messages), messages
    root = tmp_path / "checkpoints"
    assert (root / "discarded" / f"{step_dir_name(6)}.invalid").is_dir()  # kept for inspection, never used again
    assert (root / "latest").read_text() == step_dir_name(4)


def test_only_invalid_checkpoints_is_an_error_not_a_fresh_start(tmp_path, env):
    _save_steps(Checkpointer(tmp_path, env, keep_last=0), Model(), [2])
    _flip_a_byte(tmp_path / "checkpoints" / step_dir_name(2))
    with pytest.warns(UserWarning, match="skipping invalid checkpoint"), pytest.raises(CheckpointError, match="no valid checkpoint"):
        Checkpointer(tmp_path, env).find_resume("auto")
    assert (tmp_path / "checkpoints" / step_dir_name(2)).is_dir()  # left in place for a person to look at


def test_explicit_step_that_is_missing_or_invalid_is_an_error(tmp_path, env):
    _save_steps(Checkpointer(tmp_path, env, keep_last=0), Model(), [2, 4])
    with pytest.raises(CheckpointError, match=r"checkpoint.resume=3 cannot be used.*\[2, 4\]"):
        Checkpointer(tmp_path, env).find_resume("3")
    _flip_a_byte(tmp_path / "checkpoints" / step_dir_name(4))
    with pytest.raises(CheckpointError, match="fails its checksum"):
        Checkpointer(tmp_path, env).find_resume("4")


def test_resuming_an_older_step_sets_the_newer_ones_aside(tmp_path, env):
    _save_steps(Checkpointer(tmp_path, env, keep_last=0), Model(), [2, 4, 6])
    path, model, messages = _resume(tmp_path, env, "2")
    assert path.name == step_dir_name(2)
    root = tmp_path / "checkpoints"
    assert sorted(p.name for p in (root / "discarded").iterdir()) == [f"{step_dir_name(s)}.superseded" for s in (4, 6)]
    assert any("newer than the one resumed from" in m for m in messages)
    ckpt = Checkpointer(tmp_path, env, keep_last=0)
    ckpt.find_resume("auto")
    _save_steps(ckpt, model, [4])  # the new trajectory's step 4 takes the name
    assert read_manifest(root / step_dir_name(4))["step"] == 4


def test_crash_between_rename_and_latest_still_resumes_the_newest(tmp_path, env):
    _save_steps(Checkpointer(tmp_path, env, keep_last=0), Model(), [2, 4])
    (tmp_path / "checkpoints" / "latest").write_text(step_dir_name(2))  # rank 0 died before moving it
    path, _, _ = _resume(tmp_path, env)
    assert path.name == step_dir_name(4)
    assert (tmp_path / "checkpoints" / "latest").read_text() == step_dir_name(4)  # repaired


def test_interrupted_save_and_interrupted_deletion_leave_nothing_half_visible(tmp_path, env):
    _save_steps(Checkpointer(tmp_path, env, keep_last=0), Model(), [2, 4])
    root = tmp_path / "checkpoints"
    partial = root / f".tmp-{step_dir_name(6)}"
    (partial / "extra").mkdir(parents=True)
    (partial / "__0_0.distcp").write_bytes(b"half a shard")
    (root / f".trash-{step_dir_name(0)}").mkdir()  # retention killed mid-delete
    path, model, messages = _resume(tmp_path, env)
    assert path.name == step_dir_name(4) and float(model.t["w"][0, 0]) == 4.0
    assert any("removing incomplete checkpoint" in m for m in messages)
    assert sorted(p.name for p in root.iterdir()) == ["latest", step_dir_name(2), step_dir_name(4)]


def test_a_failed_save_raises_and_deletes_nothing(tmp_path, env):
    model = Model()
    _save_steps(Checkpointer(tmp_path, env, keep_last=1), model, [2])

    def disk_full():
        raise OSError("No space left on device")

    ckpt = Checkpointer(tmp_path, env, keep_last=1, before_commit=disk_full)
    model.set(4)
    ckpt.save(4, model.state(), {"train": {"step": 4}})  # async: the failure surfaces at the next wait
    with pytest.raises(CheckpointError, match="No space left"):
        ckpt.wait()
    root = tmp_path / "checkpoints"
    assert (root / step_dir_name(2) / MANIFEST).exists() and (root / "latest").read_text() == step_dir_name(2)
    assert not (root / step_dir_name(4)).exists()


def test_manifest_records_the_teacher_and_a_changed_teacher_is_refused(tmp_path, env):
    from trainer.checkpoint import check_teacher

    a = {"path": "/t/a.safetensors", "sha256": "a" * 64}
    b = {"path": "/t/a.safetensors", "sha256": "b" * 64}
    ckpt = Checkpointer(tmp_path, env, identity={"teacher": a})
    _save_steps(ckpt, Model(), [2])
    manifest = json.loads((tmp_path / "checkpoints" / step_dir_name(2) / MANIFEST).read_text())
    assert manifest["teacher"] == a
    check_teacher(manifest, a, False, tmp_path)
    with pytest.raises(CheckpointError, match="teacher changed.*allow_changed"):
        check_teacher(manifest, b, False, tmp_path)
    with pytest.raises(CheckpointError, match="teacher changed"):
        check_teacher(manifest, None, False, tmp_path)
    with pytest.warns(UserWarning, match="allow_changed=true"):
        check_teacher(manifest, b, True, tmp_path)
