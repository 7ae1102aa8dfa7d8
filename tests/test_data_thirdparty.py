"""Third-party shard sets (data.layout=plain): img2dataset webdatasets and streaming's MDS sets, read
without a manifest or a scan, in a seeded order that resumes exactly and is independent of the
number of workers and of the world size."""
import io
import json
import logging
import os

import numpy as np
import pytest
import torch
from PIL import Image

from data import DataConfig, build_loader, merge_rank_states
from tests.data_helpers import assert_same_batches
from tests.thirdparty_helpers import batches, expected_image, img2dataset_dir, jpeg, plain

COUNTS = [7, 8, 9, 10, 11]  # 45 samples in 5 shards


@pytest.fixture(scope="module")
def i2d(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("i2d") / "out")
    return root, img2dataset_dir(root, COUNTS)


def test_img2dataset_output_reads_in_order_and_decodes_like_pil(i2d):
    root, samples = i2d
    got = batches(plain(root, shuffle=False, streams=1, batch_size=5), 9)  # one pass over the 45
    keys = [k for b in got for k in b["key"]]
    assert keys == list(samples)  # shards as listed, samples as the tars hold them
    for b in got:
        for k, x, caption in zip(b["key"], b["x"], b["caption"]):
            assert torch.equal(x, expected_image(samples[k]["jpg"], 16))
            assert caption == samples[k]["txt"].decode()


def test_sample_counts_come_from_stats_files_where_present(tmp_path, caplog):
    root = str(tmp_path / "out")
    # shard 2 holds 9 but its stats say 6 (read 6: the stats are trusted, the tar is not scanned);
    # shard 4 holds 11 but its stats say 13 (2 positions past the tar's end: skipped as truncated)
    samples = img2dataset_dir(root, COUNTS, stats={0: 7, 2: 6, 4: 13})
    cfg = plain(root, streams=1, shuffle_window=100)
    with caplog.at_level(logging.WARNING, logger="ditill.data"):
        loader = build_loader(cfg, 0, 1)
        keys = [k for b in batches(cfg, 11, loader=loader) for k in b["key"]]  # 44 positions = one epoch
    expected = {k for k in samples if not (k.startswith("00002") and int(k[5:]) >= 6)}
    assert len(keys) == 44 and set(keys) == expected
    stats = loader.stats()
    assert stats["data/skipped/truncated"] == 2 and stats["data/repeated"] == 2 and stats["data/epoch"] == 1
    assert "the tar ends after 11 complete samples" in caplog.text


def test_no_scan_shards_are_opened_only_when_their_block_is_reached(tmp_path, monkeypatch):
    import data.readers as readers

    root = str(tmp_path / "out")
    img2dataset_dir(root, [6] * 20)
    opened = []
    init = readers.WdsShard.__init__

    def spy(self, path, *a, **kw):
        opened.append(os.path.basename(path))
        init(self, path, *a, **kw)

    monkeypatch.setattr(readers.WdsShard, "__init__", spy)
    loader = build_loader(plain(root, streams=1, shuffle_window=12, batch_size=4), 0, 1)
    assert len(opened) == 1  # the peek at one sample (field mapping, shapes)
    next(loader)
    first = set(opened)
    assert len(first) <= 3, opened  # the peeked shard and one block of 2 shards (12 samples), not 20
    for _ in range(10):
        next(loader)
    assert len(set(opened)) > len(first)


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_resume_is_exact_and_independent_of_workers(i2d, mds_sets, fmt):
    path = i2d[0] if fmt == "wds" else mds_sets["zstd"][0]
    cfg = plain(path, fmt)
    loader = build_loader(cfg, 0, 1)
    batches(cfg, 7, loader=loader)
    state = json.loads(json.dumps(loader.state_dict()))
    rest = batches(cfg, 15, loader=loader)  # past the end of every stream's first epoch
    resumed = build_loader(plain(path, fmt, num_workers=2), 0, 1)
    resumed.load_state_dict(state)
    assert_same_batches(batches(cfg, 15, loader=resumed), rest)
    again = batches(plain(path, fmt, num_workers=2), 22)
    assert_same_batches(again[7:], rest)
    other_seed = batches(plain(path, fmt, seed=6), 3)
    assert [b["key"] for b in other_seed] != [b["key"] for b in again[:3]]


