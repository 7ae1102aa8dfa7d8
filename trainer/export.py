"""A run's checkpoint → consolidated safetensors of the student and its EMA (with the config in the
metadata, so `models.load_pretrained` rebuilds the exact architecture, e.g. to use it as a teacher).

Works without a process group, whatever number of ranks wrote the checkpoint, for both formats:
- `dcp` (single, DDP, FSDP2): DCP loads the sharded state into full, unsharded modules;
- `deepspeed` (ZeRO 1/2/3): the student from the fp32 master partitions with DeepSpeed's own
  `zero_to_fp32` consolidation, the EMA stitched from every rank's fragment file.
"""
from __future__ import annotations

from pathlib import Path

import torch.distributed.checkpoint as dcp
from omegaconf import OmegaConf

from models import build_model
from models.convert import save_safetensors
from trainer.build import student_config
from trainer.checkpoint import CONFIG, PREFIX, CheckpointError, parse_step, step_dir_name
from trainer.config import RunConfig
from trainer.manifest import MANIFEST, read_manifest, verify


def read_run_config(run_dir: Path, checkpoint: Path | None = None) -> RunConfig:
    """The resolved config saved with `checkpoint` (else the run's), without re-validating paths that may
    not exist here."""
    path = Path(checkpoint) / CONFIG if checkpoint is not None and (Path(checkpoint) / CONFIG).exists() else Path(run_dir) / "config.yaml"
    if not path.exists():
        raise CheckpointError(f"{path} does not exist: {run_dir} is not a DiTill run directory")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(RunConfig), OmegaConf.load(path)))


def checkpoint_dir(run_dir: Path, step: int | None = None) -> Path:
    """The checkpoint at `step`, or the newest valid one; verified against its manifest."""
    root = Path(run_dir) / "checkpoints"
    if step is not None:
        path = root / step_dir_name(step)
        verdict = verify(path) if (path / MANIFEST).exists() else None
        if verdict is None or not verdict.ok:
            have = sorted(p.name for p in root.glob(PREFIX + "*"))
            raise CheckpointError(f"cannot export {path}: {verdict.reason if verdict else 'no manifest (incomplete or missing)'}; have {have}")
        return path
    reasons = []
    for path in sorted(root.glob(PREFIX + "*"), key=lambda p: parse_step(p) or -1, reverse=True):
        verdict = verify(path)
        if verdict.ok:
            return path
        reasons.append(verdict.reason)
    raise CheckpointError(f"no valid checkpoint under {root}" + (f": {'; '.join(reasons)}" if reasons else ""))


def run_weights(run_dir: str | Path, step: int | None = None) -> tuple[dict[str, dict], object, Path]:
    """({"student": state dict, "ema": state dict}, model config, checkpoint dir) of a run's newest valid
    checkpoint (or `step`), consolidated in memory: what `export_run` writes and `launch.sample` samples."""
    run_dir = Path(run_dir)
    ckpt = checkpoint_dir(run_dir, step)
    cfg = read_run_config(run_dir, ckpt)
    mcfg = student_config(cfg)
    manifest = read_manifest(ckpt) or {}
    if manifest.get("peft"):
        raise CheckpointError(f"{ckpt} holds only LoRA adapters (peft.method={cfg.peft.method}), not whole weights: "
                              f"export it first (python -m launch.export {run_dir}) and use the exported "
                              "ema.safetensors, which carries base and adapters")
    fmt = manifest.get("format", "dcp")
    if fmt == "dcp":
        student, ema = build_model(mcfg), build_model(mcfg)
        state = {"engine": {"student": student.state_dict(), "ema": ema.state_dict()}}
        dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)
        tensors = state["engine"]
    elif fmt == "deepspeed":
        tensors = _deepspeed_tensors(ckpt, build_model(mcfg))
    else:
        raise CheckpointError(f"{ckpt}: unknown checkpoint format {fmt!r}")
    return tensors, mcfg, ckpt


