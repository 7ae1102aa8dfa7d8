"""`python -m launch.quickstart --family pixart|flux --quick`: the text-to-image quickstart as a smoke run of
every stage (captioned-digits shards → random T5 / CLIP embeddings → teachers → students → scores), the
held-out templates provably absent from what training reads, and reuse on a second run."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.trainer_utils import REPO, assert_ok, base_env


def quickstart(out: Path, *args: str, timeout: int = 600) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "launch.quickstart", "--quick", "--out", str(out), *args]
    return subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def pixart_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("qs") / "pixart"
    proc = quickstart(out, "--family", "pixart")
    assert_ok(proc)
    return out, proc


def _rows(out: Path) -> dict[str, dict]:
    return {r["model"]: r for r in json.loads((out / "report.json").read_text())["rows"]}


def test_pixart_quick_run_scores_every_model_on_both_template_splits_and_reuses_its_stages(pixart_run):
    out, first = pixart_run
    report = json.loads((out / "report.json").read_text())
    rows = _rows(out)
    assert list(rows) == ["teacher", "lit", "dydit", "dylit"]
    assert report["family"] == "pixart" and report["data"] == "wds" and report["reference"] == "teacher"
    for name, r in rows.items():
        assert r["mode"] == "cfg" and r["teacher"] == (None if name == "teacher" else "teacher")
        for key in ("accuracy_seen", "accuracy_held_out", "fd", "gflops", "sample_time_s", "sample_time_vs_teacher"):
            assert isinstance(r[key], float), (name, key)
        assert 0 <= r["accuracy_seen"] <= 1 and 0 <= r["accuracy_held_out"] <= 1 and r["fd"] >= 0
        assert (out / f"samples_{name}.png").stat().st_size > 0
    for name in ("dydit", "dylit"):  # realised on the sliced path while sampling
        assert 0 < rows[name]["flops_ratio"] <= 1 and rows[name]["flops_target"] <= 0.7
        assert rows[name]["gflops"] <= rows[name]["gflops_static"]
    evals = {n: json.loads((out / "eval" / f"{n}.json").read_text()) for n in rows}
    prompts = [json.loads(line) for line in (out / "shards" / "wds-text" / "prompts.jsonl").read_text().splitlines()]
    held = sum(p["held_out"] for p in prompts)
    assert held == 30 and evals["teacher"]["n"] == len(prompts) * report["eval"]["per_prompt"]
    # the overall accuracy is the sample-weighted mean of the two splits
    t = evals["teacher"]
    mixed = (t["accuracy_seen"] * (len(prompts) - held) + t["accuracy_held_out"] * held) / len(prompts)
    assert t["accuracy"] == pytest.approx(mixed, abs=1e-6)
    assert {"teacher_held_out_accuracy_ge_0.80", "lit_held_out_accuracy_ge_0.9x_teacher",
            "peak_memory_le_4GB"} <= set(report["bars"])
    md = (out / "report.md").read_text()
    assert md.startswith("# Quickstart report: pixart") and "text encoders are random" in md
    assert "| dydit | dydit-pixart-sigma-xl/2 | CFG" in first.stdout

    second = quickstart(out, "--family", "pixart")
    assert_ok(second)
    assert ": training " not in second.stdout  # no stage trains again
    for stage in ("shards", "teacher", "lit", "dydit", "dylit", "classifier", "timing"):
        assert f"[quickstart] {stage}: reusing" in second.stdout, stage
    assert all(s["reused"] for s in json.loads((out / "report.json").read_text())["stages"].values())
    assert _rows(out) == rows


def test_held_out_templates_are_absent_from_the_text_embedding_shards_training_reads(pixart_run):
    """Read back what the stages trained on: every caption is a training template applied to its digit,
    and every sample's T5 embedding is its own (training) prompt's and no held-out prompt's."""
    from data import DataConfig, build_loader, load_prompt_embeddings
    from data.captions import TEMPLATES

    out, _ = pixart_run
    shards = out / "shards" / "wds-text"
    cfg = json.loads(json.dumps(_stage_data(out / "teacher")))
    assert cfg["path"] == str(shards) and cfg["cond"] == "text_emb"
    rows, prompts = load_prompt_embeddings(str(shards))
    index = {r["prompt"]: i for i, r in enumerate(rows)}
    held = [i for i, r in enumerate(rows) if r["held_out"]]
    # 4 captions of each of the 1,797 digits = 12 batches of 599: one epoch, nothing dropped
    loader = build_loader(DataConfig(format="wds", path=str(shards), input="image", cond="text_emb", batch_size=599,
                                     shuffle=False), 0, 1)
    seen_keys, templates = set(), set()
    for _, batch in zip(range(12), loader):
        for j, key in enumerate(batch["key"]):
            seen_keys.add(key)
            template = TEMPLATES[int(key.split("-")[1])]
            templates.add(template.id)
            assert not template.held_out
            own = index[template.caption(int(batch["y"][j]))]
            n = int(batch["text_mask"][j].sum())
            emb = batch["text_emb"][j, :n].float()
            # same encoder, same caption: equal up to the bf16 rounding of the stored embeddings (~1e-2 at |x| ~ 1-4)
            assert torch.allclose(emb, prompts["text_emb"][own, :n].float(), atol=0.05)
            for h in held:  # no held-out prompt's embedding (its own length) is a training sample
                m = int(prompts["text_mask"][h].sum())
                assert m != n or not torch.allclose(emb, prompts["text_emb"][h, :m].float(), atol=0.05)
    assert len(seen_keys) == 4 * 1797 and templates == {t.id for t in TEMPLATES if not t.held_out}
    if hasattr(loader, "close"):
        loader.close()


