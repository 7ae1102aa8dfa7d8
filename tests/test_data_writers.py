"""Shard writers: deterministic bytes, limits, counts, compatibility, sources, buckets, the CLI."""
import csv
import json
import os
import tarfile

import numpy as np
import pytest

from data.buckets import bucket_size, bucket_table, nearest_bucket
from data.manifest import read_manifest
from data.sources import digits_arrays, imagefolder_source, pairs_source
from data.writers import parse_bytes, write_dataset
from launch import make_shards
from tests.data_helpers import png, write_digits


def _files(root):
    out = {}
    for dirpath, _, names in os.walk(root):
        for n in names:
            p = os.path.join(dirpath, n)
            with open(p, "rb") as f:
                out[os.path.relpath(p, root)] = f.read()
    return out


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_same_input_gives_the_same_bytes(tmp_path, fmt):
    a = write_digits(str(tmp_path / "a"), fmt, n=300, samples_per_shard=100)
    b = write_digits(str(tmp_path / "b"), fmt, n=300, samples_per_shard=100)
    fa, fb = _files(a), _files(b)
    assert sorted(fa) == sorted(fb) and len(fa) >= 4
    assert all(fa[k] == fb[k] for k in fa)
    c = write_digits(str(tmp_path / "c"), fmt, n=300, samples_per_shard=100, seed=1)  # another order
    assert _files(c)[next(k for k in fa if k.startswith("shard"))] != fa[next(k for k in fa if k.startswith("shard"))]


def _shard_count(path, fmt):
    if fmt == "wds":
        with tarfile.open(path) as tf:
            return len({m.name.split(".")[0] for m in tf.getmembers()})
    with open(path, "rb") as f:
        return int(np.frombuffer(f.read(4), np.uint32)[0])


@pytest.mark.parametrize("fmt", ["wds", "mds"])
def test_manifest_counts_match_the_shards_and_limits_hold(tmp_path, fmt):
    m = read_manifest(write_digits(str(tmp_path / "n"), fmt, n=250, samples_per_shard=100))
    counts = [s.samples for s in m.groups[0].shards]
    assert counts == [100, 100, 50] and m.samples == 250
    for s in m.groups[0].shards:
        assert _shard_count(str(tmp_path / "n" / s.path), fmt) == s.samples
        assert os.path.getsize(tmp_path / "n" / s.path) == s.bytes
    limit = 20_000
    m = read_manifest(write_digits(str(tmp_path / "b"), fmt, n=250, samples_per_shard=10_000, shard_bytes=limit))
    assert len(m.groups[0].shards) > 2 and m.samples == 250
    assert all(s.bytes <= limit for s in m.groups[0].shards)
    assert m.fields == ["caption", "cls", "image", "json", "key"] and m.classes == [str(d) for d in range(10)]


def test_mds_shards_are_readable_by_streaming_and_tars_by_webdataset(tmp_path):
    from streaming.base.format import reader_from_json
    import webdataset as wds

    pixels = ((digits_arrays()[0] + 1) * 127.5).round().astype(np.uint8)
    mds = write_digits(str(tmp_path / "m"), "mds", n=40, samples_per_shard=20)
    with open(os.path.join(mds, "index.json")) as f:
        entry = json.load(f)["shards"][1]
    sample = reader_from_json(mds, None, entry).get_item(3)
    from PIL import Image
    import io
    i = int(sample["key"])
    assert np.array_equal(np.array(Image.open(io.BytesIO(sample["image"]))), pixels[i, 0])
    assert sample["caption"] == f"a handwritten digit {sample['cls']}" and sample["json"]["index"] == i

    tar = write_digits(str(tmp_path / "w"), "wds", n=40, samples_per_shard=20)
    got = list(wds.WebDataset(os.path.join(tar, "shard-000000.tar"), shardshuffle=False))
    assert len(got) == 20 and {"__key__", "png", "cls", "txt", "json"} <= set(got[0])