def test_every_world_size_sees_the_same_global_batches_and_resumes_on_another(i2d):
    root, _ = i2d
    ref = batches(plain(root, batch_size=8, streams=4), 10)  # one rank, global batch 8
    two = [build_loader(plain(root, batch_size=4, streams=4, num_workers=w), r, 2) for r, w in ((0, 0), (1, 2))]
    for step in range(4):
        halves = [batches(None, 1, loader=ld)[0] for ld in two]
        assert [k for h in halves for k in h["key"]] == ref[step]["key"]
        assert torch.equal(torch.cat([h["x"] for h in halves]), ref[step]["x"])
    states = [ld.state_dict() for ld in two]
    four = [build_loader(plain(root, batch_size=2, streams=4), r, 4) for r in range(4)]
    with pytest.raises(ValueError, match="merge every old rank's state"):
        four[2].load_state_dict(states[0])  # rank 0 of two held streams 0 and 1 only
    for ld in four:
        ld.load_state_dict(merge_rank_states(states))
        assert len(ld.state_dict()["cursors"]) == 1  # one stream per rank: it reads only that stream's shards
    for step in range(4, 10):
        quarters = [batches(None, 1, loader=ld)[0] for ld in four]
        assert [k for q in quarters for k in q["key"]] == ref[step]["key"]
    with pytest.raises(ValueError, match="must divide the global batch"):
        build_loader(plain(root, batch_size=3, streams=4), 0, 1)


def test_field_mapping_latents_and_labels(tmp_path):
    root = str(tmp_path / "out")
    lat = {n: np.random.default_rng(n).standard_normal((4, 2, 2)).astype(np.float16) for n in range(15)}

    def npy(n):
        buf = io.BytesIO()
        np.save(buf, lat[n])
        return buf.getvalue()

    samples = img2dataset_dir(root, [5, 5, 5], extra={"vae.npy": npy, "label": lambda n: str(n % 3).encode()})
    cfg = plain(root, input="latent", cond="class", fields={"latent": "vae.npy", "cls": "label"}, latent_scale=0.5,
                latent_shift=0.25, shuffle=False, streams=1, batch_size=5)
    for b in batches(cfg, 3):
        for k, x, y in zip(b["key"], b["x"], b["y"]):
            n = samples[k]["n"]
            assert torch.equal(x, (torch.from_numpy(lat[n].astype(np.float32)) - 0.25) * 0.5) and int(y) == n % 3
    with pytest.raises(ValueError, match=r"no cls: map its member extension or column with data.fields.cls \(now 'cls'\)"):
        build_loader(plain(root, cond="class"), 0, 1)
    with pytest.raises(ValueError, match="data.latent_scale is required"):
        build_loader(plain(root, input="latent", fields={"latent": "vae.npy"}), 0, 1)


def test_bad_samples_and_missing_shards_are_skipped_and_counted(tmp_path, caplog):
    root = str(tmp_path / "out")
    img2dataset_dir(root, [6, 6, 6], extra={})
    import tarfile  # plant a broken image in shard 1

    with tarfile.open(os.path.join(root, "00001.tar")) as tf:
        member = tf.getmember("000010002.jpg")
    with open(os.path.join(root, "00001.tar"), "r+b") as f:
        f.seek(member.offset_data)
        f.write(b"\xff\xd8\xff" + b"\x00" * 40)
    pattern = os.path.join(root, "{00000..00003}.tar")  # 00003.tar does not exist
    cfg = plain(pattern, streams=1, shuffle=False, batch_size=6, max_skipped_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="ditill.data"):
        loader = build_loader(cfg, 0, 1)
        keys = [k for b in batches(cfg, 4, loader=loader) for k in b["key"]]
    stats = loader.stats()
    assert stats["data/skipped/decode_error"] >= 1 and stats["data/bad_shards"] == 1
    assert "000010002" not in keys[:18] and len(keys) == 24
    assert "00003.tar is skipped" in caplog.text and "No such file" in caplog.text and "cannot be decoded" in caplog.text


