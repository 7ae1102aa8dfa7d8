"""DyFLUX and LiT-FLUX distil from a FLUX teacher through the real trainer on 2 gloo ranks, from
text-embedding shards (latent, text_emb, text_mask; non-square latents): they train, sample grids,
checkpoint and resume bit for bit under DDP and under FSDP2 with the teacher sharded.

The shards carry FLUX's CLIP pooled vector (`text_pooled`). Two crossings run by default (DyFLUX
under FSDP2, LiT-FLUX under DDP); the other two are marked slow.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from models.convert import save_safetensors
from tests.data_helpers import latent_sample, write_raw
from tests.flux_helpers import TINY, tiny_flux
from tests.trainer_utils import assert_ok, losses, metrics, run_train, write_config

LATENT, TEXT = (4, 8, 12), (6, 32)  # 4×6 = 24 image tokens, 6 T5 tokens of width 32
POOLED = 24  # the tiny FLUX configs' vec_in_dim


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("flux_shards")
    rng = np.random.default_rng(0)
    samples = [latent_sample(i, rng, latent=LATENT, text=TEXT, pooled=POOLED) for i in range(16)]
    write_raw(str(path), "wds", [samples[:8], samples[8:]], latent=LATENT, text=TEXT, pooled=POOLED)
    return path


@pytest.fixture(scope="module")
def teacher(tmp_path_factory):
    model = tiny_flux("flux-dev", seed=7, std=0.1)
    path = tmp_path_factory.mktemp("flux_teacher") / "teacher.safetensors"
    save_safetensors(model.state_dict(), model.config, path)
    return path


def flux_config(tmp_path, name, model, shards, teacher, engine, args=None):
    sections = dict(
        student={"model": model, "args": {**TINY, **(args or {})}, "init": "inherit"},
        teacher={"path": str(teacher), "shard": engine == "fsdp"},
        data={"format": "wds", "path": str(shards), "input": "latent", "cond": "text_emb"},
        diffusion={"objective": "flow", "timestep_sampling": "logit_normal", "dynamic_shift": True,
                   "base_seq_len": 16, "max_seq_len": 64},
        distill={"lambda_noise": 1.0, "lambda_var": 0.0},
        dynamic={"warmup_steps": 2, "hold_steps": 0, "flops_target": 0.6},
        engine={"kind": engine},
        optim={"lr": 1e-3},
        train={"steps": 4, "global_batch": 4, "log_every": 1},
        checkpoint={"every": 2, "async_save": False},
        sample={"every": 2, "num": 2, "steps": 2, "method": "euler", "cfg_scale": 2.0},
    )
    return write_config(tmp_path / f"{name}.yaml", model=model, args=sections["student"]["args"], **sections)


def _trains_and_resumes(tmp_path, shards, teacher, model, engine, args=None):
    cfg = flux_config(tmp_path, "run", model, shards, teacher, engine, args)
    whole, split = tmp_path / "whole", tmp_path / "split"
    first = run_train(cfg, [f"run_dir={whole}"], nproc=2, timeout=600)
    assert_ok(first)
    assert "inherited" in first.stdout + first.stderr
    assert_ok(run_train(cfg, [f"run_dir={split}", "train.steps=2"], nproc=2, timeout=600))
    assert_ok(run_train(cfg, [f"run_dir={split}"], nproc=2, timeout=600))  # resumes at step 2
    assert losses(whole) == losses(split)  # bit for bit
    assert [m["step"] for m in metrics(split)] == [1, 2, 3, 4]
    assert all(np.isfinite(losses(whole))) and all(m["loss/kd"] > 0 for m in metrics(whole))
    grids = sorted(p.name for p in (whole / "samples").iterdir())
    assert "samples_ema_vs_teacher_00000002.png" in grids and "samples_ema_vs_teacher_00000004.png" in grids
    return whole


def test_dyflux_distils_under_fsdp2_with_a_sharded_teacher(tmp_path, shards, teacher):
    run = _trains_and_resumes(tmp_path, shards, teacher, "dyflux-dev", "fsdp", {"mlp_groups": 4})
    ratios = [m["flops/ratio"] for m in metrics(run)]
    assert all(0 < r <= 1 for r in ratios)
    from models import load_pretrained
    from models.diffusion import build_objective
    from models.diffusion.samplers import sample
    from trainer.export import export_run

    model = load_pretrained(export_run(run, tmp_path / "export")["ema"])
    assert model.config.dynamic and model.config.mlp_groups == 4
    noise = torch.randn(2, 4, 8, 12, generator=torch.Generator().manual_seed(0))
    cond = {"text_emb": torch.randn(2, 6, 32), "text_pooled": torch.randn(2, 24), "guidance": torch.full((2,), 3.5)}
    x = sample(model, build_objective("flow", dynamic_shift=True, base_seq_len=16, max_seq_len=64), noise, cond,
               steps=3, method="euler", seq_len=24)
    assert x.shape == noise.shape and torch.isfinite(x).all()


def test_lit_flux_distils_under_ddp(tmp_path, shards, teacher):
    _trains_and_resumes(tmp_path, shards, teacher, "lit-flux-dev", "ddp")


@pytest.mark.slow
def test_dyflux_distils_under_ddp(tmp_path, shards, teacher):
    _trains_and_resumes(tmp_path, shards, teacher, "dyflux-dev", "ddp", {"mlp_groups": 4, "single_token_skip": "mlp"})


@pytest.mark.slow
def test_lit_flux_distils_under_fsdp2_with_a_sharded_teacher(tmp_path, shards, teacher):
    _trains_and_resumes(tmp_path, shards, teacher, "lit-flux-dev", "fsdp", {"num_heads": 1})


def test_shards_without_the_pooled_vector_are_refused_before_training(tmp_path, teacher):
    """FLUX conditions on CLIP's pooled vector: shards without it are a config error (exit 2), not a crash."""
    rng = np.random.default_rng(0)
    plain = tmp_path / "no_pooled"
    samples = [latent_sample(i, rng, latent=LATENT, text=TEXT) for i in range(8)]
    write_raw(str(plain), "wds", [samples], latent=LATENT, text=TEXT)
    cfg = flux_config(tmp_path, "plain", "lit-flux-dev", plain, teacher, "single")
    proc = run_train(cfg, [f"run_dir={tmp_path / 'plain'}", "train.steps=1"])
    assert proc.returncode == 2 and "text_pooled" in proc.stderr and "--clip-encoder" in proc.stderr