def _stage_data(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())["data"]


def test_flux_quick_run_distils_the_guidance_input_and_runs_the_ablations_on_mds(tmp_path):
    out = tmp_path / "flux"
    proc = quickstart(out, "--family", "flux", "--data", "mds", "--ablations")
    assert_ok(proc)
    report = json.loads((out / "report.json").read_text())
    rows = _rows(out)
    assert list(rows) == ["teacher", "teacher-cfg", "guided", "dyflux", "lit-flux", "lit-flux-norope", "dyflux-mlpskip",
                          "dyflux-fkd", "lit-flux-fkd", "dyflux-tdlora"]
    assert report["data"] == "mds" and report["reference"] == "guided"
    assert (rows["teacher"]["mode"], rows["teacher-cfg"]["mode"], rows["guided"]["mode"]) == ("plain", "cfg", "guidance")
    assert rows["guided"]["teacher"] == "teacher" and rows["dyflux"]["teacher"] == "guided"
    assert rows["dyflux-mlpskip"]["teacher"] == "guided" and rows["dyflux-mlpskip"]["arch"] == "dyflux-dev"
    # ablations are scored, not timed; every default row is timed relative to the guided teacher
    assert rows["lit-flux-norope"]["sample_time_s"] is None and rows["guided"]["sample_time_vs_teacher"] == 1.0
    guided = yaml_config(out / "guided")
    assert guided["distill"]["guidance_distill"] and guided["student"]["args"].get("guidance_embed") is None
    assert yaml_config(out / "lit-flux-norope")["student"]["args"]["linear_rope"] is False
    assert yaml_config(out / "dyflux-mlpskip")["student"]["args"]["single_token_skip"] == "mlp"
    assert yaml_config(out / "dyflux-fkd")["distill"]["features"] == ["double_blocks.?", "single_blocks.?"]
    metrics = [json.loads(line) for line in (out / "dyflux-fkd" / "metrics.jsonl").read_text().splitlines()]
    assert any("loss/feature/single_blocks.0" in m for m in metrics)
    stages = report["stages"]  # the TD-LoRA row trains adapters (and the routers) on the frozen base only
    assert yaml_config(out / "dyflux-tdlora")["peft"]["method"] == "tdlora"
    assert 0 < stages["dyflux-tdlora"]["trainable_params"] < stages["dyflux"]["trainable_params"]
    md = (out / "report.md").read_text()
    assert "Ablations (--ablations)" in md and "Guidance (FLUX-dev's way)" in md and "CLIPTextModel" in md

    from models import load_pretrained

    base, student = load_pretrained(out / "teacher" / "export" / "ema.safetensors"), load_pretrained(
        out / "guided" / "export" / "ema.safetensors")
    assert not base.config.guidance_embed and student.config.guidance_embed


def yaml_config(run_dir: Path) -> dict:
    import yaml

    return yaml.safe_load((run_dir / "config.yaml").read_text())


def test_a_guidance_input_starts_as_the_unguided_flux_teacher():
    """The guided stage inherits the base teacher and adds `guidance_in` with a zero output: at step 0 it
    gives the base's output for every g, so guidance distillation starts from the teacher."""
    from models import build_model
    from models.flux_family import FLUX
    from models.inherit import plan_inheritance

    args = dict(input_size=8, in_channels=1, hidden_size=32, num_heads=2, depth=1, depth_single=1, axes_dim=[4, 6, 6],
                context_in_dim=16, vec_in_dim=8, text_len=5)
    torch.manual_seed(0)
    base = build_model("flux-schnell", **args)
    with torch.no_grad():
        for p in base.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # no zero layer left: the output depends on everything
    guided = build_model("flux-dev", **args)
    plan = plan_inheritance(guided, base.state_dict(), FLUX.inherit_exclude(base.config, guided.config))
    plan.apply(guided)
    assert {k.split(".")[0] for k in plan.initialised} == {"guidance_in"}  # all else is the base's
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([250.0, 750.0])
    te, tp = torch.randn(2, 5, 16), torch.randn(2, 8)
    with torch.no_grad():
        ref = base(x, t, text_emb=te, text_pooled=tp)
        for g in (1.0, 4.0):
            torch.testing.assert_close(guided(x, t, text_emb=te, text_pooled=tp, guidance=torch.full((2,), g)), ref)


def test_text_to_image_data_must_be_shards():
    proc = subprocess.run([sys.executable, "-m", "launch.quickstart", "--family", "pixart", "--data", "digits"], cwd=REPO,
                          env=base_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--data wds or --data mds" in proc.stderr
