"""The family protocol end to end with a family defined only in tests/ (tests/toy_family.py): it
trains, samples during training, checkpoints, resumes bit for bit, exports, loads and samples through
the unchanged trainer, and its LiT student distils from it under FSDP2 on 2 ranks."""
from __future__ import annotations

import pytest
import torch

from launch import info
from models import build_model, family_of, load_pretrained, model_config
from models.diffusion import build_objective
from models.diffusion.samplers import sample
from tests.toy_family import NAME, Toy, ToyConfig
from tests.trainer_utils import assert_ok, losses, metrics, run_train, write_config

TOY = "tests.toy_family:toy-s"
LIT_TOY = "tests.toy_family:lit-toy-s"


def toy_config(tmp_path, name: str, model: str = TOY, **sections):
    base = dict(
        student={"model": model, "args": {}, "init": "random"},
        diffusion={"objective": "flow", "timestep_sampling": "logit_normal"},
        train={"steps": 6, "global_batch": 16, "log_every": 1},
        checkpoint={"every": 3, "async_save": False},
        sample={"every": 3, "num": 4, "steps": 2, "method": "euler", "cfg_scale": 2.0},
        optim={"lr": 1e-3},
    )
    for k, v in sections.items():
        base[k] = {**base.get(k, {}), **v} if isinstance(v, dict) else v
    return write_config(tmp_path / f"{name}.yaml", model=model, args={}, **base)


def test_an_outside_family_is_reached_by_module_name():
    cfg = model_config(TOY)
    assert isinstance(cfg, ToyConfig) and family_of(cfg).name == NAME
    model = build_model(LIT_TOY)
    assert isinstance(model, Toy) and model.config.attention == "linear"
    assert [type(b).__name__ for b in model.all_blocks()] == ["ToyBlock", "ToyBlock"]  # both stacks, in order
    out = info.model_info(TOY, {})
    assert out["family"] == NAME and out["params"]["total"] == sum(p.numel() for p in build_model(TOY).parameters())
    assert out["params"]["attention"] > 0 and out["params"]["mlp"] > 0  # groups by the family's block prefixes
    with pytest.raises(ValueError, match="no family registered by 'tests.toy_family' knows the model 'toy-x'"):
        model_config("tests.toy_family:toy-x")


def test_toy_family_trains_resumes_exports_and_samples(tmp_path):
    cfg = toy_config(tmp_path, "toy")
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert_ok(run_train(cfg, [f"run_dir={whole}"]))
    assert_ok(run_train(cfg, [f"run_dir={split}", "train.steps=3"]))
    assert_ok(run_train(cfg, [f"run_dir={split}"]))  # resumes at step 3
    assert losses(whole) == losses(split)  # bit for bit
    assert [m["step"] for m in metrics(split)] == list(range(1, 7))
    assert (whole / "tb").is_dir() and any((whole / "tb").iterdir())  # sample grids were written

    from trainer.export import export_run

    paths = export_run(whole, tmp_path / "export")
    model = load_pretrained(paths["ema"])
    assert isinstance(model, Toy) and family_of(model).name == NAME
    flow = build_objective("flow")
    noise = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    y = torch.arange(4)
    x = sample(model, flow, noise, {"y": y}, null_cond=model.null_condition({"y": y}), cfg_scale=2.0, steps=3,
               method="euler")
    assert x.shape == noise.shape and torch.isfinite(x).all() and not torch.equal(x, noise)


def test_toy_student_distils_from_toy_teacher_under_fsdp(tmp_path):
    teacher_cfg = toy_config(tmp_path, "teacher", train={"steps": 3})
    assert_ok(run_train(teacher_cfg, [f"run_dir={tmp_path / 'teacher'}"]))
    from trainer.export import export_run

    teacher = export_run(tmp_path / "teacher", tmp_path / "texport")["ema"]
    student = toy_config(tmp_path, "student", model=LIT_TOY, student={"init": "inherit"},
                         teacher={"path": str(teacher), "shard": True}, sample={"every": 0},
                         distill={"lambda_noise": 1.0, "lambda_var": 0.0})
    one, two = tmp_path / "one", tmp_path / "two"
    r1 = run_train(student, [f"run_dir={one}", "engine.kind=fsdp"])
    assert_ok(r1)
    assert "inherited" in r1.stdout + r1.stderr
    assert_ok(run_train(student, [f"run_dir={two}", "engine.kind=fsdp"], nproc=2))
    a, b = losses(one), losses(two)
    assert all(k > 0 for k in (m["loss/kd"] for m in metrics(one)))
    torch.testing.assert_close(torch.tensor(b), torch.tensor(a), rtol=1e-5, atol=1e-6)  # fp32 reduction order only
