"""A run's checkpoint → consolidated safetensors of the student and its EMA (with the config in the
metadata, so `models.load_pretrained` rebuilds the exact architecture, e.g. to use it as a teacher).

Reads the sharded DCP checkpoint without a process group; any number of ranks may have written it.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from models import build_model
from models.convert import save_safetensors
from trainer.build import student_config
from trainer.checkpoint import CheckpointError, PREFIX, step_dir_name
from trainer.config import RunConfig
from trainer.manifest import MANIFEST, verify


def read_run_config(run_dir: Path) -> RunConfig:
    """The resolved config a run wrote, without re-validating paths that may not exist here."""
    path = Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {run_dir} is not a DiTill run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))


def checkpoint_dir(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint at `step`, or the one `latest` names; verified against its manifest."""
    root = Path(run_dir) / "checkpoints"
    if step is None:
        latest = root / "latest"
        if not latest.exists():
            raise CheckpointError(f"{root} has no `latest` checkpoint; pass a step (have: {sorted(p.name for p in root.glob(PREFIX + '*'))})")
        path = root / latest.read_text().strip()
    else:
        path = root / step_dir_name(step)
    verdict = verify(path) if (path / MANIFEST).exists() else None
    if verdict is None or not verdict.ok:
        raise CheckpointError(f"cannot export {path}: {verdict.reason if verdict else 'no manifest (incomplete or missing)'}")
    return path


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None) -> dict[str, Path]:
    """Write `student.safetensors` and `ema.safetensors`; returns their paths."""
    run_dir = Path(run_dir)
    cfg = read_run_config(run_dir)
    ckpt = checkpoint_dir(run_dir, step)
    mcfg = student_config(cfg)
    student, ema = build_model(mcfg), build_model(mcfg)
    state = {"engine": {"student": student.state_dict(), "ema": ema.state_dict()}}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
    out = Path(out_dir) if out_dir is not None else ckpt
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("student", "ema"):
        paths[name] = out / f"{name}.safetensors"
        save_safetensors(state["engine"][name], mcfg, paths[name])
    return paths
