"""`python -m launch.quickstart --quick`: the README's first command, as a smoke run of every stage
(tiny models, a few steps, a few samples), then again into the same directory to check reuse."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer_utils import REPO, assert_ok, base_env

MODELS = ("teacher", "lit", "dydit", "dylit")


def quickstart(out: Path, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.quickstart", "--quick", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=timeout)


def _mtimes(out: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in out.rglob("*") if p.is_file() and not p.name.startswith("report")}


def test_quick_pipeline_writes_its_artifacts_and_reuses_finished_stages(tmp_path):
    out = tmp_path / "qs"
    first = quickstart(out)
    assert_ok(first)
    report = json.loads((out / "report.json").read_text())
    assert [r["model"] for r in report["rows"]] == list(MODELS)
    for r in report["rows"]:
        for key in ("accuracy", "fd", "gflops", "gflops_vs_teacher", "sample_time_s", "sample_time_vs_teacher",
                    "params_m", "train_steps"):
            assert isinstance(r[key], float | int), (r["model"], key)
        assert 0.0 <= r["accuracy"] <= 1.0 and r["fd"] >= 0.0 and r["sample_time_s"] > 0
        assert (out / f"samples_{r['model']}.png").stat().st_size > 0
        assert (out / r["model"] / "export" / "ema.safetensors").exists()
    rows = {r["model"]: r for r in report["rows"]}
    assert rows["teacher"]["sample_time_vs_teacher"] == 1.0 and rows["teacher"]["flops_ratio"] is None
    for name in ("dydit", "dylit"):  # realised while sampling, on the sliced path
        assert 0.0 < rows[name]["flops_ratio"] <= 1.0 and rows[name]["flops_target"] <= 0.8
        assert rows[name]["gflops"] <= rows[name]["gflops_static"]
    assert rows["lit"]["flops_ratio"] is None
    teacher = torch.load(out / "eval" / "teacher.samples.pt", weights_only=True)
    assert rows["teacher"]["teacher_mse"] is None
    for name in MODELS[1:]:  # the teacher-relative error: the saved samples, paired, pixels in [0, 1]
        student = torch.load(out / "eval" / f"{name}.samples.pt", weights_only=True)
        assert student.shape == teacher.shape == (report["eval"]["samples"], 1, 8, 8)
        u8 = lambda x: torch.clamp(127.5 * x + 128, 0, 255).to(torch.uint8).double() / 255  # noqa: E731
        want = float(((u8(student) - u8(teacher)) ** 2).mean())
        assert rows[name]["teacher_mse"] == pytest.approx(want, rel=1e-12) and want > 0
        assert rows[name]["teacher_psnr"] == pytest.approx(-10 * math.log10(want), rel=1e-12)
    assert set(report["bars"]) == {"teacher_accuracy_ge_0.80", *(f"{s}_accuracy_ge_0.9x_teacher" for s in MODELS[1:])}
    assert report["eval"]["samples"] > 0 and report["timing"]["batch"] > 0
    assert "| teacher |" in first.stdout and (out / "report.md").read_text().startswith("# Quickstart report")

    before = _mtimes(out)
    second = quickstart(out)
    assert_ok(second)
    assert "training" not in second.stdout, second.stdout
    for stage in (*MODELS, "classifier", "timing"):
        assert f"[quickstart] {stage}: reusing" in second.stdout, stage
    assert _mtimes(out) == before  # nothing retrained, re-exported, resampled or re-timed
    again = json.loads((out / "report.json").read_text())
    assert again["rows"] == report["rows"]
    assert all(s["reused"] for s in again["stages"].values())

    # a stage interrupted after its last checkpoint (no export yet) resumes: no step is trained again
    metrics = (out / "teacher" / "metrics.jsonl").read_text()
    (out / "teacher" / "export" / "ema.safetensors").unlink()
    stamp = json.loads((out / "teacher" / "stage.json").read_text())
    (out / "teacher" / "stage.json").write_text(json.dumps({"key": stamp["key"], "status": "training"}))
    third = quickstart(out)
    assert_ok(third)
    assert (out / "teacher" / "metrics.jsonl").read_text() == metrics
    assert "[quickstart] lit: reusing" in third.stdout  # same teacher bytes: the students stay valid
    strip = lambda rows: [{k: v for k, v in r.items() if k != "train_s"} for r in rows]  # noqa: E731
    assert strip(json.loads((out / "report.json").read_text())["rows"]) == strip(report["rows"])

    # --peft: the finished stages are reused, each student is distilled again with adapters on its frozen
    # base and compared with its full fine-tune (plain LoRA exported merged, TD-LoRA kept at runtime)
    fourth = quickstart(out, "--peft", "lora,tdlora")
    assert_ok(fourth)
    assert "[quickstart] dydit: reusing" in fourth.stdout
    peft = json.loads((out / "report.json").read_text())
    rows = {r["model"]: r for r in peft["rows"]}
    variants = [f"{s}-{m}" for m in ("lora", "tdlora") for s in MODELS[1:]]
    assert list(rows) == [*MODELS, *variants]
    from models import load_pretrained
    from models.lora import lora_layers

    for name in variants:
        full, method = name.split("-")
        assert rows[name]["peft"] == method and 0 < rows[name]["trainable_params"] < rows[full]["trainable_params"]
        assert rows[name]["trainable_vs_full"] == rows[name]["trainable_params"] / rows[full]["trainable_params"]
        assert rows[name]["accuracy_vs_full"] == pytest.approx(rows[name]["accuracy"] / max(rows[full]["accuracy"], 1e-9))
        assert rows[name]["sample_time_s"] is None  # scored, not timed
        assert bool(lora_layers(load_pretrained(out / name / "export" / "ema.safetensors"))) == (method == "tdlora")
    assert {"dydit-tdlora_accuracy_ge_0.9x_full", "dydit-tdlora_trainable_le_0.1x_full"} <= set(peft["bars"])
    assert "| dydit | tdlora |" in fourth.stdout


def test_other_settings_into_a_used_directory_are_refused(tmp_path):
    out = tmp_path / "qs"
    (out / "teacher").mkdir(parents=True)
    (out / "teacher" / "stage.json").write_text(json.dumps({"key": "0000000000000000", "status": "done"}))
    proc = quickstart(out, timeout=120)
    assert proc.returncode == 2
    assert "made with other settings" in proc.stderr and "--out" in proc.stderr


def test_shards_are_written_once_and_feed_the_stage_configs(tmp_path):
    from data import build_loader
    from data.config import DataConfig
    from data.manifest import MANIFEST
    from trainer.quickstart import Options, stage_config, write_shards

    opts = Options(out=tmp_path / "qs", quick=True, data="mds")
    shards = write_shards(opts)
    assert (shards / MANIFEST).exists()
    manifest = json.loads((shards / MANIFEST).read_text())
    assert sum(s["samples"] for g in manifest["groups"] for s in g["shards"]) == 1797
    assert write_shards(opts) == shards  # reused, not rewritten
    cfg = stage_config("teacher", opts, shards)
    assert cfg.data.format == "mds" and cfg.data.path == str(shards)
    loader = build_loader(DataConfig(format="mds", path=str(shards), batch_size=16), 0, 1)
    batch = next(iter(loader))
    assert tuple(batch["x"].shape) == (16, 1, 8, 8) and batch["y"].max() <= 9
    assert float(batch["x"].min()) >= -1.0 and float(batch["x"].max()) <= 1.0
    if hasattr(loader, "close"):
        loader.close()


@pytest.mark.parametrize("name", MODELS)
def test_stage_configs_load_and_follow_the_recipes(name, tmp_path):
    """The YAML files are real configs (`launch.train` accepts them); students inherit and distil."""
    from trainer.config import load_config
    from trainer.quickstart import CONFIG_DIR

    from models import build_model
    from models.convert import read_checkpoint, save_safetensors
    from trainer.build import build_student, student_config

    # the teacher the teacher stage trains (its architecture; validation reads the file's header)
    teacher = build_model(student_config(load_config(CONFIG_DIR / "teacher.yaml", [], world_size=1)))
    path = tmp_path / "teacher.safetensors"
    save_safetensors(teacher.state_dict(), teacher.config, path)
    overrides = [] if name == "teacher" else [f"teacher.path={path}"]
    cfg = load_config(CONFIG_DIR / f"{name}.yaml", overrides, world_size=1)  # checks the pairing too
    if name == "teacher":
        assert cfg.teacher is None and cfg.student.init == "random"
        return
    assert cfg.student.init == "inherit"
    assert cfg.distill.lambda_noise > 0 and cfg.distill.lambda_var > 0
    if name.startswith("dy"):
        assert cfg.dynamic.flops_target <= 0.8
    # The student inherits all of the teacher but (LiT) attention.
    _, report = build_student(cfg, read_checkpoint(path, lazy=True))
    assert not report.unused
    linear = student_config(cfg).attention == "linear"
    assert report.skipped and all(".attn." in k for k in report.skipped) if linear else not report.skipped


def test_flops_of_reports_what_the_routers_switched_on():
    """Hand-made masks: half the heads and channel groups off for every token → realised GFLOPs
    below static, and the DyDiT ratio (attention + MLP) at one half."""
    from models import build_model
    from models.flops import realised_flops, realised_ratio, static_gflops
    from trainer.quickstart import flops_of

    m = build_model("dydit-s/2", input_size=8, in_channels=1, num_classes=10, depth=2, hidden_size=64, num_heads=4,
                    mlp_groups=4)
    cfg, b = m.config, 3
    half = torch.tensor([1.0, 1.0, 0.0, 0.0]).expand(b, cfg.depth, 4)
    aux = {"head_masks": half, "channel_masks": half, "token_masks": torch.ones(b, cfg.depth, cfg.num_tokens)}
    aux["flops_ratio"] = realised_ratio(cfg, aux["head_masks"], aux["channel_masks"], aux["token_masks"])
    rec = flops_of(m, [aux, aux])
    assert rec["gflops_static"] == pytest.approx(static_gflops(cfg))
    assert rec["gflops"] == pytest.approx(float(realised_flops(cfg, aux).mean()) / 1e9)
    assert rec["gflops"] < rec["gflops_static"]
    assert rec["flops_ratio"] == pytest.approx(0.5, abs=1e-6)


def test_a_training_stage_runs_as_two_ddp_ranks(tmp_path):
    """The default on a 2-core CPU: each stage under torchrun with 2 DDP ranks (the --quick test above
    runs one process)."""
    from trainer.quickstart import Options, train_stage

    stage = train_stage("teacher", Options(out=tmp_path / "qs", quick=True, nproc=2), None)
    assert stage["nproc"] == 2 and Path(stage["weights"]).exists()
    assert "kind: ddp" in (tmp_path / "qs" / "teacher" / "config.yaml").read_text()
