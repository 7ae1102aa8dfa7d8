"""Bad input is skipped, counted by reason and named in a warning; too much of it stops the run clearly."""
import json
import logging
import os
import subprocess
import sys
import tarfile
import textwrap

import numpy as np
import pytest

from data import DataConfig, DataError, build_loader
from data.schema import wds_members
from data.sources import digits_source
from tests.data_helpers import latent_sample, take, write_digits, write_raw

N = 10  # samples per shard


def _planted(fmt):
    """4 shards of 10: NaN/Inf latents, NaN embedding, wrong shape, missing field (wds), truncated file, unopenable file."""
    rng = np.random.default_rng(0)
    shards = [[latent_sample(s * N + i, rng) for i in range(N)] for s in range(4)]
    shards[0][2]["latent"][1, 2, 3] = np.nan
    shards[0][5]["text_emb"][0, 0] = np.nan
    shards[0][7]["latent"][0, 0, 0] = -np.inf
    shards[1][1]["latent"] = np.zeros((4, 2, 2), np.float16)
    return shards


def _write_planted(path, fmt):
    shards = _planted(fmt)
    write_raw(path, fmt, shards)
    name = (lambda n: f"shard-{n:06d}.tar") if fmt == "wds" else (lambda n: f"shard.{n:05d}.mds")
    bad = {"nonfinite": {"000002", "000005", "000007"}, "bad_shape": {"000011"}}
    if fmt == "wds":  # a sample without its latent (MDS cannot hold one: every column is required)
        import webdataset as wds
        samples = [dict(s) for s in shards[1]]
        del samples[3]["latent"]
        with open(os.path.join(path, name(1)), "wb") as f:
            w = wds.TarWriter(f, encoder=False, mtime=0)
            for s in samples:
                w.write(wds_members(s))
            w.close()
        bad["missing_field"] = {"000013"}
    shard2 = os.path.join(path, name(2))
    if fmt == "wds":  # cut inside sample 5's members: samples 5..9 are lost
        with tarfile.open(shard2) as tf:
            cut = [m for m in tf.getmembers() if m.name.startswith("000025.")][1].offset_data + 3
    else:  # cut inside sample 5's bytes
        with open(shard2, "rb") as f:
            offsets = np.frombuffer(f.read(4 * (N + 2)), np.uint32)[1:]
        cut = int(offsets[5]) + 7
    with open(shard2, "r+b") as f:
        f.truncate(cut)
    bad["truncated"] = {f"{20 + i:06d}" for i in range(5, 10)}
    with open(os.path.join(path, name(3)), "wb") as f:
        f.write(b"this is not a shard at all" * 3)
    bad["shard_error"] = {f"{30 + i:06d}" for i in range(N)}
    return bad


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_every_bad_sample_is_skipped_counted_and_named(tmp_path, fmt, caplog):
    path = str(tmp_path / fmt)
    bad = _write_planted(path, fmt)
    cfg = DataConfig(format=fmt, path=path, input="latent", cond="text_emb", batch_size=5, shuffle=False,
                     drop_last=False, max_skipped_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="ditill.data"):
        loader = build_loader(cfg, 0, 1)
        assert loader.steps_per_epoch == 8
        batches = take(loader, 8)
    stats = loader.stats()
    for reason, keys in bad.items():
        assert stats[f"data/skipped/{reason}"] == len(keys), reason
    bad_keys = set().union(*bad.values())
    good = {f"{i:06d}" for i in range(40)} - bad_keys
    got = [k for b in batches for k in b["key"]]
    assert set(got) == good and not set(got) & bad_keys  # every batch full, of good samples only
    assert stats["data/repeated"] == len(got) - len(good) and stats["data/read"] == 40
    assert all(np.isfinite(b["x"].numpy()).all() and np.isfinite(b["text_emb"].numpy()).all() for b in batches)
    for key in bad_keys - bad["shard_error"] - bad["truncated"]:
        assert f"skipped sample {key}" in caplog.text
    assert "shard-000003.tar is skipped" in caplog.text or "shard.00003.mds is skipped" in caplog.text
    assert "truncated" in caplog.text and "NaN/Inf" in caplog.text and "shape (4, 2, 2)" in caplog.text
    # workers see the same data and the same damage
    again = build_loader(DataConfig(**{**cfg.__dict__, "num_workers": 2}), 0, 1)
    assert [b["key"] for b in take(again, 8)] == [b["key"] for b in batches] and again.stats() == stats


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_undecodable_images_and_bad_labels_are_skipped(tmp_path, fmt, caplog):
    items = digits_source().items[:20]
    samples = [{"key": it.key, **it.load()} for it in items]
    samples[4]["image"] = b"\x89PNG\r\n\x1a\n" + b"garbage" * 10
    samples[9]["cls"] = 12
    write_raw(str(tmp_path / fmt), fmt, [samples[:10], samples[10:]], classes=[str(d) for d in range(10)])
    loader = build_loader(DataConfig(format=fmt, path=str(tmp_path / fmt), batch_size=5, shuffle=False,
                                     max_skipped_fraction=1.0), 0, 1)
    with caplog.at_level(logging.WARNING, logger="ditill.data"):
        keys = [k for b in take(loader, 4) for k in b["key"]]
    assert loader.stats()["data/skipped/decode_error"] == 1 and loader.stats()["data/skipped/bad_label"] == 1
    assert "00004" not in keys and "00009" not in keys
    assert "skipped sample 00004" in caplog.text and "cannot be decoded" in caplog.text and "class label 12" in caplog.text


