"""`python -m launch.benchmark models`: the quick mode runs end to end and reports every number.

Wall-clock times are never asserted (they belong to the machine, not the code). Instead the suite
runs on a FLOPs clock (tests/bench_clocks.py: its `time.perf_counter` reads FlopCounterMode's running
count), under which a benchmark that times the right callables reports exactly the ratios of their
FLOPs: the attention rows must equal each layer's own forward+backward count, and the dynamic
model's realised speed-up must equal its ideal (FLOPs) speed-up.
"""
import json

import pytest
import torch

from launch import benchmark
from launch.benchmarks import models as bench
from tests.bench_clocks import FlopCounterMode, flop_count, install
from tests.helpers import tiny_inputs


@pytest.fixture(scope="module")
def quick_result():
    with pytest.MonkeyPatch.context() as mp:
        clock = FlopCounterMode(display=False)
        install(mp, bench, clock)
        with clock:
            return bench.run(quick=True)


def test_attention_rows_time_each_layer_forward_and_backward(quick_result):
    """On the FLOPs clock each median is 1000 × the FLOPs of one forward+backward of that layer, counted
    here on layers built afresh; so the three speed-ups are one ratio, softmax over LiT."""
    for r, case in zip(quick_result["attention"], bench.QUICK_ATTN):
        side = int(case.tokens**0.5)
        x = torch.randn(case.batch, case.tokens, bench.WIDTH, requires_grad=True)
        work = {}
        for name, kind, heads, dwc in (("softmax", "softmax", bench.SOFTMAX_HEADS, 0), ("lit", "linear", bench.LIT_HEADS, bench.DWC)):
            layer = bench.build_attention(kind, bench.WIDTH, heads, dwc, 1e-6, "auto")
            work[name] = flop_count(lambda: layer(x, (side, side)).sum().backward())
        assert r["softmax_ms"] == 1e3 * work["softmax"] and r["lit_ms"] == 1e3 * work["lit"], r
        assert r["speedup"] == r["speedup_paired"] == r["speedup_best"] == pytest.approx(work["softmax"] / work["lit"])


def test_dynamic_speedup_is_the_flops_saved(quick_result):
    """The static median is the static model's forward FLOPs; the sliced one makes the realised speed-up
    the ideal one (the analytic whole-model FLOPs ratio) to within what FlopCounterMode does not count
    (SDPA on the CPU: 4·N²·D per layer against ~12·N·D² of projections and MLP, 3e-4 at 16 tokens)."""
    d = quick_result["dynamic"]
    static = bench.build_model("dit-s/2", **bench.QUICK_DYN.overrides).eval()
    x, _, y = tiny_inputs(batch=bench.QUICK_DYN.batch, channels=static.in_channels, size=static.config.input_size)
    with torch.inference_mode():
        static_flops = flop_count(lambda: static(x, torch.full((x.shape[0],), 500.0), y))
    assert d["static_ms"] == 1e3 * static_flops
    assert d["speedup"] == d["speedup_paired"] == d["speedup_best"]
    assert d["efficiency"] == pytest.approx(1.0, abs=2e-3)
    assert d["static_ms"] < d["masked_ms"]  # the masked path computes every unit, and the routers


def test_quick_json_has_every_field(quick_result):
    res = json.loads(json.dumps(quick_result))  # JSON-serialisable as printed
    assert res["suite"] == "models" and res["quick"] and res["threads"] >= 1
    assert [r["tokens"] for r in res["attention"]] == [c.tokens for c in bench.QUICK_ATTN]
    for r in res["attention"]:
        for key in ("batch", "repeats", "softmax_ms", "lit_ms", "speedup", "speedup_paired", "speedup_best", "flops_ratio"):
            assert r[key] > 0, key
        assert len(r["softmax_all_ms"]) == len(r["lit_all_ms"]) == r["repeats"]
    d = res["dynamic"]
    for key in ("static_ms", "sliced_ms", "masked_ms", "speedup", "speedup_paired", "speedup_best", "ideal_speedup", "efficiency",
                "gflops_static", "gflops_realised"):
        assert d[key] > 0, key
    assert d["gflops_realised"] < d["gflops_static"]
    from models import model_config
    from models.flops import static_flops

    assert d["gflops_static"] == pytest.approx(static_flops(model_config("dit-s/2", **bench.QUICK_DYN.overrides)) / 1e9)
    assert d["ideal_speedup"] == pytest.approx(d["gflops_static"] / d["gflops_realised"])
    assert d["efficiency"] == pytest.approx(d["speedup"] / d["ideal_speedup"])
    assert res["bars"] == {}  # quick sizes are overhead-bound: no bar is judged on them
    assert "load_before" in res and "load_after" in res


