"""`python -m launch.benchmark data` runs end to end (tiny sizes here; the real sizes are its defaults), and
its figures are the ones its own measurements imply: both sides of each ratio did the same work."""
import json
import math

import pytest

from launch import benchmark
from launch.benchmarks import data_sources


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("bench")
    argv = ["data", "--json", "--samples", "32", "--batch-size", "8", "--latent", "4,8,8", "--text", "16,32",
            "--workers", "0", "1", "--epochs", "1", "--repeats", "1", "--dir", str(tmp),
            "--sources", "latent", "wds", "mds", "s3", "--image-samples", "32", "--image-size", "32", "--per-shard", "8",
            "--image-workers", "0", "2", "--image-repeats", "2"]
    import contextlib
    import io

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
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


def test_image_sources_measure_the_same_work_on_both_sides(report):
    rows = report[0]["images"]["rows"]
    assert {(r["source"], r["workers"]) for r in rows} == {(s, w) for s in ("wds", "mds", "s3") for w in (0, 2)}
    for r in rows:
        # the raw pass decoded every image once; the loader's first timed epoch decoded the same images
        assert r["raw_samples"] == 32 and r["loader_epoch_samples"] == 32
        assert math.isclose(r["raw_checksum"], r["loader_checksum"], rel_tol=1e-9), r
        assert r["raw_samples_per_s"] > 0 and r["samples_per_s"] > 0 and r["raw_cpu_ms"] > 0
        assert (r["overhead_ms"] is None) == (r["workers"] != 0)
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
