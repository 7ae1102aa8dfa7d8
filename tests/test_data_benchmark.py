"""`python -m launch.benchmark data` runs end to end (tiny sizes here; the real sizes are its defaults)."""
import json

from launch import benchmark


def test_data_benchmark_suite_reports_each_format_and_worker_count(capsys, tmp_path):
    argv = ["data", "--json", "--samples", "32", "--batch-size", "8", "--latent", "4,8,8", "--text", "16,32",
            "--workers", "0", "1", "--epochs", "1", "--repeats", "1", "--dir", str(tmp_path)]
    assert benchmark.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {(r["format"], r["workers"]) for r in out["results"]}
    assert rows == {(f, w) for f in ("wds", "mds") for w in (None, 0, 1)}
    assert all(r["samples_per_s"] > 0 and r["bytes_per_s"] > 0 for r in out["results"])
    assert list(tmp_path.iterdir()) == []  # its shards are removed
