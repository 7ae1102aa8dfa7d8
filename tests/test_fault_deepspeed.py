"""DeepSpeed ZeRO-2 and ZeRO-3 (DS_ACCELERATOR=cpu, two ranks) with a frozen teacher present:
stopped after step 2, resumed from DeepSpeed's own checkpoint to step 4, and compared with the
single-process run; `launch.export` consolidates student and EMA from the ZeRO partitions.

Both start with torchrun; ZeRO-3 resumes under the `deepspeed` launcher
(`deepspeed --num_gpus 2 --module launch.train`), so both launch forms are exercised."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from tests.fault_utils import finish, losses_by_step, start, tail, torchrun_cmd, train_cmd
from tests.helpers import assert_state_close
from tests.trainer_utils import REPO, TINY_ARGS, base_env, free_port, write_config

pytest.importorskip("deepspeed")
MULTI_RANK_RTOL = 1e-5


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from models import build_model
    from models.convert import save_safetensors
    from tests.helpers import randomize_

    root = tmp_path_factory.mktemp("ds")
    torch.manual_seed(0)
    teacher = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=1, std=0.05)
    path = root / "teacher.safetensors"
    save_safetensors(teacher.state_dict(), teacher.config, path)
    cfg = write_config(root / "c.yaml", model="lit-s/2", student={"init": "inherit"}, teacher={"path": str(path)},
                       train={"steps": 4, "log_every": 1}, checkpoint={"every": 2})
    ref = start(train_cmd(cfg, [f"run_dir={root / 'ref'}"]), root / "ref.log", base_env())
    assert finish([ref]) == [0], tail(root / "ref.log")
    return {"cfg": cfg, "teacher": path, "teacher_bytes": path.read_bytes(), "ref": root / "ref"}


def _ds_cmd(launcher: str, cfg, overrides):
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", f"--master_port={free_port()}",
                "--module", "launch.train", str(cfg), *overrides]
    return torchrun_cmd(cfg, overrides, 2, f"--master_port={free_port()}")


@pytest.mark.parametrize("stage,launcher", [(3, "deepspeed"), (2, "torchrun")])
def test_zero_with_a_teacher_resumes_and_exports(setup, tmp_path, stage, launcher):
    from safetensors.torch import load_file

    from trainer.export import export_run

    run = tmp_path / "run"
    overrides = [f"run_dir={run}", "engine.kind=deepspeed", f"engine.deepspeed_config=configs/deepspeed/zero{stage}.json"]
    env = base_env(DS_ACCELERATOR="cpu")
    for i, extra in enumerate((["train.steps=2"], [])):
        proc = start(_ds_cmd(launcher if i else "torchrun", setup["cfg"], overrides + extra), tmp_path / f"log{i}", env)
        assert finish([proc]) == [0], tail(tmp_path / f"log{i}")
    log = tail(tmp_path / "log1", 100000)
    assert "engine=deepspeed world=2" in log and "start_step=2" in log
    manifest = (run / "checkpoints" / "step_00000004" / "manifest.json").read_text()
    assert '"format": "deepspeed"' in manifest and '"world_size": 2' in manifest
    got, ref = losses_by_step(run), losses_by_step(setup["ref"])
    assert sorted(got) == [1, 2, 3, 4]
    assert [got[s] for s in range(1, 5)] == pytest.approx([ref[s] for s in range(1, 5)], rel=MULTI_RANK_RTOL)
    assert setup["teacher"].read_bytes() == setup["teacher_bytes"]  # frozen, never written
    mine, theirs = export_run(run, tmp_path / "exp"), export_run(setup["ref"], tmp_path / "exp_ref")
    for name in ("student", "ema"):
        assert_state_close(load_file(mine[name]), load_file(theirs[name]), rtol=1e-4, atol=1e-6, what=name)
    ema, student = load_file(mine["ema"]), load_file(mine["student"])
    assert any(not torch.equal(ema[k], student[k]) for k in ema)  # a real EMA


def test_export_cli_reports_a_missing_step(setup, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "launch.export", str(setup["ref"]), "--step", "3"], cwd=REPO,
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "step_00000003" in proc.stderr and "step_00000004" in proc.stderr


def test_export_names_tensors_a_deepspeed_checkpoint_lacks(tmp_path, monkeypatch):
    """Only buffers come from the model template: a parameter missing from the ZeRO files is an error,
    never a random-initialised tensor written into the export."""
    import deepspeed.utils.zero_to_fp32 as z2f

    from models import build_model
    from trainer.checkpoint import CheckpointError
    from trainer.export import _deepspeed_tensors

    template = build_model("lit-s/2", **TINY_ARGS)
    params = {k: v.clone() for k, v in template.named_parameters()}
    dropped = "blocks.1.mlp.fc2.weight"
    monkeypatch.setattr(z2f, "get_fp32_state_dict_from_zero_checkpoint",
                        lambda *a, **k: {n: v for n, v in params.items() if n != dropped})
    with pytest.raises(CheckpointError, match=rf"lacks student tensors \['{dropped}'\]"):
        _deepspeed_tensors(tmp_path, template)
