"""Shards in object storage: a local S3 server (moto) behind a fault-injecting proxy, an HTTPS server,
and a GCS emulator. Every remote read is compared with reading the same files from local disk."""
import json
import os
import subprocess
import sys
import textwrap

import pytest

from data import StorageError, build_loader
from tests.data_helpers import assert_same_batches
from tests.storage_servers import (
    FaultProxy, Rule, gcs_emulator, https_files, moto_s3, s3_env, s3_error, self_signed, upload_dir,
)
from tests.thirdparty_helpers import batches, img2dataset_dir, plain

COUNTS = [9, 10, 11, 12]


@pytest.fixture(scope="module")
def local_set(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("i2d") / "out")
    img2dataset_dir(root, COUNTS, stats={0: 9, 2: 11}, size=24)  # ~1 KB images: a shard spans several 1 KB reads
    return root


@pytest.fixture(scope="module")
def s3(local_set):
    with moto_s3() as endpoint:
        upload_dir(endpoint, local_set, "laion", "i2d")
        host, port = endpoint.split("//")[1].split(":")
        proxy = FaultProxy((host, int(port)))
        yield {"endpoint": endpoint, "proxy": proxy, "proxied": proxy.start()}
        proxy.stop()


@pytest.fixture
def via_proxy(s3, monkeypatch):
    monkeypatch.setattr("data.thirdparty._STATS", {})  # stats files are read once per process
    for k, v in s3_env(s3["proxied"]).items():
        monkeypatch.setenv(k, v)
    s3["proxy"].rules.clear()
    s3["proxy"].log.clear()
    return s3["proxy"]


def _cfg(path, tmp_path, **kw):
    return plain(path, cache_dir=str(tmp_path / "cache"), retry_wait_s=0.01, **kw)


def test_s3_reads_exactly_what_local_disk_gives(local_set, via_proxy, tmp_path):
    ref = batches(_cfg(local_set, tmp_path / "a"), 14)
    assert_same_batches(batches(_cfg("s3://laion/i2d", tmp_path / "b"), 14), ref)  # listed
    pattern = "s3://laion/i2d/{00000..00003}.tar"  # named: nothing listed, stats probed per shard
    assert_same_batches(batches(_cfg(pattern, tmp_path / "c", num_workers=2), 14), ref)


def test_dropped_connections_and_server_errors_are_retried_and_change_nothing(local_set, via_proxy, tmp_path, caplog,
                                                                              monkeypatch):
    monkeypatch.setattr("data.stores.PIECE", 1024)  # bodies read in 1 KB pieces: a cut at 4000 keeps 3 of them
    ref = batches(_cfg(local_set, tmp_path / "a"), 14)
    via_proxy.rules += [Rule("GET", "/i2d/00001.tar", times=2, drop=4000),  # cut mid-shard, twice
                        Rule("GET", "/i2d/00003.tar", times=1, status=503, body=s3_error("SlowDown", "Please reduce")),
                        Rule("GET", "/i2d/00000_stats.json", times=1, status=500, body=s3_error("InternalError", "oops"))]
    got = batches(_cfg("s3://laion/i2d", tmp_path / "b"), 14)
    assert_same_batches(got, ref)
    what = [w for _, _, _, w in via_proxy.log]
    assert what.count("dropped after 4000 bytes") == 2 and "status 503" in what and "status 500" in what
    ranges = [r for m, p, r, w in via_proxy.log if p.endswith("/00001.tar") and m == "GET"]
    size = os.path.getsize(os.path.join(local_set, "00001.tar"))
    assert ranges == [f"bytes=0-{size - 1}"] + [f"bytes={k}-{size - 1}" for k in (3072, 6144)]  # each retry resumed
    assert "retry 1/8" in caplog.text and "retry 2/8" in caplog.text


def test_exhausted_retries_stop_the_run_with_the_cause(via_proxy, tmp_path):
    via_proxy.rules.append(Rule("GET", "/i2d/", times=100, status=503, body=s3_error("ServiceUnavailable", "down")))
    with pytest.raises(StorageError, match=r"failed after 3 attempts.*ServiceUnavailable.*relaunch"):
        batches(_cfg("s3://laion/i2d", tmp_path, retries=2), 1)


