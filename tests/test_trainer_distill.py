"""Guidance distillation and feature distillation through the real trainer (issue 12 items 6, 7),
for any family: the DiT family here, the test-only toy family for feature taps across stacks."""
from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch

from models import load_pretrained
from models.diffusion.samplers import classifier_free_guidance
from trainer.build import build_objective
from trainer.config import ConfigError, load_config
from trainer.step import DistillStep, guided
from tests.trainer_utils import assert_ok, metrics, run_train, write_config

DIGITS = {"depth": 2, "hidden_size": 64, "num_heads": 2, "input_size": 8, "in_channels": 1, "num_classes": 10}


def test_per_sample_guidance_is_classifier_free_guidance():
    c, u = torch.randn(3, 8, 4, 4), torch.randn(3, 8, 4, 4)
    g = torch.tensor([1.0, 2.5, 4.0])
    got = guided(c, u, g, 4)
    for i in range(3):
        ref = classifier_free_guidance(torch.cat([c[i:i + 1], u[i:i + 1]]), float(g[i]), 4)
        torch.testing.assert_close(got[i:i + 1], ref)
    assert torch.equal(got[:, 4:], c[:, 4:])  # learned σ from the conditional half


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    root = tmp_path_factory.mktemp("teacher")
    cfg = write_config(root / "t.yaml", model="dit-s/2", args=DIGITS, train={"steps": 4, "global_batch": 16},
                       optim={"lr": 3e-3})
    assert_ok(run_train(cfg, [f"run_dir={root / 'run'}"]))
    from trainer.export import export_run

    return export_run(root / "run", root / "export")["ema"]


def test_guidance_distillation_regresses_the_teachers_guided_output(teacher, tmp_path):
    """Step 1's KD term equals the closed form: the student starts as the teacher (inherited, zero-initialised
    guidance embedder), so ε_S − guided ε_T = (1 − g)·(ε_T(cond) − ε_T(null)) on the same draws."""
    cfg_path = write_config(
        tmp_path / "s.yaml", model="dit-s/2", args={**DIGITS, "guidance_embed": True}, student={"init": "inherit"},
        teacher={"path": str(teacher)}, train={"steps": 1, "global_batch": 16, "log_every": 1},
        distill={"lambda_noise": 1.0, "lambda_var": 0.0, "diffusion_weight": 0.0, "guidance_distill": True},
        diffusion={"guidance_range": [1.0, 5.0], "cfg_dropout": 0.0},
    )
    assert_ok(run_train(cfg_path, [f"run_dir={tmp_path / 'run'}"]))
    logged = metrics(tmp_path / "run")[0]["loss/kd_noise"]

    cfg = load_config(cfg_path, [f"run_dir={tmp_path / 'run'}"], world_size=1)
    t_model = load_pretrained(teacher)
    objective = build_objective(cfg)
    env = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    step = DistillStep.__new__(DistillStep)  # only its draws: the same function of (seed, step, position)
    step.cfg, step.objective, step.engine, step.model = cfg, objective, SimpleNamespace(env=env), t_model
    step.family, step.student_guided, step.teacher_guided = __import__("models").family_of(t_model), True, False
    from data import build_loader

    batch = next(iter(build_loader(cfg.data, 0, 1)))
    draw = step.draw(batch["x"], 0)
    y, tm = batch["y"], objective.model_timestep(draw["t"])
    with torch.no_grad():
        c = t_model(draw["x_t"], tm, y)
        u = t_model(draw["x_t"], tm, torch.full_like(y, 10))
    g = draw["guidance"]
    assert 1.0 < float(g.min()) and float(g.max()) < 5.0 and g.unique().numel() == len(g)  # per sample
    expected = (((1 - g).view(-1, 1, 1, 1) * (c[:, :1] - u[:, :1])) ** 2).mean(dim=(1, 2, 3)).mean()
    assert logged == pytest.approx(float(expected), rel=1e-4)