def export_run(run_dir: str | Path, out_dir: str | Path | None = None, step: int | None = None,
               merge_lora: bool = False, diffusers_lora: bool = False) -> dict[str, Path]:
    """Write `student.safetensors` and `ema.safetensors`; returns their paths.

    A PEFT run (`peft.method`) is rebuilt from its base (the teacher or init file, which must be where
    the run's config says) and its trainable tensors: by default the adapters are kept (the file loads
    back through `models.load_pretrained` as trained); `merge_lora` folds plain LoRA into the weights
    (TD-LoRA stays a runtime module: its update depends on t); `diffusers_lora` also writes the plain
    LoRA adapters in diffusers' `load_lora_weights` layout (`<out>/<name>_lora/`)."""
    ckpt = checkpoint_dir(Path(run_dir), step)
    manifest = read_manifest(ckpt) or {}
    if manifest.get("peft"):
        if manifest.get("format", "dcp") != "dcp":
            raise CheckpointError(f"{ckpt}: a PEFT checkpoint in the {manifest['format']!r} format is not supported")
        cfg = read_run_config(Path(run_dir), ckpt)
        return _export_peft(cfg, ckpt, manifest, Path(out_dir) if out_dir is not None else ckpt, merge_lora,
                            diffusers_lora)
    if merge_lora or diffusers_lora:
        raise CheckpointError(f"{ckpt} was trained without peft (peft.method=none): it has no LoRA adapters to "
                              "merge or export; drop --merge-lora / --diffusers-lora")
    tensors, mcfg, ckpt = run_weights(run_dir, parse_step(ckpt))
    out = Path(out_dir) if out_dir is not None else ckpt
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name in ("student", "ema"):
        paths[name] = out / f"{name}.safetensors"
        save_safetensors(tensors[name], mcfg, paths[name])
    return paths


def _deepspeed_tensors(ckpt: Path, template) -> dict[str, dict]:
    from trainer.engines.deepspeed import EMA_DIR, TAG, consolidate_ema, import_deepspeed

    import_deepspeed()
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    full = template.state_dict()
    buffers = {k: full[k] for k, _ in template.named_buffers() if k in full}  # pos_embed: from the constructor
    student = {**buffers, **get_fp32_state_dict_from_zero_checkpoint(str(ckpt), tag=TAG)}
    ema = {**buffers, **consolidate_ema(sorted((ckpt / EMA_DIR).glob("rank*.safetensors")))}
    for name, sd in (("student", student), ("ema", ema)):
        missing = set(full) - set(sd)
        if missing:
            raise CheckpointError(f"{ckpt}: the DeepSpeed checkpoint lacks {name} tensors {sorted(missing)[:5]}")
    return {"student": student, "ema": ema}


def _export_peft(cfg: RunConfig, ckpt: Path, manifest: dict, out: Path, merge_lora: bool,
                 diffusers_lora: bool) -> dict[str, Path]:
    """Rebuild the base exactly as training did, check it is the checkpoint's, load the trainable tensors."""
    import copy

    import torch

    from models.lora import merge_lora as merge
    from models.lora.diffusers_format import save_diffusers_lora
    from models.lora.files import save_adapted
    from trainer.build import build_student, open_teacher
    from trainer.peft import base_identity, check_base, trainable_names

    for key, path in (("teacher.path", cfg.teacher.path if cfg.teacher else None),
                      ("student.init_path", cfg.student.init_path if cfg.student.init == "path" else None)):
        if path is not None and not Path(path).exists():
            raise CheckpointError(f"{ckpt} holds adapters on a base inherited from {key}={path}, which does not exist "
                                  "here: the base is not in the checkpoint; put that file there to export")
    source = open_teacher(cfg)  # lazy: only the inherited (frozen or trainable) tensors are read
    student, plan = build_student(cfg, source.checkpoint if source is not None else None)
    if plan is not None:
        plan.apply(student)
    check_base(manifest, base_identity(cfg, student, source.identity if source is not None else {}), ckpt)
    ema = copy.deepcopy(student)
    names = trainable_names(student)
    state = {"engine": {name: {k: v for k, v in m.state_dict().items() if k in names}
                        for name, m in (("student", student), ("ema", ema))}}
    dcp.load(state, checkpoint_id=str(ckpt), no_dist=True)  # in place: the tensors are the modules' own
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for name, model in (("student", student), ("ema", ema)):
        if diffusers_lora:
            paths[f"{name}_lora"] = save_diffusers_lora(model, out / f"{name}_lora")
        if merge_lora:
            merge(model)
        paths[name] = out / f"{name}.safetensors"
        with torch.no_grad():
            save_adapted(model, paths[name])
    return paths
