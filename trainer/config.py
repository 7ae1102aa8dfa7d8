"""The run's configuration: one typed dataclass tree, YAML + dotted overrides, validated up front.

`load_config(path, overrides, world_size)` is called before any process group exists, so a typo
costs seconds, not a queue wait. Every error names the key, the value and what is allowed.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException, ValidationError

from data.config import DataConfig


@dataclass
class StudentConfig:
    model: str = "lit-s/2"  # registry name (models/registry.py)
    args: Dict[str, Any] = field(default_factory=dict)  # the family config's overrides, e.g. {depth: 2}
    init: str = "inherit"  # inherit (from the teacher) | random | path
    init_path: Optional[str] = None  # with init=path: a checkpoint any format load_pretrained reads
    inherit_exclude: Optional[List[str]] = None  # key patterns not copied; None = the family's rule


@dataclass
class TeacherConfig:
    path: Optional[str] = None  # official DiT .pt, diffusers dir, or our safetensors export
    prefer: str = "ema"  # which weights of a training checkpoint: ema | model
    shard: bool = False  # shard the frozen teacher in its own FSDP2 units, each rank reading only its rows (else replicate)
    # stored (each tensor keeps the file's dtype: a bf16 teacher stays bf16) | fp32 | bf16 |
    # auto (the first wave's default: bf16 on GPU, fp32 on CPU, whatever the file holds)
    dtype: str = "stored"
    allow_changed: bool = False  # resume even if the teacher's identity differs from the checkpoint's


@dataclass
class DiffusionConfig:
    objective: str = "gaussian"  # gaussian (DDPM, learned sigma) | flow (rectified flow)
    num_timesteps: int = 1000  # gaussian: discrete steps
    # gaussian: uniform | stratified (DyDiT's --t_sample); flow: uniform | logit_normal (SD3's)
    timestep_sampling: str = "uniform"
    logit_mean: float = 0.0  # flow, logit_normal: t = sigmoid(N(mean, std²))
    logit_std: float = 1.0
    shift: float = 1.0  # flow: SD3's fixed time shift s (1 = none)
    dynamic_shift: bool = False  # flow: FLUX's resolution-dependent shift, mu linear in the image tokens
    base_shift: float = 0.5  # mu at base_seq_len image tokens (FLUX: 0.5 at 256)
    max_shift: float = 1.15  # mu at max_seq_len image tokens (FLUX: 1.15 at 4096)
    base_seq_len: int = 256
    max_seq_len: int = 4096
    cfg_dropout: float = 0.1  # guidance dropout, one draw shared by teacher and student
    # guidance value fed to a guidance-distilled model (FLUX-dev), drawn per sample from [min, max]
    guidance_range: List[float] = field(default_factory=lambda: [3.5, 3.5])


@dataclass
class DistillConfig:
    lambda_noise: float = 0.5  # λ1: MSE(ε_S, ε_T)
    lambda_var: float = 0.05  # λ2: MSE(Σ_S, Σ_T)
    diffusion_weight: float = 1.0  # weight of the ground-truth diffusion loss
    # guidance distillation: a student with a guidance input regresses the teacher's classifier-free-
    # guided output uncond + g·(cond − uncond) at its own g (drawn from diffusion.guidance_range)
    guidance_distill: bool = False
    features: List[str] = field(default_factory=list)  # module-name patterns whose outputs are matched, e.g. [blocks.*.attn]
    feature_weight: float = 0.5  # weight of the mean feature MSE over the matched modules


@dataclass
class DynamicConfig:
    flops_target: float = 0.5  # λ, the target ratio of dynamic to static FLOPs
    flops_weight: float = 2.0
    warmup_steps: int = 1000  # target annealed from 1 to λ
    hold_steps: int = 100  # target held at 1 at the start
    # official: DyDiT's 1 − (1−λ)·step/warmup (jumps below 1 when the hold ends); continuous: anneals
    # over (step − hold) / (warmup − hold), starting at 1
    warmup_schedule: str = "continuous"
    complete_model_loss: bool = False  # DyDiT stage 1: also train the complete model on the same x_t
    router_lr_mult: float = 1.0  # routers' learning rate relative to optim.lr (short runs need > 1)


@dataclass
class PeftConfig:
    """Parameter-efficient distillation (models/lora): adapters on the inherited base, which stays frozen."""

    method: str = "none"  # none (full fine-tuning) | lora | tdlora (K LoRA experts gated by the timestep)
    rank: int = 8  # LoRA rank R; TD-LoRA: the total over its experts (R/experts each): equal rank, equal adapter size
    alpha: Optional[float] = None  # the update is scaled by alpha/rank; null: alpha = rank (scale 1)
    experts: int = 4  # tdlora: K experts per adapted layer
    targets: List[str] = field(default_factory=lambda: ["attention", "mlp", "adaLN"])  # the family's parameter groups to adapt
    modules: List[str] = field(default_factory=list)  # module-name patterns to adapt instead (e.g. blocks.*.attn.qkv)
    exclude: List[str] = field(default_factory=list)  # module-name patterns never adapted
    # parameter patterns trained fully (no adapter) beside what the student did not inherit (its LiT
    # attention and DWC, its routers: those always train fully), e.g. [final_layer.*]
    train: List[str] = field(default_factory=list)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    grad_clip: float = 0.0  # max grad norm; 0 disables clipping
    warmup_steps: int = 0
    schedule: str = "constant"  # constant | cosine | linear (after warm-up)
    min_lr_ratio: float = 0.0
    fused: str = "auto"  # auto | torch | apex | none
    # {fnmatch pattern over parameter names: LR multiplier}, first match wins: e.g. a caption path that is
    # unstable at the rest's LR, {"y_embedder.*": 0.3}; the routers' multiplier applies on top
    lr_mult: Dict[str, float] = field(default_factory=dict)


@dataclass
class EMAConfig:
    decay: float = 0.9999
    warmup: bool = True  # decay_t = min(decay, (1+t)/(10+t)), so a short run's EMA tracks training
    every: int = 1


@dataclass
class EngineConfig:
    kind: str = "auto"  # auto | single | ddp | fsdp | deepspeed
    mixed_precision: str = "auto"  # auto (bf16 on GPU) | fp32 | bf16
    activation_checkpointing: str = "none"  # none | full | every-k
    ac_every: int = 2  # with every-k: checkpoint one block in k
    deepspeed_config: Optional[str] = None  # configs/deepspeed/zero2.json ...
    compile: bool = False  # torch.compile each student block
    collective_timeout_s: int = 600  # a step (or collective) slower than this is a stall: every rank dumps its stacks and exits


@dataclass
class TrainConfig:
    steps: int = 1000
    global_batch: int = 32
    micro_batch: int = 0  # per-rank micro-batch; 0 = global_batch / world_size (no accumulation)
    seed: int = 0
    log_every: int = 10
    max_nonfinite: int = 5  # consecutive NaN/Inf steps (each one skipped) before the run stops
    preempt_signals: List[str] = field(default_factory=lambda: ["SIGTERM", "SIGUSR1"])  # set a flag: save at the step boundary, exit 124


@dataclass
class CheckpointConfig:
    every: int = 500
    keep_last: int = 2  # newest complete checkpoints kept; 0 = keep all
    keep_every: int = 0  # also keep every n-th step forever; 0 = off
    async_save: bool = True  # DCP saves in the background on their own process group (DeepSpeed saves block)
    resume: str = "auto"  # auto (latest valid, else fresh) | never | a step number (must exist)


@dataclass
class SampleConfig:
    every: int = 0  # sample grids (and router plots of a dynamic student) every n steps; 0 = never
    num: int = 16
    steps: int = 50
    method: str = "ddpm"  # ddpm | ddim | euler
    cfg_scale: float = 1.5
    seed: int = 0
    # quality vs step: every n steps, eval_num samples of the EMA student (and the teacher) from per-sample
    # seeds, distributed over the ranks; FID with a local Inception file, and the teacher-relative error
    eval_every: int = 0  # 0 = never
    eval_num: int = 5000
    eval_batch: int = 32  # samples per chunk (fixed, so the values do not depend on the world size)
    inception: Optional[str] = None  # pt_inception-2015-12-05-6726825d.pth; none: only the weight-free metrics
    fid_ref: Optional[str] = None  # reference for FID: ADM batch .npz (mu/sigma), images or shards
    vae: Optional[str] = None  # local diffusers AutoencoderKL that decodes a latent model's samples to images


@dataclass
class RunConfig:
    run_dir: str = "runs/default"
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: Optional[TeacherConfig] = field(default_factory=TeacherConfig)  # null: train from scratch
    data: DataConfig = field(default_factory=DataConfig)
    diffusion: DiffusionConfig = field(default_factory=DiffusionConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    dynamic: DynamicConfig = field(default_factory=DynamicConfig)
    peft: PeftConfig = field(default_factory=PeftConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    ema: EMAConfig = field(default_factory=EMAConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    sample: SampleConfig = field(default_factory=SampleConfig)


class ConfigError(ValueError):
    """A configuration the run cannot start with; the message names key, value and what is allowed."""


CHOICES = {
    "student.init": ("inherit", "random", "path"),
    "teacher.prefer": ("ema", "model"),
    "teacher.dtype": ("stored", "auto", "fp32", "bf16"),
    "diffusion.objective": ("gaussian", "flow"),
    "diffusion.timestep_sampling": ("uniform", "stratified", "logit_normal"),
    "optim.schedule": ("constant", "cosine", "linear"),
    "dynamic.warmup_schedule": ("official", "continuous"),
    "peft.method": ("none", "lora", "tdlora"),
    "optim.fused": ("auto", "torch", "apex", "none"),
    "engine.kind": ("auto", "single", "ddp", "fsdp", "deepspeed"),
    "engine.mixed_precision": ("auto", "fp32", "bf16"),
    "engine.activation_checkpointing": ("none", "full", "every-k"),
    "sample.method": ("ddpm", "ddim", "euler"),
}


def _get(cfg: Any, dotted: str) -> Any:
    for part in dotted.split("."):
        cfg = getattr(cfg, part)
    return cfg


def _fail(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config {key}={value!r} is invalid: {allowed}")


def world_size_from_env() -> int:
    """The world size a launcher announced (torchrun, srun, deepspeed), before any process group."""
    for var in ("WORLD_SIZE", "SLURM_NTASKS"):
        if os.environ.get(var):
            return int(os.environ[var])
    return 1


def validate(cfg: RunConfig, world_size: int) -> RunConfig:
    """Check values and combinations; fills `train.micro_batch` when 0. Raises ConfigError."""
    for key, allowed in CHOICES.items():
        if key.startswith("teacher.") and cfg.teacher is None:
            continue
        value = _get(cfg, key)
        if value not in allowed:
            raise _fail(key, value, f"one of {allowed}")
    if cfg.train.steps <= 0:
        raise _fail("train.steps", cfg.train.steps, "a positive number of optimizer steps")
    if cfg.train.global_batch <= 0:
        raise _fail("train.global_batch", cfg.train.global_batch, "a positive integer")
    micro = cfg.train.micro_batch or cfg.train.global_batch // max(world_size, 1)
    if micro <= 0 or cfg.train.global_batch % (world_size * micro):
        raise _fail(
            "train.global_batch",
            cfg.train.global_batch,
            f"must be divisible by world_size x micro_batch = {world_size} x {micro}; "
            "change train.global_batch or train.micro_batch",
        )
    cfg.train.micro_batch = micro
    cfg.data.batch_size = micro  # derived, never a setting of its own (see load_config)
    if not 0.0 < cfg.dynamic.flops_target <= 1.0:
        raise _fail("dynamic.flops_target", cfg.dynamic.flops_target, "λ must lie in (0, 1]")
    for key in ("distill.lambda_noise", "distill.lambda_var", "distill.diffusion_weight", "optim.weight_decay", "optim.grad_clip"):
        if _get(cfg, key) < 0:
            raise _fail(key, _get(cfg, key), "must be >= 0")
    if cfg.dynamic.router_lr_mult <= 0:
        raise _fail("dynamic.router_lr_mult", cfg.dynamic.router_lr_mult, "must be > 0")
    for pat, mult in cfg.optim.lr_mult.items():
        if mult <= 0:
            raise _fail(f"optim.lr_mult[{pat!r}]", mult, "must be > 0")
    if cfg.optim.lr <= 0:
        raise _fail("optim.lr", cfg.optim.lr, "must be > 0")
    betas = list(cfg.optim.betas)
    if len(betas) != 2 or not all(isinstance(b, (int, float)) and 0.0 <= b < 1.0 for b in betas):
        raise _fail("optim.betas", betas, "two numbers in [0, 1), e.g. [0.9, 0.999]")
    if cfg.optim.eps <= 0:
        raise _fail("optim.eps", cfg.optim.eps, "must be > 0")
    if not 0.0 <= cfg.ema.decay < 1.0:
        raise _fail("ema.decay", cfg.ema.decay, "in [0, 1)")
    if not 0.0 <= cfg.diffusion.cfg_dropout < 1.0:
        raise _fail("diffusion.cfg_dropout", cfg.diffusion.cfg_dropout, "in [0, 1)")
    import signal as _signal

    for name in cfg.train.preempt_signals:
        if not hasattr(_signal, name):
            raise _fail("train.preempt_signals", name, "signal names such as SIGTERM, SIGUSR1, SIGUSR2")
    if cfg.engine.activation_checkpointing == "every-k" and cfg.engine.ac_every < 1:
        raise _fail("engine.ac_every", cfg.engine.ac_every, ">= 1")
    if cfg.engine.kind == "deepspeed":
        ds = cfg.engine.deepspeed_config
        if not ds:
            raise _fail("engine.deepspeed_config", None, "a ZeRO JSON such as configs/deepspeed/zero2.json when engine.kind=deepspeed")
        if not Path(ds).exists():
            raise _fail("engine.deepspeed_config", ds, "no such file (configs/deepspeed/zero1.json, zero2.json, zero3.json)")
    kind = "fsdp" if cfg.engine.kind == "auto" and world_size > 1 else cfg.engine.kind
    if cfg.optim.fused == "apex" and kind == "fsdp":
        raise _fail("optim.fused", "apex", "apex's FusedAdam cannot drive FSDP2's sharded (DTensor) parameters; use "
                    "optim.fused=auto (torch's fused AdamW) or another engine")
    _validate_sample(cfg)
    if cfg.engine.collective_timeout_s <= 0:
        raise _fail("engine.collective_timeout_s", cfg.engine.collective_timeout_s, "a positive number of seconds")
    for key, lowest in (("checkpoint.every", 1), ("train.max_nonfinite", 1), ("checkpoint.keep_last", 0), ("checkpoint.keep_every", 0)):
        if _get(cfg, key) < lowest:
            raise _fail(key, _get(cfg, key), f">= {lowest}")
    resume = cfg.checkpoint.resume
    if resume not in ("auto", "never") and not str(resume).isdigit():
        raise _fail("checkpoint.resume", resume, "auto | never | a step number")
    if cfg.teacher is None:
        if cfg.student.init == "inherit":
            raise _fail("student.init", "inherit", "inherit needs a teacher; with teacher=null use random or path")
    else:
        if not cfg.teacher.path:
            raise _fail("teacher.path", cfg.teacher.path, "the teacher's checkpoint path (or teacher=null to train from scratch)")
        if not Path(cfg.teacher.path).exists():
            raise _fail("teacher.path", cfg.teacher.path, "no such file or directory")
    if cfg.student.init == "path":
        if not cfg.student.init_path or not Path(cfg.student.init_path).exists():
            raise _fail("student.init_path", cfg.student.init_path, "an existing checkpoint when student.init=path")
    _validate_peft(cfg, kind)
    try:
        cfg.data.validate(world_size=max(world_size, 1))
    except ValueError as e:
        raise ConfigError(f"config data: {e}") from e
    return cfg


def _validate_peft(cfg: RunConfig, engine_kind: str) -> None:
    if cfg.peft.method == "none":
        return
    from trainer.peft import lora_spec

    try:
        lora_spec(cfg).validate()
    except ValueError as e:
        raise ConfigError(f"config {e}") from e
    if cfg.student.init == "random":
        raise _fail("student.init", "random", f"peft.method={cfg.peft.method} adapts inherited weights, which stay frozen; "
                    "use student.init=inherit (or path), or peft.method=none to train from scratch")
    if engine_kind == "deepspeed":
        raise _fail("peft.method", cfg.peft.method, "not supported with engine.kind=deepspeed (its checkpoints hold the "
                    "whole model); use engine.kind=fsdp, which shards the frozen base and saves only the adapters")


SAMPLERS = {"gaussian": ("ddpm", "ddim"), "flow": ("euler",)}


def _validate_sample(cfg: RunConfig) -> None:
    """The sampling keys: grids and the quality evaluation sample with `sample.method`, which must fit the
    objective; the evaluation's files must exist and it must have something to compute."""
    s = cfg.sample
    for key, low in (("sample.every", 0), ("sample.eval_every", 0), ("sample.num", 1), ("sample.steps", 1), ("sample.eval_batch", 1)):
        if _get(cfg, key) < low:
            raise _fail(key, _get(cfg, key), f">= {low}")
    if (s.every or s.eval_every) and s.method not in SAMPLERS[cfg.diffusion.objective]:
        raise _fail("sample.method", s.method, f"a {cfg.diffusion.objective} sampler: one of {SAMPLERS[cfg.diffusion.objective]}")
    if s.cfg_scale <= 0:
        raise _fail("sample.cfg_scale", s.cfg_scale, "> 0 (1 = no guidance)")
    for key in ("sample.inception", "sample.fid_ref", "sample.vae"):
        value = _get(cfg, key)
        if value is not None and not Path(value).exists():
            raise _fail(key, value, "no such file or directory (nothing is downloaded)")
    if not s.eval_every:
        return
    if s.eval_num < 2:
        raise _fail("sample.eval_num", s.eval_num, ">= 2 samples (a covariance needs two)")
    if s.fid_ref is not None and s.inception is None:
        raise _fail("sample.fid_ref", s.fid_ref, "FID needs the Inception network: set sample.inception (its weights file)")
    from trainer.step import teacher_needed

    if s.inception is None and not (cfg.teacher is not None and teacher_needed(cfg)):
        raise _fail("sample.eval_every", s.eval_every, "nothing to compute: set sample.inception (FID) or distil from a "
                    "teacher (the teacher-relative error); the teacher is only run when a loss reads it")
    if s.inception is not None and cfg.data.input == "latent" and s.vae is None:
        raise _fail("sample.inception", s.inception, "FID needs images but the model makes latents: set sample.vae (the "
                    "local diffusers AutoencoderKL directory that decodes them)")


