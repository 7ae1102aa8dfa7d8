"""`python -m launch.benchmark checkpoint` runs end to end (a tiny student here; the quickstart size is its default)."""
import json

from launch import benchmark


def test_checkpoint_benchmark_reports_blocking_times_and_rates(capsys, tmp_path):
    argv = ["checkpoint", "--json", "--hidden", "32", "--depth", "2", "--batch", "8", "--warmup", "1", "--steps", "2",
            "--repeats", "1", "--dir", str(tmp_path)]
    assert benchmark.main(argv) == 0
    r = json.loads(capsys.readouterr().out)["results"]
    for key in ("step_s", "sync_blocked_s", "async_blocked_s", "save_bytes_per_s", "load_bytes_per_s",
                "raw_write_bytes_per_s", "raw_read_bytes_per_s"):
        assert r[key] > 0, key
    assert r["bytes"] > 0 and isinstance(r["bar_async_blocks_less_than_one_step"], bool)
    assert list(tmp_path.iterdir()) == []  # its files are removed
