"""DeepSpeed ZeRO-3 (DS_ACCELERATOR=cpu, two ranks) with a sharded teacher: the frozen teacher in its
own FSDP2 units, each rank reading only its rows, while the LiT student is partitioned by
`zero.Init` and inherits partition by partition. Its losses equal those of the same run with a
replicated teacher (the teacher computes exactly the same function either way)."""
from __future__ import annotations

import pytest
import torch

from tests.fault_utils import finish, losses_by_step, start, tail, torchrun_cmd
from tests.trainer_utils import TINY_ARGS, base_env, free_port, write_config

pytest.importorskip("deepspeed")


def test_zero3_with_a_sharded_teacher_matches_the_replicated_teacher_run(tmp_path):
    from models import build_model
    from models.convert import save_safetensors
    from tests.helpers import randomize_

    torch.manual_seed(0)
    teacher = randomize_(build_model("dit-s/2", **TINY_ARGS), seed=1, std=0.05)
    path = tmp_path / "teacher.safetensors"
    save_safetensors(teacher.state_dict(), teacher.config, path)
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", student={"init": "inherit"}, teacher={"path": str(path)},
                       train={"steps": 3, "log_every": 1}, checkpoint={"every": 3})
    runs = {}
    for shard in ("true", "false"):
        run = tmp_path / f"shard-{shard}"
        overrides = [f"run_dir={run}", "engine.kind=deepspeed", "engine.deepspeed_config=configs/deepspeed/zero3.json",
                     f"teacher.shard={shard}"]
        proc = start(torchrun_cmd(cfg, overrides, 2, f"--master_port={free_port()}"), tmp_path / f"{shard}.log",
                     base_env(DS_ACCELERATOR="cpu"))
        assert finish([proc]) == [0], tail(tmp_path / f"{shard}.log")
        runs[shard] = losses_by_step(run)
        placed = "(sharded, 5" if shard == "true" else "(replicated, float32)"
        assert f"teacher={path} {placed}" in tail(tmp_path / f"{shard}.log", 100000)
    assert sorted(runs["true"]) == [1, 2, 3]
    assert runs["true"] == runs["false"]  # exactly: the sharded teacher's outputs are bit-identical
    assert all(v > 0 for v in runs["true"].values())
