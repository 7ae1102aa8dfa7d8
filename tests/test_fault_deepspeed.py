"""DeepSpeed ZeRO-1, ZeRO-2 and ZeRO-3 (DS_ACCELERATOR=cpu, two ranks) with a frozen teacher present.

Each stage: stopped after step 2, resumed from DeepSpeed's own checkpoint to step 4 with step 3's
loss made non-finite (its gradients finite: `nan_loss@3`, so only the loop's agreed skip can stop
the update), and compared with the single-process run under the same fault: the same losses, step 3
counted as skipped, and the weights, the EMA and every tensor of the optimizer state (fp32 masters,
Adam moments and step counts) bitwise unmoved by step 3. `launch.export` consolidates student and
EMA from the ZeRO partitions. ZeRO-2 is also killed with SIGKILL mid-run and relaunched: it ends
bit-identical to its uninterrupted twin.

The runs start with torchrun; ZeRO-3 resumes under the `deepspeed` launcher
(`deepspeed --num_gpus 2 --module launch.train`), so both launch forms are exercised."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.fault_utils import finish, kill9, last_step, losses_by_step, start, tail, torchrun_cmd, train_cmd, wait_until
from tests.helpers import assert_state_close
from tests.trainer_utils import REPO, TINY_ARGS, base_env, free_port, metrics, write_config

pytest.importorskip("deepspeed")
MULTI_RANK_RTOL = 1e-5
SKIP = "nan_loss@3"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A teacher, the config, and two single-process reference runs: plain, and with step 3 skipped."""
    from models import build_model
    from models.convert import save_safetensors
    from tests.helpers import randomize_

    root = tmp_path_factory.mktemp("ds")
    torch.manual_seed(0)
    teacher = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=1, std=0.05)
    path = root / "teacher.safetensors"
    save_safetensors(teacher.state_dict(), teacher.config, path)
    cfg = write_config(root / "c.yaml", model="lit-s/2", student={"init": "inherit"}, teacher={"path": str(path)},
                       train={"steps": 4, "log_every": 1}, checkpoint={"every": 2, "keep_last": 0})
    refs = [start(train_cmd(cfg, [f"run_dir={root / 'ref'}"]), root / "ref.log", base_env()),
            start(train_cmd(cfg, [f"run_dir={root / 'ref_skip'}"]), root / "ref_skip.log", base_env(DITILL_DEBUG_FAULTS=SKIP))]
    assert finish(refs) == [0, 0], tail(root / "ref.log") + tail(root / "ref_skip.log")
    return {"cfg": cfg, "teacher": path, "teacher_bytes": path.read_bytes(), "ref": root / "ref", "ref_skip": root / "ref_skip"}


def _ds_cmd(launcher: str, cfg, overrides):
    if launcher == "deepspeed":
        return [sys.executable, "-m", "deepspeed.launcher.runner", "--num_gpus", "2", f"--master_port={free_port()}",
                "--module", "launch.train", str(cfg), *overrides]
    return torchrun_cmd(cfg, overrides, 2, f"--master_port={free_port()}")


def _ds_overrides(run: Path, stage: int) -> list[str]:
    return [f"run_dir={run}", "engine.kind=deepspeed", f"engine.deepspeed_config=configs/deepspeed/zero{stage}.json"]


def _optimizer_tensors(run: Path, step: int) -> dict[str, torch.Tensor]:
    """Every tensor in every rank's DeepSpeed optimizer-state file at `step`, keyed by file and path."""
    out: dict[str, torch.Tensor] = {}

    def walk(prefix: str, obj) -> None:
        if isinstance(obj, torch.Tensor):
            out[prefix] = obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}", v)
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                walk(f"{prefix}.{i}", v)

    files = sorted((run / "checkpoints" / f"step_{step:08d}").rglob("*optim_states.pt"))
    assert len(files) == 2, files  # one per rank
    from deepspeed.runtime.fp16.loss_scaler import LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    for f in files:  # DeepSpeed's own file: its stage enum, loss scaler and fragment addresses are the non-tensor globals it pickles
        with torch.serialization.safe_globals([ZeroStageEnum, LossScaler, fragment_address]):
            walk(f.name, torch.load(f, map_location="cpu", weights_only=True))
    return out