@pytest.mark.parametrize("overrides, match", [
    ({"layout": "ditill", "fields": {"image": "png"}}, "data.fields=.* is not allowed with data.layout='ditill'"),
    ({"fields": {"picture": "png"}}, "data.fields has key 'picture'"),
    ({"fields": {"image": "a b"}}, "data.fields.image='a b' is not allowed"),
    ({"buckets": True, "image_size": 64}, "data.buckets=true is not allowed with data.layout='plain'.*--source webdataset"),
    ({"layout": "ditill", "path": "s3://bucket/x"}, "set data.layout=plain to stream shards from object storage"),
    ({"format": "digits", "path": None}, "not allowed with data.format='digits'"),
    ({"cache_gb": 0}, "data.cache_gb=0"),
    ({"streams": 0}, "data.streams=0"),
])
def test_config_errors_name_the_key_and_the_fix(overrides, match):
    with pytest.raises(ValueError, match=match):
        plain(overrides.pop("path", "/data/x"), **overrides).validate()


# --- MDS sets written by mosaicml-streaming's MDSWriter ---------------------------------------------

N_MDS = 40


def _mds_write(out, compression, hashes=("sha1", "xxh64")):
    from streaming import MDSWriter
    from streaming.base.format.mds.encodings import mds_encode

    columns = {"key": "str", "jpg": "jpeg", "pngbytes": "bytes", "pilimg": "pil", "caption": "str", "label": "int",
               "emb": "ndarray:float32", "pickled": "pkl"}
    rows = []
    with MDSWriter(out=out, columns=columns, compression=compression, hashes=list(hashes), size_limit=1 << 13) as w:
        for n in range(N_MDS):
            pixels = np.random.default_rng(100 + n).integers(0, 256, (16, 16, 3), dtype=np.uint8)
            buf = io.BytesIO()
            Image.fromarray(pixels).save(buf, format="PNG")
            row = {"key": f"m{n:03d}", "jpg": Image.open(io.BytesIO(jpeg(n))), "pngbytes": buf.getvalue(),
                   "pilimg": Image.fromarray(pixels), "caption": f"mds caption {n}", "label": n % 7,
                   "emb": np.full((2, 3), n, np.float32), "pickled": {"n": n}}
            w.write(row)
            rows.append({**row, "pixels": pixels, "jpeg": mds_encode("jpeg", row["jpg"])})  # the bytes the column holds
    return rows


@pytest.fixture(scope="module")
def mds_sets(tmp_path_factory):
    root = tmp_path_factory.mktemp("mds")
    return {c: (str(root / c), _mds_write(str(root / c), c)) for c in ("zstd", "gz")}