def test_too_many_skips_stop_the_run_with_a_clear_error(tmp_path):
    path = str(tmp_path / "wds")
    _write_planted(path, "wds")
    loader = build_loader(DataConfig(format="wds", path=path, input="latent", cond="text_emb", batch_size=5, shuffle=False,
                                     max_skipped_fraction=0.05, skip_check_after=10), 0, 1)
    with pytest.raises(DataError, match=r"were skipped \(.*nonfinite: 3.*\), above data.max_skipped_fraction=0.05") as e:
        take(loader, 8)
    assert "repair or remove those shards" in str(e.value)


def test_task_needs_missing_from_the_shards_fail_before_reading(tmp_path):
    path = write_digits(str(tmp_path / "d"), "mds", n=20)
    with pytest.raises(ValueError, match="latent missing.*launch.precompute"):
        build_loader(DataConfig(format="mds", path=path, input="latent"), 0, 1)
    with pytest.raises(ValueError, match="data.format='wds' but .* are 'mds' shards"):
        build_loader(DataConfig(format="wds", path=path), 0, 1)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        build_loader(DataConfig(format="wds", path=str(tmp_path / "nowhere")), 0, 1)
    os.remove(os.path.join(path, "manifest.json"))
    with pytest.raises(FileNotFoundError, match="manifest.json is missing"):
        build_loader(DataConfig(format="mds", path=path), 0, 1)


def test_a_relaunch_after_a_hard_kill_resumes(tmp_path):
    """A crashed run (SIGKILL with worker processes alive) leaves nothing that blocks the next one."""
    path = write_digits(str(tmp_path / "m"), "mds", n=400, samples_per_shard=100)
    state_file = tmp_path / "state.json"
    run = textwrap.dedent(f"""
        import json, sys, time
        from data import DataConfig, build_loader
        loader = build_loader(DataConfig(format="mds", path={path!r}, batch_size=16, num_workers=2), 0, 1)
        if sys.argv[1] == "crash":
            for _ in range(5):
                next(loader)
            open({str(state_file)!r}, "w").write(json.dumps(loader.state_dict()))
            print("saved", flush=True)
            time.sleep(600)
        loader.load_state_dict(json.load(open({str(state_file)!r})))
        print(json.dumps(next(loader)["key"]))
    """)
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    proc = subprocess.Popen([sys.executable, "-c", run, "crash"], stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "saved"
    proc.kill()  # SIGKILL: no cleanup runs, its workers are orphaned
    proc.wait()
    out = subprocess.run([sys.executable, "-c", run, "resume"], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    expected = take(build_loader(DataConfig(format="mds", path=path, batch_size=16), 0, 1), 6)[5]["key"]
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected
