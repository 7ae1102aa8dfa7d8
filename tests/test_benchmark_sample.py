"""`launch.benchmark sample`: whole sampling loops of a teacher and its students, dynamic students whose
routers follow a per-timestep schedule, FLOPs and ideal speed-ups from the models' own accounting."""
from __future__ import annotations

import json

import pytest
import torch

from launch.benchmarks import sample as bench
from models import build_model, family_of, model_config
from models.diffusion import build_objective

QUICK = {"depth": 2, "hidden_size": 96, "input_size": 8}


@pytest.fixture(scope="module")
def quick():
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert bench.main(["--case", "quick", "--json"]) == 0
    return json.loads(out.getvalue())


def test_every_model_is_timed_through_whole_loops_with_flops_from_the_family(quick):
    rows = {r["model"]: r for r in quick["rows"]}
    assert list(rows) == ["dit-s/2", "lit-s/2", "dydit-s/2", "dylit-s/2"]
    forwards = 4 * 2  # 4 DDIM steps, guided: conditional + null rows
    for name in ("dit-s/2", "lit-s/2"):  # static models: the family's count per forward × forwards per image
        cfg = model_config(name, **QUICK)
        assert rows[name]["gflops_per_image"] * 1e9 == pytest.approx(family_of(cfg).flops(cfg)["total"] * forwards, rel=1e-9)
    for name in ("dydit-s/2", "dylit-s/2"):
        r = rows[name]
        assert 0.3 < r["flops_ratio"] < 0.8  # the schedule drops about half the width
        assert r["router_patterns"] == 4  # a new width pattern at every one of the 4 timesteps
    for r in rows.values():
        assert r["ideal_speedup"] == pytest.approx(1 / r["flops_ratio"])
        assert r["images_per_s"] > 0 and r["realised_over_ideal"] == pytest.approx(r["speedup"] / r["ideal_speedup"])
    assert set(quick["schedule_fit"].values()) == {1.0}


def test_the_router_schedule_is_followed_at_every_sampling_timestep():
    torch.manual_seed(0)
    model = build_model("dydit-s/2", **QUICK).eval()
    t = build_objective("gaussian").sampling_timesteps(20, "ddpm").float()
    assert bench.fit_router_schedule_(model, t) == 1.0
    with torch.no_grad():
        emb = model.t_embedder(t)
        for layer, block in enumerate(model.blocks):
            heads = block.attn_rate(emb)
            want = torch.tensor([max(1, round(6 * bench.width_fraction(float(v), layer, 2))) for v in t])
            assert torch.equal(heads.sum(1).long(), want)  # the first n units on, n from the DyDiT-like curve
            assert torch.equal(heads, (torch.arange(6)[None] < want[:, None]).float())
    assert want[0] < want[-1]  # t = 999 first: fewer units at the noise end than at the data end


def test_the_gpu_case_needs_cuda(capsys):
    if torch.cuda.is_available():
        pytest.skip("CUDA is here: the gpu case would run")
    assert bench.main(["--case", "gpu"]) == 2
    assert "needs CUDA" in capsys.readouterr().err


def test_the_bf16_path_runs_the_same_loops(capsys):
    """The gpu case's dtype (weights and autocast in bf16), exercised on the CPU with the tiny models."""
    assert bench.main(["--case", "quick", "--dtype", "bf16", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["dtype"] == "bf16" and [r["router_patterns"] for r in res["rows"]] == [None, None, 4, 4]


def test_text_families_are_timed_with_their_condition_sizes():
    """A text family (the test one) gets text embeddings of the sizes its config names."""
    m = build_model("tests.toy_text_family:text-toy", text_len=16)
    cond = bench.condition(m, 3, torch.device("cpu"))
    assert cond["text_emb"].shape == (3, 16, 32) and cond["text_mask"].all()


def test_a_text_family_runs_through_the_same_loop():
    case = bench.Case("text", (bench.Setting("toy text", ("tests.toy_text_family:text-toy",), {"text_len": 16}, batch=2,
                                             steps=2, cfg_scale=3.0, repeats=1),))
    res = bench.run_case(case)
    (row,) = res["rows"]
    cfg = model_config("tests.toy_text_family:text-toy", text_len=16)
    assert row["method"] == "euler"  # a C-channel output is timed as a flow model
    assert row["gflops_per_image"] * 1e9 == pytest.approx(family_of(cfg).flops(cfg, None, 16)["total"] * 2 * 2)
    missing = bench.run_case(bench.Case("none", (bench.Setting("absent", ("nosuch-family-xl/2",)),)))
    assert missing["rows"] == [] and "not registered" in missing["skipped"]["absent"]
