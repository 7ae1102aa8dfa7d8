"""Process-group setup from whatever launched us: a plain process, torchrun, srun or deepspeed.

The same command line works under each launcher because rank, world size and the rendezvous
address are read from the environment the launcher leaves, and CUDA+NCCL or CPU+gloo is picked by
what the machine has.
"""
from __future__ import annotations

import os
import re
import socket
import warnings
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist


@dataclass
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _first_slurm_host(nodelist: str) -> str:
    """First host of a SLURM nodelist such as `node[03-05,07],gpu1` → `node03`."""
    m = re.match(r"^([^,\[]+)(\[([^\]]+)\])?", nodelist)
    if not m:
        return nodelist
    prefix, ranges = m.group(1), m.group(3)
    if not ranges:
        return prefix
    first = ranges.split(",")[0].split("-")[0]
    return prefix + first


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_from_launcher() -> tuple[int, int, int]:
    """(rank, world_size, local_rank), filling MASTER_ADDR/PORT for SLURM when srun launched us."""
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # torchrun, deepspeed, submitit (we set it)
        return int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ.get("LOCAL_RANK", 0))
    if "SLURM_PROCID" in os.environ and "SLURM_NTASKS" in os.environ:
        os.environ.setdefault("MASTER_ADDR", _first_slurm_host(os.environ.get("SLURM_JOB_NODELIST", "127.0.0.1")))
        os.environ.setdefault("MASTER_PORT", str(20000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 20000))
        return int(os.environ["SLURM_PROCID"]), int(os.environ["SLURM_NTASKS"]), int(os.environ.get("SLURM_LOCALID", 0))
    return 0, 1, 0


def init_distributed(timeout_s: int = 600) -> DistEnv:
    """Start the default process group (a one-rank group for a plain process, so every code path —
    checkpoint collectives, metric reductions — is the same whatever the world size).

    `timeout_s` is `engine.collective_timeout_s`: the loop's stall watchdog fires after it and dumps
    every rank's stacks; the process group itself times out a minute later, as a backstop."""
    from trainer.watchdog import GRACE_S

    rank, world, local = env_from_launcher()
    use_cuda = torch.cuda.is_available()
    backend = "nccl" if use_cuda else "gloo"
    device = torch.device("cuda", local % max(torch.cuda.device_count(), 1)) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        timeout = timedelta(seconds=timeout_s + 2 * GRACE_S)
        if world == 1 and "MASTER_ADDR" not in os.environ:
            store = dist.HashStore()
            dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timeout)
        else:
            os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
            os.environ.setdefault("MASTER_PORT", str(_free_port()))
            kwargs = {"device_id": device} if use_cuda else {}
            dist.init_process_group(backend, rank=rank, world_size=world, timeout=timeout, **kwargs)
    if (rank == 0 and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True"
            and int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", "0")) > 0):
        warnings.warn(
            "torchrun with --max-restarts shares its rendezvous store with the workers: after an elastic restart the "
            "new workers can read the previous round's addresses and fail to connect (seen with torch 2.14). "
            "Export TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 before torchrun."
        )
    return DistEnv(rank=rank, world_size=world, local_rank=local, device=device, backend=backend)


def destroy_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(values: dict[str, float], device: torch.device) -> dict[str, float]:
    """Average scalar metrics across ranks in one collective."""
    if not values:
        return {}
    keys = sorted(values)
    t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t)
        t /= dist.get_world_size()
    return dict(zip(keys, t.tolist()))


def agree(flags: list[bool], device: torch.device) -> list[bool]:
    """Each flag True on every rank if it is True on any rank, in one collective (ranks must agree
    before acting: on a preemption, on skipping a step)."""
    t = torch.tensor([1 if f else 0 for f in flags], dtype=torch.int32, device=device)
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if `flag` is True on any rank."""
    return agree([flag], device)[0]


def global_batch_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of per-sample values over every rank's micro-batch, differentiable.

    A loss that is nonlinear in a batch mean (DyDiT's FLOPs loss, (mean r − λ)²) must see the global
    micro-batch's mean, or a run on N ranks optimises a different objective than one process. The
    backward of the all-reduce sums every rank's gradient of the (identical) loss, which DDP/FSDP
    then average: each sample's gradient is exactly the single-process one.
    """
    total = x.float().sum()
    world = dist.get_world_size() if dist.is_initialized() else 1
    if world > 1:
        from torch.distributed.nn.functional import all_reduce

        total = all_reduce(total)
    return total / (x.numel() * world)
