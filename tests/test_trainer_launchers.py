"""The same `launch.train` command under SLURM's srun: rank, world and rendezvous from SLURM_* only."""
import subprocess
import sys

import pytest

from tests.trainer_utils import REPO, assert_ok, base_env, free_port, losses, run_train, write_config
from trainer.distributed import _first_slurm_host


@pytest.mark.parametrize(
    "nodelist,first",
    [("node07", "node07"), ("node[03-05,07],gpu1", "node03"), ("gpu[12,14]", "gpu12"), ("a-b-1,a-b-2", "a-b-1")],
)
def test_first_host_of_a_slurm_nodelist(nodelist, first):
    assert _first_slurm_host(nodelist) == first


def test_srun_style_environment_matches_single_process(tmp_path):
    cfg = write_config(tmp_path / "c.yaml", model="lit-s/2", train={"steps": 3})
    single = run_train(cfg, [f"run_dir={tmp_path / 'single'}"])
    assert_ok(single)
    port = next(p for p in (free_port() for _ in range(200)) if 20000 <= p < 40000)  # SLURM rule: 20000 + id % 20000
    env = base_env(SLURM_NTASKS="2", SLURM_JOB_NODELIST="127.0.0.1", SLURM_JOB_ID=str(port - 20000))
    procs = [
        subprocess.Popen([sys.executable, "-m", "launch.train", str(cfg), f"run_dir={tmp_path / 'srun'}", "engine.kind=ddp"],
                         cwd=REPO, env={**env, "SLURM_PROCID": str(r), "SLURM_LOCALID": str(r)},
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for r in range(2)
    ]
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
    assert losses(tmp_path / "srun") == pytest.approx(losses(tmp_path / "single"), rel=1e-5)
