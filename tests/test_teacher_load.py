"""Teachers larger than one device: built on the meta device, each rank reading only its rows.

On 2 ranks (one torchrun job, tests/teacher_load_worker.py): a sharded teacher computes exactly what a
replicated one does (and what `load_pretrained` does) for every format, holds about half of the
elements per rank and keeps its stored dtype; a student inheriting through its FSDP2 shards (and its
EMA) equals one inheriting from the whole teacher; rank 1 takes the teacher identity rank 0 computed.
In one process: the digest cache, `teacher.dtype`, and `launch.train` reading no weights before the
process group exists."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from models import build_model, load_pretrained
from models.convert import read_checkpoint, save_safetensors
from models.inherit import default_exclude, inherit_weights
from tests.helpers import randomize_, tiny_inputs
from tests.trainer_utils import REPO, base_env, free_port, write_config

# dit-s width (384 → 6 heads, inferable from an official .pt without metadata) at toy depth and resolution
TEACHER_ARGS = dict(depth=2, hidden_size=384, num_heads=6, input_size=8, in_channels=4, num_classes=10)
STUDENT_ARGS = {**TEACHER_ARGS, "num_heads": 2}


def _teacher(seed: int = 1):
    torch.manual_seed(0)
    return randomize_(build_model("dit-s/2", **TEACHER_ARGS), seed=seed).eval()


@pytest.fixture(scope="module")
def teachers(tmp_path_factory):
    diffusers = pytest.importorskip("diffusers")
    root = tmp_path_factory.mktemp("teachers")
    model = _teacher()
    save_safetensors(model.state_dict(), model.config, root / "fp32.safetensors")
    save_safetensors({k: v.bfloat16() for k, v in model.state_dict().items()}, model.config, root / "bf16.safetensors")
    torch.save({"ema": model.state_dict()}, root / "official.pt")
    torch.manual_seed(3)
    d = diffusers.DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=8,
                                        num_layers=2, sample_size=8, patch_size=2, num_embeds_ada_norm=10, norm_eps=1e-6)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn_like(p) * 0.2)
    for block in d.transformer_blocks[1:]:
        block.norm1.emb.load_state_dict(d.transformer_blocks[0].norm1.emb.state_dict())
    d.save_pretrained(root / "diffusers", max_shard_size="40KB")  # sharded, with an index
    return {name: str(root / name) for name in ("fp32.safetensors", "bf16.safetensors", "official.pt", "diffusers")}


@pytest.fixture(scope="module")
def two_ranks(teachers, tmp_path_factory):
    out = tmp_path_factory.mktemp("ranks")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", f"--master_port={free_port()}",
           "-m", "tests.teacher_load_worker", str(out), *teachers.values()]
    proc = subprocess.run(cmd, cwd=REPO, env=base_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return [torch.load(out / f"rank{r}.pt", weights_only=True) for r in (0, 1)]


def test_sharded_teacher_computes_exactly_what_a_replicated_one_does(teachers, two_ranks):
    x, t, y = tiny_inputs(batch=3, channels=4)
    for name, path in teachers.items():
        for dtype in ("stored", "fp32"):
            seen = [r["teachers"][path][dtype] for r in two_ranks]
            for rank, s in enumerate(seen):
                assert torch.equal(s["sharded"], s["replicated"]), (name, dtype, rank)
                assert torch.equal(s["again"], s["sharded"]), (name, dtype, rank)  # shards intact after a forward
                # each rank holds half of every tensor (rows rounded up) and the whole position embedding
                assert 0.45 < s["share"] < 0.56, (name, dtype, rank, s["share"])
            assert torch.equal(seen[0]["sharded"], seen[1]["sharded"]), (name, dtype)
        if name != "bf16.safetensors":  # an fp32 file: the same function as the whole fp32 model
            with torch.no_grad():
                ref = load_pretrained(path)(x, t, y)
            assert torch.equal(two_ranks[0]["teachers"][path]["stored"]["sharded"], ref), name


def test_a_bf16_teacher_stays_bf16_unless_asked(teachers, two_ranks):
    bf16 = two_ranks[0]["teachers"][teachers["bf16.safetensors"]]
    assert bf16["stored"]["dtypes"] == ["torch.bfloat16"] and bf16["stored"]["sharded"].dtype == torch.bfloat16
    assert bf16["fp32"]["dtypes"] == ["torch.float32"]
    assert two_ranks[0]["teachers"][teachers["fp32.safetensors"]]["stored"]["dtypes"] == ["torch.float32"]
    x, t, y = tiny_inputs(batch=3, channels=4)
    with torch.no_grad():  # the reference: the whole model, its (bf16) values, computed in bf16
        ref = load_pretrained(teachers["bf16.safetensors"]).to(torch.bfloat16)(x, t, y)
        ref32 = load_pretrained(teachers["bf16.safetensors"])(x, t, y)
    assert torch.equal(bf16["stored"]["sharded"], ref) and torch.equal(bf16["fp32"]["sharded"], ref32)


def test_student_inheriting_through_its_shards_equals_one_inheriting_the_whole_teacher(teachers, two_ranks):
    path = teachers["fp32.safetensors"]
    torch.manual_seed(0)  # what build_student does on every rank
    ref = build_model("lit-s/2", **STUDENT_ARGS)
    teacher = read_checkpoint(path)
    report = inherit_weights(ref, teacher.state_dict, default_exclude(teacher.config, ref.config))
    assert sorted(two_ranks[0]["inherited"]) == sorted(report.inherited) and report.skipped
    for rank in (0, 1):
        for what in ("student", "ema"):
            got = two_ranks[rank][what]
            assert got.keys() == ref.state_dict().keys()
            for k, v in ref.state_dict().items():
                assert torch.equal(got[k], v), (rank, what, k)


def test_rank_0_computes_the_teacher_identity_and_the_others_receive_it(teachers, two_ranks, tmp_path, monkeypatch):
    from trainer.build import teacher_identity

    monkeypatch.setenv("DITILL_CACHE_DIR", str(tmp_path))
    expected = teacher_identity(teachers["fp32.safetensors"], _teacher().config)
    assert two_ranks[0]["identity"] == two_ranks[1]["identity"] == expected  # rank 1's stale entry unread


def _cfg(tmp_path, path: str, *overrides: str):
    from trainer.config import load_config

    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", args=STUDENT_ARGS, student={"init": "inherit"},
                       teacher={"path": path}, train={"steps": 1})
    return load_config(cfg, [f"run_dir={tmp_path / 'run'}", *overrides], world_size=1)


def test_teacher_identity_is_hashed_once_per_file_and_again_when_it_changes(tmp_path, monkeypatch):
    """`open_teacher` (what every launch runs) reads the digest from the cache while the file's path,
    size, mtime and inode are unchanged; a re-export (same bytes, new inode), a touch and new weights
    are each hashed again."""
    import os

    import trainer.build as build

    monkeypatch.setenv("DITILL_CACHE_DIR", str(tmp_path / "cache"))
    calls = []
    real = build._identity_hash
    monkeypatch.setattr(build, "_identity_hash", lambda files: calls.append(files) or real(files))
    model = _teacher()
    path = tmp_path / "teacher.safetensors"
    save_safetensors(model.state_dict(), model.config, path)
    cfg = _cfg(tmp_path, str(path))
    first = build.open_teacher(cfg).identity
    assert build.open_teacher(cfg).identity == first and len(calls) == 1  # the second launch: a cache hit
    save_safetensors(model.state_dict(), model.config, path)  # re-exported: same weights, new file
    assert build.open_teacher(cfg).identity == first and len(calls) == 2
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))
    assert build.open_teacher(cfg).identity == first and len(calls) == 3
    changed = _teacher(seed=2)
    save_safetensors(changed.state_dict(), changed.config, path)
    assert build.open_teacher(cfg).identity["sha256"] != first["sha256"] and len(calls) == 4
    assert len(list((tmp_path / "cache" / "digests").iterdir())) == 2  # identity + the file's content digest


def test_teacher_identity_is_the_first_waves_so_its_checkpoints_resume(teachers, tmp_path, monkeypatch):
    """A manifest written by the first wave holds sha256(file name + bytes) for a pickled teacher and
    sha256(file name + content digest) for safetensors: the cached identity is the same hash."""
    import hashlib
    from pathlib import Path

    from models.convert import weights_digest
    from trainer.build import teacher_identity

    monkeypatch.setenv("DITILL_CACHE_DIR", str(tmp_path))
    pt, st = Path(teachers["official.pt"]), Path(teachers["fp32.safetensors"])
    cfg = _teacher().config
    assert teacher_identity(str(pt), cfg)["sha256"] == hashlib.sha256(pt.name.encode() + pt.read_bytes()).hexdigest()
    first_wave = hashlib.sha256(st.name.encode() + weights_digest(st, cache=False).encode()).hexdigest()
    assert teacher_identity(str(st), cfg)["sha256"] == first_wave


def test_teacher_dtype_defaults_to_stored_and_the_first_waves_auto_still_validates(tmp_path):
    from trainer.config import ConfigError
    from trainer.distributed import DistEnv
    from trainer.engines.placement import replicate_teacher

    model = _teacher()
    path = tmp_path / "bf16.safetensors"
    save_safetensors({k: v.bfloat16() for k, v in model.state_dict().items()}, model.config, path)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"), backend="gloo")
    ckpt = read_checkpoint(path, lazy=True)
    want = {"stored": torch.bfloat16, "auto": torch.float32, "fp32": torch.float32, "bf16": torch.bfloat16}
    for dtype, expected in want.items():
        cfg = _cfg(tmp_path, str(path), *([] if dtype == "stored" else [f"teacher.dtype={dtype}"]))
        assert cfg.teacher.dtype == dtype  # stored is the default; auto (first-wave configs) validates
        placed = replicate_teacher(ckpt, cfg, env)
        assert {t.dtype for t in placed.state_dict().values()} == {expected}, dtype
    with pytest.raises(ConfigError, match=r"teacher.dtype='fp16'.*'stored'"):
        _cfg(tmp_path, str(path), "teacher.dtype=fp16")
    deepspeed = _cfg(tmp_path, str(path), "engine.kind=deepspeed", "engine.deepspeed_config=configs/deepspeed/zero3.json",
                     "teacher.shard=true")
    assert deepspeed.teacher.shard  # no longer refused: DeepSpeed places a sharded teacher too


def test_launch_train_reads_no_weights_before_the_process_group(tmp_path, monkeypatch):
    """Validation reads the teacher file's header only; the weights are read lazily, per rank, after
    the process group started (the first wave loaded the whole teacher first)."""
    import torch.distributed as dist

    import models.convert
    import trainer.build
    import trainer.loop
    from launch.train import main

    model = _teacher()
    path = tmp_path / "teacher.safetensors"
    save_safetensors(model.state_dict(), model.config, path)
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", args=STUDENT_ARGS, student={"init": "inherit"},
                       teacher={"path": str(path)}, train={"steps": 1})
    reads = []
    real = models.convert.read_any
    monkeypatch.setattr(models.convert, "read_any",
                        lambda *a, **k: reads.append((dist.is_initialized(), k.get("lazy"))) or real(*a, **k))
    monkeypatch.setattr(trainer.loop, "_train", lambda cfg, env, preempt: (trainer.build.open_teacher(cfg),
                                                                             trainer.loop.RunResult(step=0))[1])
    assert main([str(cfg), f"run_dir={tmp_path / 'run'}"]) == 0
    assert reads == [(True, True)]


def test_a_buffer_no_weights_file_holds_keeps_its_constructed_value():
    """Parameters are built on the meta device, buffers as the constructor computes them: a
    non-persistent one (a RoPE table) survives allocation; the rest comes from the weights."""
    from models.sharded_load import build_meta, fill, set_dtypes, state_tensors, to_empty_keeping_buffers

    class Rope(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = torch.nn.Linear(4, 6)
            self.register_buffer("freqs", torch.arange(6.0).exp(), persistent=False)
            self.register_buffer("scale", torch.full((6,), 2.0))

    torch.manual_seed(0)
    ref = Rope()
    ref.scale.fill_(3.0)
    model = build_meta(Rope)
    assert all(p.is_meta for p in model.parameters()) and not model.freqs.is_meta
    state = {k: v.bfloat16() for k, v in ref.state_dict().items()}
    set_dtypes(model, state, None)
    to_empty_keeping_buffers(model, torch.device("cpu"))
    assert sorted(fill(model, state)) == sorted(state_tensors(model)) == ["proj.bias", "proj.weight", "scale"]
    assert torch.equal(model.freqs, ref.freqs)  # constructed, kept
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items()) and model.proj.weight.dtype == torch.bfloat16