def test_routers_are_driven_to_the_requested_widths(quick_result):
    d = quick_result["dynamic"]
    case = bench.QUICK_DYN
    assert d["heads_on"] == pytest.approx(case.heads_on / 6)
    assert d["groups_on"] == pytest.approx(case.groups_on / 6)
    assert abs(d["tokens_routed"] - case.token_keep) < 0.1
    # ½ attention + ⅔·¾ MLP = ½ of DyDiT's attn+MLP FLOPs, up to the token quantile's granularity
    assert abs(d["flops_ratio_dydit"] - 0.5) < 0.05


def test_table_is_printed(quick_result):
    text = bench.format_report(quick_result)
    for word in ("softmax", "LiT", "speed-up", "FLOPs ratio", "DyDiT sliced", "no bar applies"):
        assert word in text
    d = quick_result["dynamic"]
    assert f"{d['sliced_ms']:>9.1f} ms   speed-up {d['speedup']:.2f}x" in text
    assert f"realised/ideal {d['efficiency']:.2f}" in text
    for r in quick_result["attention"]:
        assert f"{r['speedup']:.2f}x" in text


def test_dispatcher_runs_the_suite(capsys, monkeypatch):
    monkeypatch.setattr(bench, "run", lambda quick: {"quick": quick})
    assert benchmark.main(["models", "--quick", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"quick": True}
    assert benchmark.main(["nope"]) == 2


def test_paired_ratio_cancels_a_load_step():
    # load doubles half-way: the ratio of medians drifts, each back-to-back pair still reads 2x
    a, b = [2.0, 2.0, 4.0, 4.0, 4.0], [1.0, 1.0, 2.0, 2.0, 2.0]
    assert bench.paired_ratio(a, b) == 2.0


def test_time_interleaved_rotates_and_counts():
    calls = []
    times = bench.time_interleaved({"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, repeats=3, warmup=1)
    assert calls == ["a", "b", "a", "b", "b", "a", "a", "b"]
    assert [len(v) for v in times.values()] == [3, 3]


def test_driven_sliced_model_agrees_with_masked():
    """The benchmark's routing setting exercises the real sliced path, which must compute the same function."""
    torch.manual_seed(0)
    m = bench.build_model("dydit-s/2", depth=2, input_size=8, num_classes=10)
    bench.randomize_(m)
    m.eval()
    x, t, y = tiny_inputs(batch=2)
    t = torch.full_like(t, 500.0)
    with torch.no_grad():
        bench.drive_routers_(m, bench.QUICK_DYN, x, t, y)
        m.dynamic_exec = "sliced"
        out_s, aux = m(x, t, y, return_aux=True)
        m.dynamic_exec = "masked"
        out_m = m(x, t, y)
    assert 0.3 < float(aux["flops_ratio"].mean()) < 0.7
    torch.testing.assert_close(out_s, out_m, rtol=1e-4, atol=1e-5)


def test_bars_are_judged_on_the_default_sizes():
    row = {"tokens": bench.LIT_BAR_TOKENS, "speedup": 6.5}
    dyn = {"speedup": 1.7, "ideal_speedup": 2.0, "efficiency": 0.85}
    res = bench.judge([row], dyn, quick=False)
    assert res["lit"]["pass"] and res["dynamic"]["pass"] and res["dynamic"]["need"] == pytest.approx(1.6)
    missed = bench.judge([{**row, "speedup": 5.9}], {**dyn, "efficiency": 0.79}, quick=False)
    assert not missed["lit"]["pass"] and not missed["dynamic"]["pass"]
