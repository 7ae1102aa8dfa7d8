"""The FLUX recipes (`configs/flux/*.yaml`) pass the trainer's whole validation — family-aware checks and
the teacher/student shape check on meta-device models included — with stand-ins for the teacher file
(our safetensors header carrying the real FLUX config, one dummy tensor) and the shard directory."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from models import model_config
from models.convert import CONFIG_METADATA_KEY
from models.weights_io import FAMILY_METADATA_KEY
from trainer.build import build_objective
from trainer.config import load_config

RECIPES = Path(__file__).resolve().parents[1] / "configs" / "flux"
CASES = {"dyflux-dev.yaml": ("dyflux-dev", "flux-dev"), "dyflux-lite.yaml": ("dyflux-lite", "flux-lite"),
         "lit-flux-dev.yaml": ("lit-flux-dev", "flux-dev")}


def teacher_standin(path: Path, name: str) -> Path:
    """A safetensors file whose header says it holds `name` (read_config reads only the header)."""
    import json

    meta = {"format": "pt", CONFIG_METADATA_KEY: json.dumps(model_config(name).to_dict()), FAMILY_METADATA_KEY: "flux"}
    save_file({"placeholder": torch.zeros(1)}, str(path), metadata=meta)
    return path


def test_every_recipe_is_listed():
    assert sorted(p.name for p in RECIPES.glob("*.yaml")) == sorted(CASES)


@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_validates_with_stand_ins(tmp_path, recipe):
    student, teacher = CASES[recipe]
    stand = teacher_standin(tmp_path / "teacher.safetensors", teacher)
    cfg = load_config(RECIPES / recipe, [f"teacher.path={stand}", f"data.path={tmp_path}"], world_size=8)
    assert cfg.student.model == student and cfg.student.init == "inherit"
    assert cfg.engine.kind == "fsdp" and cfg.engine.mixed_precision == "bf16"
    assert cfg.engine.activation_checkpointing == "full"
    assert cfg.teacher.shard and cfg.teacher.dtype == "bf16"
    assert (cfg.data.input, cfg.data.cond, cfg.data.buckets, cfg.data.image_size) == ("latent", "text_emb", True, 1024)
    d = cfg.diffusion
    assert (d.objective, d.timestep_sampling, d.logit_mean, d.logit_std, d.dynamic_shift) == ("flow", "logit_normal", 0.0, 1.0, True)
    assert cfg.train.micro_batch * 8 == cfg.train.global_batch
    assert cfg.sample.method == "euler" and cfg.sample.cfg_scale == 1.0  # guidance-distilled: one forward per step
    flow = build_objective(cfg)
    assert flow.dynamic_shift and flow.shift_factor(4096) == pytest.approx(torch.tensor(1.15).exp().item(), rel=1e-6)
    if student.startswith("dy"):
        assert cfg.dynamic.flops_target == 0.5
    with pytest.raises(Exception, match="teacher.path"):
        load_config(RECIPES / recipe, [f"data.path={tmp_path}"], world_size=8)  # the placeholder path does not exist


def test_recipe_refuses_a_teacher_of_another_shape(tmp_path):
    stand = teacher_standin(tmp_path / "teacher.safetensors", "flux-schnell")  # no guidance input
    with pytest.raises(Exception, match="guidance_embed"):
        load_config(RECIPES / "dyflux-dev.yaml", [f"teacher.path={stand}", f"data.path={tmp_path}"], world_size=8)


@pytest.mark.slow
@pytest.mark.parametrize("recipe", sorted(CASES))
def test_recipe_micro_batch_fits_the_memory_plan(recipe):
    from trainer.memory_plan import plan_memory

    student, teacher = CASES[recipe]
    plan = plan_memory(model_config(student), model_config(teacher), 8, 80, micro_batch=8, resolution=1024)
    assert plan.fits, plan.total / 2**30


def test_a_malformed_partial_exclusion_is_a_config_error(tmp_path):
    stand = teacher_standin(tmp_path / "teacher.safetensors", "flux-dev")
    with pytest.raises(Exception, match=r"student.inherit_exclude.*name@rows=a:b"):
        load_config(RECIPES / "lit-flux-dev.yaml", [f"teacher.path={stand}", f"data.path={tmp_path}",
                                                    "student.inherit_exclude=[single_blocks.*.linear1.weight@rows=x]"],
                    world_size=8)
