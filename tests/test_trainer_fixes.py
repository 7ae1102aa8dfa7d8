"""Fixes found in review of the first wave (issue 9 item 6), each tested against what the old code did."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from models import model_config
from models.convert import save_safetensors
from models.losses import flops_target
from trainer import optim
from trainer.config import ConfigError, OptimConfig, load_config
from tests.trainer_utils import REPO, assert_ok, run_train, write_config

RECIPES = sorted((REPO / "configs" / "imagenet").glob("*.yaml"))


def test_official_schedule_jumps_and_the_continuous_one_does_not():
    lam, hold, warm = 0.5, 100, 1000
    official = [flops_target(s, lam, warm, hold, "official") for s in range(0, 1200)]
    cont = [flops_target(s, lam, warm, hold, "continuous") for s in range(0, 1200)]
    # DyDiT's train.py: 1 − (1 − λ)·step/warmup once the hold ends, λ after the warm-up
    assert official[99] == 1.0 and official[100] == pytest.approx(1 - 0.5 * 100 / 1000) and official[1100] == lam
    assert max(abs(a - b) for a, b in zip(official[1:], official[:-1])) == pytest.approx(0.05)  # the jump
    assert cont[100] == 1.0 and cont[1000] == lam and cont[1100] == lam
    assert max(abs(a - b) for a, b in zip(cont[1:], cont[:-1])) == pytest.approx(0.5 / 900)  # smooth
    with pytest.raises(ValueError, match="warmup_schedule"):
        flops_target(0, lam, warm, hold, "cosine")


def _stand_in_teacher(path: Path, name: str) -> Path:
    """A weights file whose header says `name`'s config (validation reads only the header)."""
    save_safetensors({"stand_in": torch.zeros(1)}, model_config(name), path)
    return path


@pytest.mark.parametrize("recipe", RECIPES, ids=[p.stem for p in RECIPES])
def test_imagenet_recipes_validate(tmp_path, recipe):
    teacher = _stand_in_teacher(tmp_path / "t.safetensors", "dit-xl/2")
    (tmp_path / "data").mkdir()
    cfg = load_config(recipe, [f"teacher.path={teacher}", f"data.path={tmp_path / 'data'}"], world_size=8)
    if recipe.stem.startswith("dydit"):
        kd = recipe.stem.endswith("-kd")
        assert (cfg.distill.lambda_noise > 0) == kd  # the paper's recipe has no KD, its -kd twin has
        assert cfg.dynamic.warmup_schedule == "official"  # the paper's schedule


def test_dydit_kd_variants_exist_for_each_paper_recipe():
    paper = {p.stem for p in RECIPES if p.stem.startswith("dydit") and not p.stem.endswith("-kd")}
    assert paper and {f"{s}-kd" for s in paper} <= {p.stem for p in RECIPES}


def test_a_teacher_no_loss_reads_serves_inheritance_only(tmp_path):
    teacher_cfg = write_config(tmp_path / "t.yaml", model="dit-s/2", train={"steps": 2, "global_batch": 16})
    assert_ok(run_train(teacher_cfg, [f"run_dir={tmp_path / 't'}"]))
    from trainer.export import export_run

    teacher = export_run(tmp_path / "t", tmp_path / "te")["ema"]
    cfg = write_config(tmp_path / "s.yaml", model="dydit-s/2", args={"mlp_groups": 2}, student={"init": "inherit"},
                       teacher={"path": str(teacher)}, distill={"lambda_noise": 0.0, "lambda_var": 0.0},
                       train={"steps": 2, "global_batch": 16, "log_every": 1})
    proc = run_train(cfg, [f"run_dir={tmp_path / 'noKD'}"])
    assert_ok(proc)
    assert "served inheritance only" in proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "noKD" / "metrics.jsonl").read_text().splitlines()]
    assert all("time/teacher" not in r and "loss/kd" not in r for r in rows)  # the teacher never ran
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'KD'}", "distill.lambda_noise=0.5"]))
    rows = [json.loads(line) for line in (tmp_path / "KD" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["time/teacher"] > 0 and "loss/kd" in r for r in rows)  # (0 at step 1: the student inherits everything)


@pytest.fixture
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fused_auto_never_hands_fsdp2_dtensors_to_apex(one_rank_group, monkeypatch):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    class FakeApexAdam(torch.optim.Adam):
        def __init__(self, params, adam_w_mode=True, **kw):
            super().__init__(params, **kw)

    monkeypatch.setattr(optim, "_apex_fused_adam", lambda: FakeApexAdam)
    sharded = fully_shard(torch.nn.Linear(4, 4), mesh=init_device_mesh("cpu", (1,)))
    plain = torch.nn.Linear(4, 4)
    cuda_like = torch.device("cuda")  # apex is picked on CUDA with auto: only the device type is read here
    assert type(optim.build_optimizer([{"params": list(plain.parameters())}], OptimConfig(), cuda_like)) is FakeApexAdam
    got = optim.build_optimizer([{"params": list(sharded.parameters())}], OptimConfig(), torch.device("cpu"))
    assert type(got) is torch.optim.AdamW
    with pytest.raises(RuntimeError, match="cannot drive FSDP2"):
        optim.build_optimizer([{"params": list(sharded.parameters())}], OptimConfig(fused="apex"), torch.device("cpu"))


def test_apex_with_fsdp_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="optim.fused='apex'.*FSDP2"):
        load_config(write_config(tmp_path / "c.yaml"), ["optim.fused=apex", "engine.kind=fsdp"], world_size=1)


def test_ddp_wrapping_raises_no_deprecation_warning(one_rank_group):
    from trainer.engines.ddp import wrap_ddp

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        wrap_ddp(torch.nn.Linear(2, 2), None)