def test_imagefolder_source_labels_classes_and_skips_broken_files(tmp_path, caplog):
    root = tmp_path / "folder"
    for cls, names in {"cat": ["a.png", "b.jpg"], "dog": ["c.bmp", "d.png"]}.items():
        (root / cls).mkdir(parents=True)
        for j, name in enumerate(names):
            from PIL import Image
            import io
            buf = io.BytesIO()
            Image.open(io.BytesIO(png(12, 20, seed=j))).save(buf, format={"png": "PNG", "jpg": "JPEG", "bmp": "BMP"}[name[-3:]])
            (root / cls / name).write_bytes(buf.getvalue())
    (root / "dog" / "e.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    src = imagefolder_source(str(root))
    assert src.classes == ["cat", "dog"] and len(src.items) == 5
    report = write_dataset(src, str(tmp_path / "out"), "wds", samples_per_shard=10)
    assert len(report.skipped) == 1 and "e.png" in report.skipped[0] and "e.png" in caplog.text
    with tarfile.open(tmp_path / "out" / "shard-000000.tar") as tf:
        names = tf.getnames()
        meta = [json.loads(tf.extractfile(n).read()) for n in names if n.endswith(".json")]
        labels = {m["source"]: int(tf.extractfile(n.replace(".json", ".cls")).read()) for m, n in
                  zip(meta, [n for n in names if n.endswith(".json")])}
    assert labels == {"cat/a.png": 0, "cat/b.jpg": 0, "dog/c.bmp": 1, "dog/d.png": 1}
    assert sum(n.endswith(".png") for n in names) == 3 and sum(n.endswith(".jpg") for n in names) == 1  # bmp → png
    assert all(m["original_size"] == [12, 20] for m in meta)
    with pytest.raises(ValueError, match="no class sub-folders"):
        imagefolder_source(str(root / "cat"))


def test_pairs_from_jsonl_and_csv(tmp_path):
    (tmp_path / "img").mkdir()
    for i in range(3):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(8, 8, seed=i))
    rows = [{"image": f"img/{i}.png", "caption": f"picture number {i}"} for i in range(3)]
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with open(tmp_path / "p.csv", "w", newline="") as f:
        w = csv.DictWriter(f, ["image", "caption"])
        w.writeheader()
        w.writerows(rows)
    for table in ("p.jsonl", "p.csv"):
        src = pairs_source(str(tmp_path / table))
        assert [it.load()["caption"] for it in src.items] == [r["caption"] for r in rows]
    (tmp_path / "bad.jsonl").write_text('{"image": "img/0.png"}\n')
    with pytest.raises(ValueError, match="row 1: column 'caption' is missing"):
        pairs_source(str(tmp_path / "bad.jsonl"))
    with pytest.raises(FileNotFoundError):
        pairs_source(str(tmp_path / "missing.jsonl"))


def test_bucketed_writing_groups_by_aspect_ratio(tmp_path):
    (tmp_path / "img").mkdir()
    sizes = [(16, 64), (64, 16), (32, 32), (33, 31), (17, 60)]
    rows = []
    for i, (h, w) in enumerate(sizes):
        (tmp_path / "img" / f"{i}.png").write_bytes(png(h, w, seed=i))
        rows.append({"image": f"img/{i}.png", "caption": f"c {i}"})
    (tmp_path / "p.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    m = write_dataset(pairs_source(str(tmp_path / "p.jsonl")), str(tmp_path / "out"), "mds", bucket_resolution=64).manifest
    assert {g.key: g.samples for g in m.groups} == {"0.25": 1, "0.28": 1, "1.0": 1, "1.07": 1, "4.0": 1}
    assert m.bucketed and all(s.path.startswith(f"bucket-{g.key}/") for g in m.groups for s in g.shards)
    assert all(os.path.exists(tmp_path / "out" / f"bucket-{g.key}" / "index.json") for g in m.groups)


def test_bucket_table_is_pixart_sigmas():
    table = bucket_table(1024)
    assert len(table) == 41 and table["1.0"] == (1024, 1024) and table["0.25"] == (512, 2048) and table["1.91"] == (1344, 704)
    from diffusers.pipelines.pixart_alpha.pipeline_pixart_alpha import ASPECT_RATIO_1024_BIN, ASPECT_RATIO_512_BIN

    for ref, res in ((ASPECT_RATIO_1024_BIN, 1024), (ASPECT_RATIO_512_BIN, 512)):
        assert all(bucket_table(res)[k] == tuple(int(v) for v in hw) for k, hw in ref.items())
    assert bucket_size("0.57", 256) == (192, 336) and nearest_bucket(300, 500) == "0.6"
    with pytest.raises(ValueError, match="multiple of 16"):
        bucket_table(100)


def test_make_shards_cli(tmp_path, capsys):
    out = str(tmp_path / "d")
    assert make_shards.main(["--source", "digits", "--format", "wds", "--out", out, "--samples-per-shard", "600"]) == 0
    assert "wrote 1797 samples in 3 wds shards" in capsys.readouterr().out
    assert read_manifest(out).samples == 1797
    with pytest.raises(FileExistsError, match="not empty"):
        make_shards.main(["--source", "digits", "--format", "wds", "--out", out])
    with pytest.raises(SystemExit):
        make_shards.main(["--source", "imagefolder", "--format", "mds", "--out", str(tmp_path / "e")])


def test_parse_bytes():
    assert parse_bytes("4096") == 4096 and parse_bytes("256MB") == 256_000_000 and parse_bytes("1GiB") == 2**30
    with pytest.raises(ValueError, match="not a size"):
        parse_bytes("lots")