def test_pixart_guidance_distillation_regresses_the_teachers_guided_output(tmp_path):
    """The same closed form for a text family: a tiny PixArt-Σ student with a guidance input, inherited
    from its teacher (zero-initialised `g_embedder`: it starts as the teacher), against the teacher's
    guided output uncond + g·(cond − uncond), the uncond branch being the null caption under each prompt's
    mask; and the guidance embedder learns (the student's output then moves with g)."""
    from models.family import family_of
    from tests.pixart_helpers import TINY_ARGS, pixart_config, teacher_file, write_text_shards

    shards, t_path = write_text_shards(tmp_path / "shards", per_bucket=8), teacher_file(tmp_path / "t.safetensors")
    cfg_path = pixart_config(
        tmp_path, "s", shards, "pixart-sigma-xl/2", t_path, student={"args": {**TINY_ARGS, "guidance_embed": True}},
        train={"steps": 3, "global_batch": 4, "log_every": 1}, checkpoint={"every": 3, "async_save": False},
        distill={"lambda_noise": 1.0, "lambda_var": 0.0, "diffusion_weight": 0.0, "guidance_distill": True},
        diffusion={"guidance_range": [1.0, 5.0], "cfg_dropout": 0.0})
    assert_ok(run_train(cfg_path, [f"run_dir={tmp_path / 'run'}"]))
    logged = metrics(tmp_path / "run")[0]["loss/kd_noise"]

    cfg = load_config(cfg_path, [f"run_dir={tmp_path / 'run'}"], world_size=1)
    t_model = load_pretrained(t_path).eval()
    assert not family_of(t_model).conditioning(t_model.config).guidance
    objective = build_objective(cfg)
    env = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"))
    step = DistillStep.__new__(DistillStep)  # only its draws
    step.cfg, step.objective, step.engine, step.model = cfg, objective, SimpleNamespace(env=env), t_model
    step.family, step.student_guided, step.teacher_guided = family_of(t_model), True, False
    from data import build_loader

    batch = next(iter(build_loader(cfg.data, 0, 1)))
    draw = step.draw(batch["x"], 0)
    cond, tm = t_model.condition(batch), objective.model_timestep(draw["t"])
    with torch.no_grad():
        c = t_model(draw["x_t"], tm, **cond)
        u = t_model(draw["x_t"], tm, **t_model.null_condition(cond))
    g = draw["guidance"]
    assert g.unique().numel() == len(g) and (c - u).abs().max() > 1e-2  # per-sample g; the caption matters
    expected = (((1 - g).view(-1, 1, 1, 1) * (c[:, :4] - u[:, :4])) ** 2).mean(dim=(1, 2, 3)).mean()
    assert logged == pytest.approx(float(expected), rel=1e-4)
    from trainer.export import export_run

    student = load_pretrained(export_run(tmp_path / "run", tmp_path / "export")["student"]).eval()
    assert student.config.guidance_embed and student.g_embedder.mlp[2].weight.abs().max() > 0  # it learned
    with torch.no_grad():
        lo, hi = (student(draw["x_t"], tm, **cond, guidance=torch.full_like(g, v)) for v in (1.0, 5.0))
    assert (lo - hi).abs().max() > 1e-4


def test_feature_distillation_is_logged_per_layer_and_sharded_teacher_matches(teacher, tmp_path):
    cfg = write_config(
        tmp_path / "s.yaml", model="lit-s/2", args=DIGITS, student={"init": "inherit"},
        teacher={"path": str(teacher), "shard": True}, train={"steps": 3, "global_batch": 16, "log_every": 1},
        distill={"lambda_noise": 0.5, "lambda_var": 0.05, "features": ["blocks.*.attn"], "feature_weight": 0.5},
    )
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'one'}", "engine.kind=fsdp"]))
    assert_ok(run_train(cfg, [f"run_dir={tmp_path / 'two'}", "engine.kind=fsdp"], nproc=2))
    one, two = metrics(tmp_path / "one"), metrics(tmp_path / "two")
    for row in one:
        layers = [row["loss/feature/blocks.0.attn"], row["loss/feature/blocks.1.attn"]]
        assert all(v > 0 for v in layers) and row["loss/feature"] == pytest.approx(sum(layers) / 2, rel=1e-5)
    for key in ("loss", "loss/feature", "loss/feature/blocks.1.attn"):
        assert [r[key] for r in two] == pytest.approx([r[key] for r in one], rel=1e-5)


@pytest.mark.parametrize("args,distill,match", [
    ({"guidance_embed": True}, {}, "has a guidance input but the teacher has none: set distill.guidance_distill=true"),
    ({}, {"guidance_distill": True}, "has no guidance input: set student.args.guidance_embed=true"),
    ({}, {"features": ["blocks.*.mlp_x"]}, r"matches no module of lit-s/2 \(module names look like"),
])
def test_guidance_and_feature_settings_are_validated(teacher, tmp_path, args, distill, match):
    with pytest.raises(ConfigError, match=match):
        load_config(write_config(tmp_path / "c.yaml", model="lit-s/2", args={**DIGITS, **args}, student={"init": "inherit"},
                                 teacher={"path": str(teacher)}, distill=distill), world_size=1)


def test_a_guidance_range_without_a_guided_model_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="guidance_range=.*has no effect"):
        load_config(write_config(tmp_path / "c.yaml", diffusion={"guidance_range": [1.0, 4.0]}), world_size=1)
