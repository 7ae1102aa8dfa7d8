"""`python -m launch.benchmark pixart`: the quick mode runs end to end and reports every number; the
blocks it times are the real ones (DyDiT's sliced block at ~half computes what its masked path does).
Behaviour only: wall-clock times are never asserted."""
from __future__ import annotations

import json

import pytest
import torch

from launch import benchmark
from launch.benchmarks import pixart as bench


@pytest.fixture(scope="module")
def quick_result():
    return bench.run(quick=True)


def test_quick_json_has_every_field(quick_result):
    res = json.loads(json.dumps(quick_result))
    assert res["suite"] == "pixart" and res["width"] == 144 and res["sampling"] == []
    assert [(r["tokens"], r["pass"]) for r in res["blocks"]] == [(64, "fwd+bwd"), (64, "fwd"), (256, "fwd+bwd"), (256, "fwd")]
    for r in res["blocks"]:
        for key in ("teacher_ms", "lit_ms", "dydit_ms", "lit_speedup", "lit_speedup_paired", "dydit_speedup",
                    "dydit_speedup_paired", "lit_flops_ratio", "lit_flops_ratio_full_width", "dydit_ideal_speedup"):
            assert r[key] > 0, key
        assert [len(v) for v in r["all_ms"].values()] == [2, 2, 2]
        assert r["lit_speedup"] == pytest.approx(r["teacher_ms"] / r["lit_ms"])
        assert 0.4 < r["dydit_flops_fraction"] < 0.8  # half the heads, groups and tokens; cross-attention fixed
    text = bench.format_report(quick_result)
    for r in quick_result["blocks"]:
        assert f"{r['lit_speedup']:>7.2f} [{r['lit_speedup_paired']:.2f}]" in text
    assert "quick mode" in text


def test_dydit_block_is_driven_to_half_and_sliced_matches_masked():
    width = 2 * bench.HEAD_DIM
    blocks = bench.build_blocks(width, torch.device("cpu"))
    case = bench.BlockCase((8, 8), 1)
    inp = bench.block_inputs(width, case, torch.device("cpu"), grad=False)
    dy = blocks["dydit"]
    bench.calibrate_tokens(dy, inp, case.grid)
    args = (inp["x"], inp["y"], inp["mask"], inp["t0"], inp["t_emb"], case.grid)
    with torch.no_grad():
        out_s, m = dy(*args, "sliced")
        out_m, _ = dy(*args, "masked")
    assert m["head"].mean() == 0.5 and m["channel"].mean() == 0.5 and abs(float(m["token"].mean()) - 0.5) < 0.05
    torch.testing.assert_close(out_s, out_m, rtol=1e-5, atol=1e-5)
    # the students inherited the teacher: LiT all but self-attention, DyDiT everything
    assert torch.equal(blocks["lit"].mlp.fc1.weight, blocks["teacher"].mlp.fc1.weight)
    assert torch.equal(blocks["dydit"].attn.qkv.weight, blocks["teacher"].attn.qkv.weight)


def test_whole_model_sampling_section_runs():
    tiny = dict(depth=1, hidden_size=2 * bench.HEAD_DIM, num_heads=2, caption_channels=16, model_max_length=4)
    rows = bench.bench_sampling((32,), 1, tiny, torch.device("cpu"), "fp32", repeats=1)
    assert rows[0]["resolution"] == 32 and rows[0]["tokens"] == 4 and rows[0]["teacher_ms"] > 0 and rows[0]["lit_ms"] > 0


def test_dispatcher_runs_the_suite(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda quick, width, device, dtype, sampling: {"quick": quick, "width": width})
    assert benchmark.main(["pixart", "--quick", "--json", "--width", "216"]) == 0
    assert json.loads(capsys.readouterr().out)["width"] == 216
    with pytest.raises(SystemExit):
        bench.main(["--width", "100"])
