"""Evaluation during training: `sample.eval_every` logs FID and the teacher-relative error (checked against
`launch.sample` + `launch.evaluate` run on the exported checkpoint), the router maps are labelled
figures whose numbers are the routers' own decisions, and the new keys are validated up front."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from launch.sample import main as sample_main
from models import build_model
from models.convert import save_safetensors
from models.diffusion import build_objective
from models.flops import block_cost, embed_cost
from tests.helpers import randomize_
from tests.metrics_helpers import save_random_inception
from tests.sample_helpers import TINY_DYN
from tests.trainer_utils import TINY_ARGS, assert_ok, run_train, write_config
from trainer.config import ConfigError, SampleConfig, load_config
from trainer.evaluate import router_map, teacher_relative_error
from trainer.sampling import Sampler

TAGS = ("eval/fid", "eval/fid_teacher", "eval/teacher_mse_latents", "eval/teacher_mse_images", "eval/teacher_psnr_images")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    torch.manual_seed(0)
    teacher = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=1, std=0.05)
    save_safetensors(teacher.state_dict(), teacher.config, root / "teacher.safetensors")
    inception = save_random_inception(str(root / "inception.pth"))
    from trainer.metrics.frechet import stats_of
    from trainer.metrics.inception import InceptionFeatures

    images = np.random.default_rng(0).integers(0, 256, (8, 8, 8, 3), dtype=np.uint8)
    ref = stats_of(InceptionFeatures(inception)(images)["pool"])
    np.savez(root / "ref.npz", mu=ref.mu, sigma=ref.sigma)
    return {"teacher": root / "teacher.safetensors", "inception": inception, "ref": root / "ref.npz"}


def _scalars(run) -> dict[str, float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    ea = EventAccumulator(str(run / "tb"), size_guidance={"scalars": 0, "images": 0})
    ea.Reload()
    return {tag: [(e.step, e.value) for e in ea.Scalars(tag)] for tag in ea.Tags()["scalars"] if tag.startswith("eval/")}, ea


def test_quality_vs_step_matches_launch_sample_and_launch_evaluate(files, tmp_path):
    """A LiT student distilled on 2 DDP ranks logs, at step 4, the FID against a reference, the FID and MSE
    against its teacher; sampling the exported EMA and the teacher with launch.sample (1 process, same
    seed and chunk size) and scoring them with launch.evaluate's code gives the same numbers."""
    from trainer.export import export_run
    from trainer.metrics.evaluator import EvalSettings, evaluate

    sample = {"eval_every": 4, "eval_num": 5, "eval_batch": 3, "steps": 3, "method": "ddim", "cfg_scale": 1.5,
              "seed": 5, "inception": files["inception"], "fid_ref": str(files["ref"])}
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", student={"init": "inherit"}, teacher={"path": str(files["teacher"])},
                       train={"steps": 4, "global_batch": 8, "log_every": 2}, checkpoint={"every": 4, "async_save": False},
                       optim={"lr": 2e-3}, sample=sample)
    run = tmp_path / "run"
    assert_ok(run_train(cfg, [f"run_dir={run}", "engine.kind=ddp"], nproc=2))
    logged, _ = _scalars(run)
    assert set(TAGS) <= set(logged), sorted(logged)
    assert all(len(logged[t]) == 1 and logged[t][0][0] == 4 for t in TAGS)
    rows = [json.loads(line) for line in (run / "eval.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [4] and rows[0]["eval/fid"] == pytest.approx(logged["eval/fid"][0][1], rel=1e-6)

    ema = export_run(run, tmp_path / "exp")["ema"]
    common = ["--num-samples", "5", "--balanced", "--chunk", "3", "--method", "ddim", "--steps", "3", "--cfg-scale", "1.5",
              "--seed", "5", "--no-progress"]
    assert sample_main([str(ema), "--out", str(tmp_path / "s"), *common]) == 0
    assert sample_main([str(files["teacher"]), "--out", str(tmp_path / "t"), *common]) == 0
    res = evaluate(EvalSettings(samples=str(tmp_path / "s" / "samples.npz"), teacher=str(tmp_path / "t" / "samples.npz"),
                                ref=str(files["ref"]), metrics=["fid", "teacher_fid", "teacher_mse"], inception=files["inception"]))
    m = res["metrics"]
    value = {t: logged[t][0][1] for t in TAGS}  # TensorBoard stores float32
    assert m["teacher_mse_images"] > 0 and m["teacher_mse_latents"] > 0  # the student is not its teacher
    assert value["eval/teacher_mse_latents"] == pytest.approx(m["teacher_mse_latents"], rel=1e-6)
    assert value["eval/teacher_mse_images"] == pytest.approx(m["teacher_mse_images"], rel=1e-6)
    assert value["eval/teacher_psnr_images"] == pytest.approx(m["teacher_psnr_images"], rel=1e-6)
    # FID: the same images, Inception run in chunks of 3 + 2 there and of 5 here (float32 rounding of batches)
    assert value["eval/fid"] == pytest.approx(m["fid"], rel=1e-3)
    assert value["eval/fid_teacher"] == pytest.approx(m["teacher_fid"], rel=1e-3)


def test_teacher_relative_error_of_a_model_against_itself_is_zero_and_is_the_npz_mse(files, tmp_path):
    """The function the quickstart report calls: one process, per-sample seeds as launch.sample's."""
    from models import load_pretrained

    teacher = load_pretrained(files["teacher"])
    student = randomize_(load_pretrained(files["teacher"]), seed=3, std=0.01)
    sampler = Sampler(method="ddim", steps=3, cfg_scale=1.5, seed=2)
    objective = build_objective("gaussian")
    same = teacher_relative_error(teacher, teacher, objective, sampler, 5, chunk=2)
    assert same == {"teacher_mse_latents": 0.0, "teacher_mse_images": 0.0, "teacher_psnr_images": float("inf")}
    got = teacher_relative_error(student, teacher, objective, sampler, 5, chunk=2)
    ref = {}
    for name in ("s", "t"):
        path = tmp_path / f"{name}.safetensors"
        m = student if name == "s" else teacher
        save_safetensors(m.state_dict(), m.config, path)
        assert sample_main([str(path), "--out", str(tmp_path / name), "--num-samples", "5", "--balanced", "--chunk", "2",
                            "--method", "ddim", "--steps", "3", "--cfg-scale", "1.5", "--seed", "2", "--no-progress"]) == 0
        with np.load(tmp_path / name / "samples.npz") as z:
            ref[name] = (z["latents"].astype(np.float64), z["arr_0"][..., :1].astype(np.float64) / 255)
    assert got["teacher_mse_latents"] == pytest.approx(float(np.mean((ref["s"][0] - ref["t"][0]) ** 2)), rel=1e-12)
    assert got["teacher_mse_images"] == pytest.approx(float(np.mean((ref["s"][1] - ref["t"][1]) ** 2)), rel=1e-12)
    assert got["teacher_mse_latents"] > 0


def test_router_map_holds_the_routers_decisions_and_the_layer_flops():
    torch.manual_seed(0)
    model = randomize_(build_model("dydit-s/2", **TINY_DYN), seed=1, std=0.05).eval()
    with torch.no_grad():
        for b in model.blocks:
            torch.nn.init.normal_(b.attn_rate.router.weight, std=0.5)
            torch.nn.init.normal_(b.mlp_rate.router.weight, std=0.5)
    cfg = SampleConfig(num=4, steps=6, method="ddim", cfg_scale=1.5)
    rmap = router_map(model, model, build_objective("gaussian"), cfg, torch.device("cpu"))
    assert rmap.timesteps.tolist() == build_objective("gaussian").sampling_timesteps(6, "ddim").float().tolist()
    with torch.no_grad():
        for k, t in enumerate(rmap.timesteps):
            emb = model.t_embedder(t[None])
            for layer, block in enumerate(model.blocks):  # width decisions are sigmoid(router(t_emb)) > 0.5, unit 0 on
                assert torch.equal(rmap.units["heads"][layer, :, k], block.attn_rate(emb)[0])
                assert torch.equal(rmap.units["channels"][layer, :, k], block.mlp_rate(emb)[0])
    assert 0 < float(rmap.units["heads"].mean()) < 1 and len({tuple(c) for c in rmap.units["heads"].flatten(0, 1).T.tolist()}) > 1
    cost = block_cost(model.config)
    closed = (rmap.units["heads"].mean(1) * cost.attn + rmap.units["channels"].mean(1) * rmap.tokens * cost.mlp).double()
    assert torch.allclose(rmap.layer_flops, closed, rtol=1e-6)
    fixed = model.config.depth * (cost.adaln + cost.routers) + sum(embed_cost(model.config).values())
    assert torch.allclose(rmap.flops, rmap.layer_flops.sum(0) + fixed, rtol=1e-9)


def test_router_figures_reach_tensorboard(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", model="dydit-s/2", args={"num_heads": 4, "mlp_groups": 4},
                       train={"steps": 2, "log_every": 2}, sample={"every": 2, "num": 4, "steps": 3, "method": "ddim"},
                       checkpoint={"every": 2})
    run = tmp_path / "r"
    assert_ok(run_train(cfg, [f"run_dir={run}"]))
    _, ea = _scalars(run)
    assert {"routers/heads", "routers/channels", "routers/tokens", "routers/flops"} <= set(ea.Tags()["images"])
    img = ea.Images("routers/heads")[0]
    assert img.width > 300 and img.height > 200  # a figure with axes, not a (layers × steps)-pixel bitmap
    assert (run / "samples" / "routers_flops_00000002.png").exists()


@pytest.mark.parametrize("overrides, message", [
    (["sample.eval_every=2"], "nothing to compute: set sample.inception"),
    (["sample.eval_every=2", "sample.inception=/nowhere.pth"], "no such file or directory"),
    (["sample.eval_every=2", "sample.eval_num=1", "sample.inception={inc}"], "sample.eval_num=1 is invalid"),
    (["sample.eval_every=2", "sample.fid_ref={inc}"], "FID needs the Inception network"),
    (["sample.every=2", "sample.method=euler"], "a gaussian sampler"),
    (["sample.eval_batch=0"], "sample.eval_batch=0 is invalid"),
])
def test_sample_keys_are_validated_before_any_work(files, tmp_path, overrides, message):
    cfg = write_config(tmp_path / "c.yaml")
    with pytest.raises(ConfigError, match=message):
        load_config(cfg, [o.format(inc=files["inception"]) for o in overrides], world_size=1)