def _explain(e: OmegaConfBaseException, schema: DictConfig) -> ConfigError:
    key = getattr(e, "full_key", None) or "?"
    if isinstance(e, ConfigKeyError):
        parent = key.rsplit(".", 1)[0] if "." in key else None
        node = OmegaConf.select(schema, parent) if parent else schema
        allowed = sorted(node.keys()) if isinstance(node, DictConfig) else []
        return ConfigError(f"unknown config key {key!r}; allowed here: {allowed}")
    if isinstance(e, ValidationError):
        msg = str(e).splitlines()[0]
        return ConfigError(f"config {key}: {msg}")
    return ConfigError(f"config {key}: {str(e).splitlines()[0]}")


def load_config(
    path: str | Path | None = None, overrides: list[str] | None = None, world_size: int | None = None
) -> RunConfig:
    """YAML file, then `key.sub=value` overrides, typed against `RunConfig`, then validated."""
    schema = OmegaConf.structured(RunConfig)
    try:
        user = OmegaConf.create()
        if path is not None:
            p = Path(path)
            if not p.exists():
                raise ConfigError(f"config file {str(p)!r} does not exist")
            user = OmegaConf.load(p)
        bad = [o for o in overrides or [] if "=" not in o]
        if bad:
            raise ConfigError(f"overrides must look like key.sub=value; got {bad}")
        user = OmegaConf.merge(user, OmegaConf.from_dotlist(list(overrides or [])))
        merged = OmegaConf.merge(schema, user)
        cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        raise _explain(e, schema) from None
    cfg = validate(cfg, world_size_from_env() if world_size is None else world_size)
    asked = OmegaConf.select(user, "data.batch_size", default=None)
    if asked is not None and asked != cfg.train.micro_batch:  # a saved config.yaml holds the derived value
        raise _fail("data.batch_size", asked,
                    f"not a setting: the per-rank batch is train.micro_batch ({cfg.train.micro_batch} here: "
                    f"train.global_batch={cfg.train.global_batch} / world size); remove data.batch_size and set "
                    "train.global_batch or train.micro_batch")
    from trainer.validate import validate_models

    validate_models(cfg)
    return cfg


def to_yaml(cfg: RunConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def config_hash(cfg: RunConfig) -> str:
    """Hash of what determines the training trajectory (not where it is written)."""
    import hashlib

    import json

    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    d.pop("run_dir", None)
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]
