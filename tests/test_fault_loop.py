"""The loop's own fault handling, on short in-process runs (one rank): non-finite steps skipped,
counted and finally fatal with the last good checkpoint named; a changed teacher refused on resume."""
from __future__ import annotations

import warnings

import pytest
import torch
from safetensors.torch import load_file

from tests.trainer_utils import TINY_ARGS, metrics, write_config
from trainer.checkpoint import CheckpointError
from trainer.config import load_config


def _train(cfg_path, *overrides):
    from trainer.loop import train

    return train(load_config(cfg_path, list(overrides), world_size=1))


def test_nan_batches_skip_the_update_are_counted_and_k_in_a_row_stop_naming_the_last_good_checkpoint(tmp_path, monkeypatch):
    from trainer.export import export_run
    from trainer.loop import NonFiniteError

    monkeypatch.setenv("DITILL_DEBUG_FAULTS", "nan_batch@3;nan_batch@6,7,8")
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", train={"steps": 12, "max_nonfinite": 3},
                       checkpoint={"every": 1, "keep_last": 0}, optim={"lr": 1e-2})
    run = tmp_path / "r"
    with pytest.raises(NonFiniteError) as err:
        _train(cfg, f"run_dir={run}")
    msg = str(err.value)
    assert "3 consecutive steps" in msg and "last at step 8" in msg
    assert f"the last good checkpoint is {run / 'checkpoints' / 'step_00000005'}." in msg  # before the streak
    rec = {m["step"]: m for m in metrics(run)}
    assert rec[3]["skipped"] == 1.0 and rec[4]["skipped"] == 0.0 and rec[3]["train/skipped_steps"] == 1.0
    assert rec[7]["train/skipped_steps"] == 3.0
    exported = {s: export_run(run, tmp_path / f"e{s}", step=s) for s in (2, 3, 4, 5, 7)}
    key = "blocks.0.mlp.fc1.weight"
    for kind in ("student", "ema"):  # a skipped step moves neither the weights nor their EMA
        weights = {s: load_file(paths[kind]) for s, paths in exported.items()}
        assert torch.equal(weights[2][key], weights[3][key]), kind  # step 3's update was skipped
        assert not torch.equal(weights[3][key], weights[4][key]), kind  # step 4 trained again
        assert torch.equal(weights[5][key], weights[7][key]), kind  # and 6, 7 were skipped (8 stopped the run)
        assert all(torch.isfinite(w[key]).all() for w in weights.values()), kind


def test_resuming_with_another_teacher_is_an_error_unless_allowed(tmp_path):
    from models import build_model
    from models.convert import save_safetensors
    from tests.helpers import randomize_

    paths = []
    for seed in (1, 2):
        torch.manual_seed(0)
        teacher = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=seed, std=0.05)
        paths.append(tmp_path / f"teacher{seed}.safetensors")
        save_safetensors(teacher.state_dict(), teacher.config, paths[-1])
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", student={"init": "inherit"}, teacher={"path": str(paths[0])},
                       train={"steps": 2}, checkpoint={"every": 2})
    run = tmp_path / "r"
    assert _train(cfg, f"run_dir={run}").step == 2
    with pytest.raises(CheckpointError, match="teacher changed since .*step_00000002.*teacher.allow_changed=true"):
        _train(cfg, f"run_dir={run}", f"teacher.path={paths[1]}", "train.steps=3")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert _train(cfg, f"run_dir={run}", f"teacher.path={paths[1]}", "train.steps=3", "teacher.allow_changed=true").step == 3
    assert any("continuing because teacher.allow_changed=true" in str(w.message) for w in caught)
    assert any("config changed since" in str(w.message) and "teacher2" in str(w.message) for w in caught)
