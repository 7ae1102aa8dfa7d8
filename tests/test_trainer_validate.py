"""Validation that knows the family: every combination that used to crash at the first step (or was
silently ignored) is a ConfigError from `load_config`, before any process group, naming key and fix."""
from __future__ import annotations

import subprocess
import sys

import pytest
import yaml

from models import build_model
from models.convert import save_safetensors
from trainer.build import build_objective
from trainer.config import ConfigError, load_config
from tests.trainer_utils import REPO, base_env, write_config

DIGITS = {"input_size": 8, "in_channels": 1, "num_classes": 10, "depth": 2, "hidden_size": 64, "num_heads": 2}


def teacher_file(tmp_path, **args):
    model = build_model("dit-s/2", **{**DIGITS, **args})
    path = tmp_path / "teacher.safetensors"
    save_safetensors(model.state_dict(), model.config, path)
    return path


def load(tmp_path, overrides=(), **sections):
    return load_config(write_config(tmp_path / "c.yaml", **sections), list(overrides), world_size=1)


@pytest.mark.parametrize("overrides,match", [
    (["diffusion.objective=flow"], r"diffusion.objective='flow' does not fit .* 2 channels for 1 input .*learn_sigma=false"),
    (["data.cond=text_emb", "data.format=wds", "data.path=/x"], r"data.cond='text_emb'.*consumes class.*set data.cond='class'"),
    (["diffusion.timestep_sampling=logit_normal"], r"timestep_sampling='logit_normal' is not one the gaussian objective has"),
    (["diffusion.objective=flow", "student.args.learn_sigma=false", "diffusion.timestep_sampling=stratified"],
     r"timestep_sampling='stratified' is not one the flow objective has"),
    (["diffusion.shift=3.0"], r"diffusion.shift=3.0 has no effect with diffusion.objective='gaussian'"),
    (["optim.betas=[0.9]"], r"optim.betas=\[0.9\].*two numbers in \[0, 1\)"),
    (["optim.betas=[0.9,1.5]"], r"optim.betas"),
    (["data.batch_size=8"], r"data.batch_size=8.*not a setting: the per-rank batch is train.micro_batch \(16"),
])
def test_combinations_that_crashed_or_were_ignored_are_config_errors(tmp_path, overrides, match):
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, overrides)


def test_a_saved_config_with_the_derived_batch_size_still_loads(tmp_path):
    cfg = load(tmp_path, ["data.batch_size=16"])  # what a first-wave run's config.yaml holds
    assert cfg.data.batch_size == cfg.train.micro_batch == 16


def test_flow_options_reach_the_objective(tmp_path):
    cfg = load(tmp_path, ["diffusion.objective=flow", "student.args.learn_sigma=false", "diffusion.dynamic_shift=true",
                          "diffusion.timestep_sampling=logit_normal", "diffusion.logit_mean=0.3", "diffusion.logit_std=0.7"])
    obj = build_objective(cfg)
    assert (obj.timestep_sampling, obj.logit_mean, obj.logit_std, obj.dynamic_shift) == ("logit_normal", 0.3, 0.7, True)
    assert obj.shift_factor(4096) == pytest.approx(2.718281828 ** 1.15)


def test_teacher_student_mismatch_is_read_from_the_header(tmp_path):
    teacher = teacher_file(tmp_path, hidden_size=96)
    with pytest.raises(ConfigError, match=r"student.init='inherit'.*student.args.hidden_size=64 vs 96"):
        load(tmp_path, student={"model": "dit-s/2", "args": DIGITS, "init": "inherit"}, teacher={"path": str(teacher)})
    with pytest.raises(ConfigError, match=r"student.args.num_classes=5 but the teacher has num_classes=10"):
        load(tmp_path, student={"model": "lit-s/2", "args": {**DIGITS, "num_classes": 5}, "init": "random"},
             teacher={"path": str(teacher)})


def test_a_teacher_of_another_family_is_refused(tmp_path):
    toy = build_model("tests.toy_family:toy-s")
    path = tmp_path / "toy.safetensors"
    save_safetensors(toy.state_dict(), toy.config, path)
    with pytest.raises(ConfigError, match=r"teacher.path: the file holds a tests.toy_family:toy-family model"):
        load(tmp_path, student={"model": "lit-s/2", "args": DIGITS, "init": "inherit"}, teacher={"path": str(path)})


def test_launch_train_exits_2_before_any_process_group(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", diffusion={"objective": "flow"})
    proc = subprocess.run([sys.executable, "-m", "launch.train", str(cfg), f"run_dir={tmp_path / 'run'}"], cwd=REPO,
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "diffusion.objective='flow' does not fit" in proc.stderr
    assert not (tmp_path / "run").exists()