@pytest.mark.parametrize("compression", ["zstd", "gz"])
def test_compressed_mds_columns_decode_to_what_was_written(mds_sets, compression, tmp_path):
    path, rows = mds_sets[compression]
    listing = sorted(os.listdir(path))
    cache = str(tmp_path / "cache")
    order = dict(shuffle=False, streams=1, batch_size=8, cache_dir=cache)
    jpg = [k for b in batches(plain(path, "mds", fields={"image": "jpg"}, **order), 5) for k in zip(b["key"], b["x"], b["caption"])]
    assert [k for k, _, _ in jpg] == [r["key"] for r in rows]
    for (_, x, caption), r in zip(jpg, rows):
        assert torch.equal(x, expected_image(r["jpeg"], 16)) and caption == r["caption"]
    exact = torch.stack([torch.from_numpy(r["pixels"]).permute(2, 0, 1).float() / 127.5 - 1 for r in rows])
    for column in ("pngbytes", "pilimg"):  # lossless: the exact pixels
        got = torch.cat([b["x"] for b in batches(plain(path, "mds", fields={"image": column}, **order), 5)])
        assert torch.equal(got, exact), column
    labels = torch.cat([b["y"] for b in batches(plain(path, "mds", cond="class", fields={"image": "jpg"}, **order), 5)])
    assert labels.tolist() == [r["label"] for r in rows]
    assert sorted(os.listdir(path)) == listing  # nothing written beside the data: decompressed copies live in the cache
    with pytest.raises(ValueError, match="column 'pickled' .* is encoded 'pkl'.*never unpickled"):
        build_loader(plain(path, "mds", fields={"image": "pickled"}, **order), 0, 1)


def test_a_damaged_mds_shard_fails_its_hash_and_is_skipped_and_counted(tmp_path, caplog):
    path = str(tmp_path / "set")
    rows = _mds_write(path, "zstd")
    index = json.load(open(os.path.join(path, "index.json")))["shards"]
    victim = index[1]
    with open(os.path.join(path, victim["zip_data"]["basename"]), "r+b") as f:
        f.seek(20)
        f.write(b"\x00\x01\x02\x03")
    cfg = plain(path, "mds", fields={"image": "jpg"}, shuffle=False, streams=1, batch_size=8, cache_dir=str(tmp_path / "c"),
                max_skipped_fraction=1.0)
    with caplog.at_level(logging.WARNING, logger="ditill.data"):
        loader = build_loader(cfg, 0, 1)
        keys = [k for b in batches(cfg, 5, loader=loader) for k in b["key"]]
    lost = {r["key"] for r in rows[index[0]["samples"]:index[0]["samples"] + victim["samples"]]}
    assert loader.stats()["data/skipped/shard_error"] == victim["samples"] and not lost & set(keys)
    assert "hash" in caplog.text and "index.json records" in caplog.text


# --- resharding into DiTill's layout -------------------------------------------------------------

def test_make_shards_reshards_webdataset_and_mds_sets(tmp_path, i2d, mds_sets, capsys):
    from launch import make_shards

    root, samples = i2d
    out = str(tmp_path / "ditill-wds")
    assert make_shards.main(["--source", "webdataset", "--input", root, "--format", "mds", "--out", out,
                             "--samples-per-shard", "10"]) == 0
    assert "wrote 45 samples" in capsys.readouterr().out
    got = {}
    for b in batches(DataConfig(format="mds", path=out, cond="caption", batch_size=5, image_size=16, shuffle=False), 9):
        for k, x, c in zip(b["key"], b["x"], b["caption"]):
            got[k] = (x, c)
    assert set(got) == set(samples)  # img2dataset's keys kept
    for k, (x, c) in got.items():
        assert torch.equal(x, expected_image(samples[k]["jpg"], 16)) and c == samples[k]["txt"].decode()
    path, rows = mds_sets["zstd"]
    out2 = str(tmp_path / "ditill-from-mds")
    assert make_shards.main(["--source", "mds", "--input", path, "--fields", "image=pilimg", "--format", "wds",
                             "--out", out2, "--cache-dir", str(tmp_path / "cache")]) == 0
    exact = {r["key"]: torch.from_numpy(r["pixels"]).permute(2, 0, 1).float() / 127.5 - 1 for r in rows}
    loaded = batches(DataConfig(format="wds", path=out2, cond="class", batch_size=8, image_size=16, flip=False), 5)
    assert {k for b in loaded for k in b["key"]} == set(exact)
    assert all(torch.equal(x, exact[k]) for b in loaded for k, x in zip(b["key"], b["x"]))  # pil pixels → PNG, lossless
    assert all(int(y) == int(k[1:]) % 7 for b in loaded for k, y in zip(b["key"], b["y"]))  # the label column became cls