def test_missing_bucket_credentials_or_access_are_clear_errors_never_an_empty_epoch(via_proxy, tmp_path, monkeypatch):
    with pytest.raises(StorageError, match="bucket 'nosuchbucket' does not exist"):
        build_loader(_cfg("s3://nosuchbucket/i2d", tmp_path), 0, 1)
    with pytest.raises(ValueError, match="no .tar shards found"):
        build_loader(_cfg("s3://laion/empty-prefix", tmp_path), 0, 1)
    via_proxy.rules.append(Rule("GET", "/laion", times=5, status=403, body=s3_error("AccessDenied", "Access Denied")))
    with pytest.raises(StorageError, match="access denied to s3://laion/i2d.*grant s3:GetObject"):
        build_loader(_cfg("s3://laion/i2d", tmp_path), 0, 1)
    via_proxy.rules.clear()
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(var)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    with pytest.raises(StorageError, match="no AWS credentials to read s3://laion/i2d.*AWS_ACCESS_KEY_ID"):
        build_loader(_cfg("s3://laion/i2d", tmp_path), 0, 1)


def test_the_cache_stays_within_its_bound(local_set, via_proxy, tmp_path):
    shard = os.path.getsize(os.path.join(local_set, "00000.tar"))
    ref = batches(_cfg(local_set, tmp_path / "a", shuffle_window=8), 30)  # 120 samples: every shard read, some twice
    assert_same_batches(batches(_cfg("s3://laion/i2d", tmp_path / "b", cache_gb=2.5 * shard / 1e9, shuffle_window=8), 30), ref)
    cache = tmp_path / "b" / "cache"
    kept = [p for p in cache.iterdir() if p.suffix == ".tar"]
    assert 1 <= len(kept) <= 3 and sum(p.stat().st_size for p in kept) <= 2.5 * shard + max(p.stat().st_size for p in kept)
    downloads = [w for m, p, _, w in via_proxy.log if m == "GET" and p.split("?")[0].endswith(".tar")]
    assert len(downloads) > len(COUNTS)  # evicted shards came back: bounded, at the price of bandwidth


def test_kill9_while_streaming_from_s3_then_resume_gives_the_uninterrupted_batches(local_set, s3, tmp_path):
    state_file = tmp_path / "state.json"
    run = textwrap.dedent(f"""
        import json, sys, time
        from data import DataConfig, build_loader
        cfg = DataConfig(format="wds", layout="plain", path="s3://laion/i2d", cond="caption", batch_size=4, image_size=16,
                         shuffle_window=12, streams=2, seed=5, num_workers=2, cache_dir={str(tmp_path / 'cache')!r})
        loader = build_loader(cfg, 0, 1)
        if sys.argv[1] == "crash":
            for _ in range(6):
                next(loader)
            open({str(state_file)!r}, "w").write(json.dumps(loader.state_dict()))
            print("saved", flush=True)
            while True:
                next(loader)  # still downloading and decoding when it is killed
        loader.load_state_dict(json.load(open({str(state_file)!r})))
        print(json.dumps([next(loader)["key"] for _ in range(10)]))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd(), **s3_env(s3["endpoint"])}
    proc = subprocess.Popen([sys.executable, "-c", run, "crash"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "saved"
    proc.kill()  # SIGKILL: workers orphaned, a download may be half written in the cache
    proc.wait()
    out = subprocess.run([sys.executable, "-c", run, "resume"], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    expected = [b["key"] for b in batches(plain(local_set), 16)[6:]]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_https_with_a_dropped_body_a_missing_shard_and_no_listing(local_set, tmp_path, monkeypatch):
    cert, key = self_signed(str(tmp_path))
    monkeypatch.setenv("SSL_CERT_FILE", cert)
    ref = batches(_cfg(local_set, tmp_path / "a", streams=1, shuffle=False, batch_size=6), 7)
    with https_files(local_set, cert, key, drop_first={"00002.tar": 700}) as (url, log):
        got = batches(_cfg(url + "/{00000..00003}.tar", tmp_path / "b", streams=1, shuffle=False, batch_size=6), 7)
        assert_same_batches(got, ref)
        assert any(w == "dropped after 700 bytes" for _, _, w in log)
        size = os.path.getsize(os.path.join(local_set, "00002.tar"))
        assert [r for p, r, _ in log if p == "/00002.tar" and r != "bytes=0-0"] == [f"bytes=0-{size - 1}", f"bytes=700-{size - 1}"]
        loader = build_loader(_cfg(url + "/{00000..00004}.tar", tmp_path / "c", streams=1, shuffle=False, batch_size=6,
                                   max_skipped_fraction=1.0), 0, 1)
        batches(None, 9, loader=loader)
        assert loader.stats()["data/bad_shards"] == 1  # 00004.tar: 404, skipped and counted
        with pytest.raises(StorageError, match="cannot be listed over HTTP: name the shards with a brace pattern"):
            build_loader(_cfg(url + "/", tmp_path / "d"), 0, 1)


def test_gcs_through_the_emulator(local_set, tmp_path, monkeypatch):
    from google.auth.credentials import AnonymousCredentials
    from google.cloud import storage

    with gcs_emulator() as url:
        monkeypatch.setenv("STORAGE_EMULATOR_HOST", url)
        client = storage.Client(credentials=AnonymousCredentials(), project="test")
        bucket = client.create_bucket("laion-gcs")
        for name in sorted(os.listdir(local_set)):
            bucket.blob(f"i2d/{name}").upload_from_filename(os.path.join(local_set, name))
        ref = batches(_cfg(local_set, tmp_path / "a"), 12)
        assert_same_batches(batches(_cfg("gs://laion-gcs/i2d", tmp_path / "b"), 12), ref)
        with pytest.raises(StorageError, match="bucket 'nosuchbucket' does not exist"):
            build_loader(_cfg("gs://nosuchbucket/i2d", tmp_path / "c"), 0, 1)


def test_training_from_s3_killed_and_relaunched_reproduces_the_uninterrupted_losses(tmp_path):
    """A real run (launch.train) on an img2dataset set in the S3 server: SIGKILL mid-run, relaunch the
    same command, and every step's loss equals the uninterrupted run's."""
    from tests.fault_utils import finish, kill9, last_step, losses_by_step, start, started_at, tail, train_cmd, wait_until
    from tests.trainer_utils import base_env, write_config

    local = str(tmp_path / "set")
    img2dataset_dir(local, [12, 12, 12, 12], stats={1: 12, 3: 12}, extra={"cls": lambda n: str(n % 10).encode()})
    with moto_s3() as endpoint:
        upload_dir(endpoint, local, "train-set", "i2d")
        env = base_env(**s3_env(endpoint))
        cfg = write_config(tmp_path / "c.yaml", args={"input_size": 16, "in_channels": 3},
                           data={"format": "wds", "layout": "plain", "path": "s3://train-set/i2d", "image_size": 16,
                                 "streams": 2, "shuffle_window": 12, "num_workers": 1, "cache_dir": str(tmp_path / "cache")},
                           train={"steps": 8, "global_batch": 8, "log_every": 1}, checkpoint={"every": 2, "async_save": False})
        ref = start(train_cmd(cfg, [f"run_dir={tmp_path / 'ref'}"]), tmp_path / "ref.log", env)
        assert finish([ref]) == [0], tail(tmp_path / "ref.log")
        run = tmp_path / "run"
        cmd = train_cmd(cfg, [f"run_dir={run}"])
        proc = start(cmd, tmp_path / "a.log", {**env, "DITILL_DEBUG_FAULTS": "slow_step=0.3"})
        started_at(tmp_path / "a.log", [proc])
        wait_until(lambda: last_step(run) >= 5, [proc], what="step 5")
        kill9([proc])
        again = start(cmd, tmp_path / "b.log", env)
        assert started_at(tmp_path / "b.log", [again]) in (4, 6)  # resumed mid-run, from a checkpoint on S3 data
        assert finish([again]) == [0], tail(tmp_path / "b.log")
        assert losses_by_step(run) == losses_by_step(tmp_path / "ref") and len(losses_by_step(run)) == 8
