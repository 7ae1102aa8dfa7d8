"""`python -m launch.benchmark data` runs end to end (tiny sizes here; the real sizes are its defaults), and
its figures are the ones its own measurements imply: both sides of each ratio did the same work.

Two clocks make the figures exact (tests/bench_clocks.py): the latent suite's `perf_counter` advances one
unit per read, so each timed window is one unit and a rate reads the work done in it (a raw pass: every
shard byte; a loader run: the samples of its timed epochs); the image suite's `process_time` counts
images decoded in this process, so a 0-worker row's CPU figures are decodes per sample."""
import json
import math

import pytest

from launch import benchmark
from launch.benchmarks import data as latent_bench
from launch.benchmarks import data_sources
from tests.bench_clocks import TickClock, install_clocks

SAMPLES, EPOCHS = 32, 1


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    argv = ["data", "--json", "--samples", str(SAMPLES), "--batch-size", "8", "--latent", "4,8,8", "--text", "16,32",
            "--workers", "0", "1", "--epochs", str(EPOCHS), "--repeats", "1", "--dir", str(tmp),
            "--sources", "latent", "wds", "mds", "s3", "--image-samples", "32", "--image-size", "32", "--per-shard", "8",
            "--image-workers", "0", "2", "--image-repeats", "1"]
    import contextlib
    import io

    import data.decode

    decoded = [0]
    real_decode = data.decode.decode_image

    def counted_decode(*args, **kwargs):
        decoded[0] += 1
        return real_decode(*args, **kwargs)

    out = io.StringIO()
    with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(out):
        mp.setattr(data.decode, "decode_image", counted_decode)  # the loader's decode (in this process at 0 workers)
        mp.setattr(data_sources, "decode_image", counted_decode)  # the raw pass's
        install_clocks(mp, latent_bench, perf_counter=TickClock())
        install_clocks(mp, data_sources, process_time=lambda: float(decoded[0]))
        assert benchmark.main(argv) == 0
    return json.loads(out.getvalue()), tmp


def test_latent_rows_are_consistent_with_their_raw_reads(report):
    out, tmp = report
    rows = {(r["format"], r["workers"]): r for r in out["results"]}
    assert set(rows) == {(f, w) for f in ("wds", "mds") for w in (None, 0, 1)}
    for r in out["results"]:
        assert math.isclose(r["ratio"], r["bytes_per_s"] / r["raw_bytes_per_s"], rel_tol=1e-12)
        per_sample = r["bytes_per_s"] / r["samples_per_s"]
        assert 4 * 8 * 8 * 2 < per_sample < 4 * (4 * 8 * 8 * 2 + 16 * 32 * 2 + 16) + 20480  # one sample's shard bytes
    assert out["passed"] == all(r["ratio"] >= out["bar"] for r in out["results"] if r["workers"] == 2)
    assert list(tmp.iterdir()) == []  # its shards are removed


def test_latent_rates_are_the_work_of_their_timed_windows(report):
    """On the one-unit windows: a loader row reads the samples of its timed epochs (not the warm-up's), the
    raw row every shard byte once, so a loader row's ratio is the number of timed epochs."""
    for r in report[0]["results"]:
        if r["workers"] is None:
            assert r["samples_per_s"] == pytest.approx(SAMPLES, rel=1e-12), r
        else:
            assert r["samples_per_s"] == EPOCHS * SAMPLES, r
            assert r["ratio"] == pytest.approx(EPOCHS, rel=1e-12), r


def test_image_sources_measure_the_same_work_on_both_sides(report):
    rows = report[0]["images"]["rows"]
    assert {(r["source"], r["workers"]) for r in rows} == {(s, w) for s in ("wds", "mds", "s3") for w in (0, 2)}
    for r in rows:
        # the raw pass decoded every image once; the loader's first timed epoch decoded the same images
        assert r["raw_samples"] == 32 and r["loader_epoch_samples"] == 32
        assert math.isclose(r["raw_checksum"], r["loader_checksum"], rel_tol=1e-9), r
        assert r["raw_samples_per_s"] > 0 and r["samples_per_s"] > 0
        # one measured pair per row: its ratio and wall overhead are those of the row's two rates
        assert r["ratio"] == r["samples_per_s"] / r["raw_samples_per_s"], r
        assert r["wall_overhead_ms"] == pytest.approx(1e3 * (1 / r["samples_per_s"] - 1 / r["raw_samples_per_s"]), rel=1e-12)
        assert r["raw_cpu_ms"] == 1e3, r  # CPU clock = decodes: the raw pass decodes each image once
        # a 0-worker loader decodes each sample once in this process, as the raw pass did: no CPU overhead
        assert r["overhead_ms"] == (0.0 if r["workers"] == 0 else None), r
    assert report[0]["images"]["bars"] == data_sources.verdicts(rows)
    assert set(report[0]["images"]["bars"]) == {f"{s}: 0 workers add ≤ 0.2 ms/sample" for s in ("wds", "mds", "s3")} | {
        f"{s}: 2 workers ≥ {data_sources.RATIO_BAR[s]} × raw" for s in ("wds", "mds", "s3")}


def test_a_raw_pass_that_skips_work_is_caught(tmp_path):
    """The checksum is what makes the ratio honest: a raw side that decodes half the images disagrees."""
    paths = data_sources.write_sources(str(tmp_path), 16, 32, 8)
    rate, cpu, checksum, n = data_sources.raw_rate("wds", paths["wds"], 32)
    _, _, loader_sum, m = data_sources.loader_rate(
        data_sources.DataConfig(format="wds", layout="plain", path=paths["wds"], cond="caption", batch_size=8, image_size=32,
                                streams=1, shuffle_window=8, cache_dir=str(tmp_path / "c")), 1, 16)
    assert n == m == 16 and math.isclose(checksum, loader_sum, rel_tol=1e-9)
    mds_rate, _, mds_sum, _ = data_sources.raw_rate("mds", paths["mds"], 32)
    assert math.isclose(mds_sum, checksum, rel_tol=1e-9)  # the MDS set holds the same pictures
    half = sum(float(data_sources.decode_image(j, (3, 32, 32)).double().mean())
               for k, j in enumerate(data_sources._tar_images(open(f"{paths['wds']}/00000.tar", "rb").read())) if k % 2)
    assert not math.isclose(half, checksum, rel_tol=1e-3)