def _assert_step_skipped(run: Path, tmp: Path) -> None:
    """Step 3 was counted as skipped and moved nothing: weights, EMA and optimizer state at 3 are those
    at 2, bit for bit; step 4 moved all three again (so the comparison can tell)."""
    from safetensors.torch import load_file

    from trainer.export import export_run

    rec = {m["step"]: m for m in metrics(run)}
    assert rec[3]["skipped"] == 1.0 and rec[4]["skipped"] == 0.0 and rec[4]["train/skipped_steps"] == 1.0
    opt = {s: _optimizer_tensors(run, s) for s in (2, 3, 4)}
    assert any(k.endswith(".step") for k in opt[2]) and any(k.endswith(".exp_avg_sq") for k in opt[2]), sorted(opt[2])[:20]
    assert opt[2].keys() == opt[3].keys()
    moved = [k for k in opt[2] if not torch.equal(opt[2][k], opt[3][k])]
    assert not moved, f"the skipped step changed optimizer state {moved[:5]}"
    assert all(not torch.equal(opt[3][k], opt[4][k]) for k in opt[3] if k.endswith((".step", ".exp_avg")))
    weights = {s: export_run(run, tmp / f"e{s}", step=s) for s in (2, 3, 4)}
    for kind in ("student", "ema"):
        w = {s: load_file(paths[kind]) for s, paths in weights.items()}
        assert all(torch.equal(w[2][k], w[3][k]) for k in w[2]), f"{kind} moved in the skipped step"
        assert any(not torch.equal(w[3][k], w[4][k]) for k in w[3]), f"{kind} did not move in step 4"


@pytest.mark.parametrize("stage,launcher", [(3, "deepspeed"), (2, "torchrun"), (1, "torchrun")])
def test_zero_with_a_teacher_resumes_skips_an_agreed_nonfinite_step_and_exports(setup, tmp_path, stage, launcher):
    from safetensors.torch import load_file

    from trainer.export import export_run

    run = tmp_path / "run"
    launches = [(["train.steps=2"], {}), (["checkpoint.every=1"], {"DITILL_DEBUG_FAULTS": SKIP})]
    for i, (extra, faults) in enumerate(launches):
        env = base_env(DS_ACCELERATOR="cpu", **faults)
        proc = start(_ds_cmd(launcher if i else "torchrun", setup["cfg"], _ds_overrides(run, stage) + extra), tmp_path / f"log{i}", env)
        assert finish([proc]) == [0], tail(tmp_path / f"log{i}")
    log = tail(tmp_path / "log1", 100000)
    assert "engine=deepspeed world=2" in log and "start_step=2" in log
    assert "step 3: non-finite loss or gradient, update skipped" in log
    manifest = (run / "checkpoints" / "step_00000004" / "manifest.json").read_text()
    assert '"format": "deepspeed"' in manifest and '"world_size": 2' in manifest
    got, ref = losses_by_step(run), losses_by_step(setup["ref_skip"])
    assert sorted(got) == [1, 2, 3, 4] and math.isnan(got[3]) and math.isnan(ref[3])
    assert [got[s] for s in (1, 2, 4)] == pytest.approx([ref[s] for s in (1, 2, 4)], rel=MULTI_RANK_RTOL)
    assert setup["teacher"].read_bytes() == setup["teacher_bytes"]  # frozen, never written
    _assert_step_skipped(run, tmp_path)
    mine, theirs = export_run(run, tmp_path / "exp"), export_run(setup["ref_skip"], tmp_path / "exp_ref")
    for name in ("student", "ema"):
        assert_state_close(load_file(mine[name]), load_file(theirs[name]), rtol=1e-4, atol=1e-6, what=name)
    ema, student = load_file(mine["ema"]), load_file(mine["student"])
    assert any(not torch.equal(ema[k], student[k]) for k in ema)  # a real EMA


def test_zero2_killed_with_sigkill_resumes_bit_identically(setup, tmp_path):
    """An uninterrupted ZeRO-2 run beside one that is SIGKILLed while step 4 is parked (step 3 done, the
    newest checkpoint step 2) and relaunched: same losses, student and EMA, bit for bit."""
    from safetensors.torch import load_file

    from trainer.export import export_run

    whole, killed = tmp_path / "whole", tmp_path / "killed"
    env = base_env(DS_ACCELERATOR="cpu")
    twin = start(_ds_cmd("torchrun", setup["cfg"], _ds_overrides(whole, 2)), tmp_path / "whole.log", env)
    victim = start(_ds_cmd("torchrun", setup["cfg"], _ds_overrides(killed, 2)), tmp_path / "killed.log",
                   base_env(DS_ACCELERATOR="cpu", DITILL_DEBUG_FAULTS="wait_preempt@4"))
    wait_until(lambda: last_step(killed) >= 3, [victim], timeout=300, what="step 3")
    kill9([victim])
    assert not (killed / "checkpoints" / "step_00000004").exists()
    again = start(_ds_cmd("torchrun", setup["cfg"], _ds_overrides(killed, 2)), tmp_path / "again.log", env)
    assert finish([twin, again]) == [0, 0], tail(tmp_path / "whole.log") + tail(tmp_path / "again.log")
    assert "start_step=2" in tail(tmp_path / "again.log", 100000)
    got, want = losses_by_step(killed), losses_by_step(whole)
    assert sorted(got) == [1, 2, 3, 4] and got == want
    assert [got[s] for s in range(1, 5)] == pytest.approx([losses_by_step(setup["ref"])[s] for s in range(1, 5)],
                                                          rel=MULTI_RANK_RTOL)
    mine, theirs = export_run(killed, tmp_path / "exp"), export_run(whole, tmp_path / "exp_whole")
    for name in ("student", "ema"):
        a, b = load_file(mine[name]), load_file(theirs[name])
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


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
