"""`python -m launch.benchmark flux`: the quick mode runs end to end, routes as asked, reports every number.

Behaviour only: wall-clock times are never asserted (they belong to the machine, not the code).
"""
import json

import pytest

from launch import benchmark
from launch.benchmarks import flux as bench
from models.flux_flops import block_costs


@pytest.fixture(scope="module")
def quick():
    setup = bench.Setup(width=128, text=16, repeats=1, resolutions=bench.QUICK_RESOLUTIONS)
    return bench.run(setup)


def test_quick_json_has_every_field(quick):
    res = json.loads(json.dumps(quick))
    assert res["suite"] == "flux" and res["width"] == 128 and res["heads"] == 2
    assert [r["resolution"] for r in res["results"]] == list(bench.QUICK_RESOLUTIONS)
    for r in res["results"]:
        for kind in ("forward", "forward_backward"):
            assert set(r[kind]) == {"teacher", "dyflux_sliced", "dyflux_masked", "lit"}
            for row in r[kind].values():
                assert row["ms"] > 0 and row["speedup"] > 0 and len(row["all_ms"]) == 1 and row["tflops"] > 0
                assert row["peak_bytes"] is None and row["mfu"] is None  # CUDA only / with --peak-tflops
            assert r[kind]["teacher"]["speedup"] == 1.0


def test_routers_are_driven_to_the_requested_widths(quick):
    """1 of 2 heads, 3 of 4 groups, 3/4 of the image tokens: the realised ratio is what block_costs gives
    for those fractions (the token routers' calibration hits 3/4 up to one token)."""
    teacher_cfg, dy_cfg, _ = bench.configs(128, 16)
    for r in quick["results"]:
        n_img, n_txt = r["image_tokens"], 16
        c = block_costs(dy_cfg, n_img, n_txt)
        keep = round(bench.TOKEN_KEEP * n_img) / n_img
        run = (n_txt + keep * n_img) / (n_txt + n_img)
        real = (0.5 * c.double_attn + 0.75 * keep * c.double_img_mlp + 0.75 * c.double_txt_mlp
                + 0.5 * c.single_attn_in + 0.5 * run * c.single_attn_out + 0.75 * run * c.single_mlp)
        static = c.double_attn + c.double_img_mlp + c.double_txt_mlp + c.single_attn_in + c.single_attn_out + c.single_mlp
        assert r["dyflux_flops_ratio"] == pytest.approx(real / static, rel=1e-6)


def test_flops_behind_the_throughput_figures(quick):
    """TFLOP/s = 2·(multiply-adds)·passes / time, with the teacher's pair cost from the block costs."""
    teacher_cfg, _, lit_cfg = bench.configs(128, 16)
    r = quick["results"][0]
    macs = bench.pair_macs(teacher_cfg, r["image_tokens"], 16)
    c = block_costs(teacher_cfg, r["image_tokens"], 16)
    assert macs == c.double_attn + c.double_img_mlp + c.double_txt_mlp + c.single_attn_in + c.single_attn_out \
        + c.single_mlp + c.double_adaln + c.single_adaln
    for kind, passes in (("forward", 1), ("forward_backward", 3)):
        row = r[kind]["teacher"]
        assert row["tflops"] == pytest.approx(2 * passes * macs / (row["ms"] / 1e3) / 1e12)
    assert r["lit_flops_speedup"] == pytest.approx(macs / bench.pair_macs(lit_cfg, r["image_tokens"], 16))


def test_table_is_printed_and_the_suite_is_registered(quick, capsys):
    text = bench.format_report(quick)
    for word in ("teacher", "dyflux_sliced", "dyflux_masked", "lit", "fwd+bwd", "realised", "width 128"):
        assert word in text
    assert "flux" in benchmark.SUITES
    with pytest.raises(SystemExit) as exit_:
        benchmark.main(["flux", "--width", "100"])  # a width that is not a multiple of the 64-channel heads
    assert exit_.value.code == 2 and "multiple of 64" in capsys.readouterr().err
