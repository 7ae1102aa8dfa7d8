"""DeepSpeed ZeRO (stage 1, 2 or 3 from `engine.deepspeed_config`) behind the Engine interface.

- Only the student enters `deepspeed.initialize`. Under ZeRO-3 it is partitioned by
  `deepspeed.zero.Init(module=...)` before that, and each rank fills its partitions of what the
  student inherits straight from the teacher's file (`zero3_student`), so the fp32 masters ZeRO then
  makes start from the inherited weights. The teacher never enters the engine (it would be saved
  with the student and hooked by ZeRO): it is frozen and placed by `trainer.engines.placement`,
  replicated or, with `teacher.shard: true`, in its own FSDP2 units (its ZeRO-3-like partitioning:
  each rank holds and reads only its rows). `setup` checks that no teacher parameter carries ZeRO's
  `ds_id`.
- The optimizer is our torch AdamW (param groups with the router LR multiplier), wrapped by ZeRO;
  the LR schedule is our LambdaLR on the same param groups, stepped by us once per step (skipped
  steps included, as in the torch engines).
- Batch sizes, accumulation, clipping and bf16 come from the run config: the JSON's `"auto"`
  values are filled in, and an explicit value that contradicts the run config is an error.
- A skipped step, as the loop agrees it (a non-finite loss on any rank, `skip=True`), runs ZeRO's step
  with the wrapped torch optimizer's update withheld (`withheld_update`): ZeRO clears the gradients,
  keeps its collectives in step across ranks and copies its unchanged fp32 masters back, so no
  weight, Adam moment or step count moves, and the EMA is not updated. A non-finite gradient makes
  ZeRO skip the update itself (its overflow check). `skipped` reports either.
- EMA (`ShardedEMA`): each rank keeps an fp32 EMA of exactly the fragment of each parameter whose
  fp32 master weights its optimizer partition holds (ZeRO-1/2: the `_hp_mapping` fragments; ZeRO-3:
  the rank's partition). The update is local (no communication), the EMA costs 1/world of a model
  per rank, and it follows the fp32 masters even under bf16. Each rank saves its fragments with
  their offsets, so export stitches them together for any stage.
- Checkpoints use DeepSpeed's own `save_checkpoint`/`load_checkpoint` into `<step>/deepspeed/`
  (every rank writes its partitions; nothing is gathered), inside our temporary directory, manifest
  and rename protocol. These saves block (DeepSpeed's save synchronises on the training process
  group). A DeepSpeed checkpoint resumes at the same world size; `launch.export` consolidates it
  with DeepSpeed's `zero_to_fp32` logic.
"""
from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from models.family import Checkpoint
from models.inherit import InheritPlan
from models.lazy import read_flat
from trainer.checkpoint import CheckpointError
from trainer.config import ConfigError, RunConfig
from trainer.engines.base import Engine, compute_dtype
from trainer.engines.placement import inherit_into, place_teacher
from trainer.ema import EMA
from trainer.optim import build_optimizer, build_scheduler, param_groups
from trainer.parallelize import apply_activation_checkpointing, apply_compile

TAG = "deepspeed"  # DeepSpeed's tag directory inside our step directory
EMA_DIR = "ema"


def import_deepspeed():
    """Import DeepSpeed for this machine: the CPU accelerator without CUDA, and without building the
    shared-memory communication op, which only inference all-reduces use (it takes ~90 s to compile)."""
    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    import deepspeed
    import deepspeed.ops

    compatible = deepspeed.ops.__compatible_ops__
    compatible["deepspeed_shm_comm"] = False
    return deepspeed


def ds_config(cfg: RunConfig, world_size: int, device: torch.device) -> dict[str, Any]:
    """The JSON from `engine.deepspeed_config` with its "auto" values filled from the run config."""
    path = Path(cfg.engine.deepspeed_config)
    conf = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("_")}  # "_comment"
    micro = cfg.train.micro_batch
    accum = cfg.train.global_batch // (world_size * micro)
    bf16 = compute_dtype(cfg, device) == torch.bfloat16
    wanted = {
        "train_batch_size": cfg.train.global_batch,
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "gradient_clipping": float(cfg.optim.grad_clip),
    }
    for key, value in wanted.items():
        have = conf.get(key, "auto")
        if have == "auto":
            conf[key] = value
        elif have != value:
            raise ConfigError(f"{path}: {key}={have!r} contradicts the run config ({value!r}); set it to \"auto\"")
    bf = conf.setdefault("bf16", {})
    if bf.get("enabled", "auto") == "auto":
        bf["enabled"] = bf16
    elif bool(bf["enabled"]) != bf16:
        raise ConfigError(f"{path}: bf16.enabled={bf['enabled']!r} contradicts engine.mixed_precision={cfg.engine.mixed_precision!r}")
    if conf.get("fp16", {}).get("enabled"):
        raise ConfigError(f"{path}: fp16 is not supported by DiTill (use bf16 through engine.mixed_precision)")
    if "optimizer" in conf or "scheduler" in conf:
        raise ConfigError(f"{path}: leave out 'optimizer' and 'scheduler'; DiTill passes its own (optim.*)")
    stage = conf.get("zero_optimization", {}).get("stage", 0)
    if stage not in (1, 2, 3):
        raise ConfigError(f"{path}: zero_optimization.stage={stage!r}; DiTill supports ZeRO stage 1, 2 or 3")
    conf.setdefault("steps_per_print", 2**31 - 1)
    conf.setdefault("zero_allow_untested_optimizer", True)
    return conf


class ShardedEMA:
    """fp32 EMA of the fragments of each parameter whose fp32 master weights this rank's ZeRO
    partition holds: {name: [(flat offset, tensor)]}, updated locally after each applied step."""

    def __init__(self, ds_engine, cfg, stage: int, rank: int, world_size: int) -> None:
        self.ds, self.cfg, self.stage, self.rank, self.world = ds_engine, cfg, stage, rank, world_size
        self.params = [(n, p) for n, p in ds_engine.module.named_parameters() if p.requires_grad]
        self.shapes = {n: list(getattr(p, "ds_shape", p.shape)) for n, p in self.params}
        self.shards: dict[str, tuple[int, torch.Tensor]] = {}
        for name, offset, master in self._masters():
            self.shards[name] = (offset, master.detach().float().clone())

    decay_at = EMA.decay_at

    def _masters(self) -> Iterator[tuple[str, int, torch.Tensor]]:
        """(name, offset in the flattened parameter, fp32 master fragment) for this rank."""
        if self.stage == 3:
            from deepspeed.utils import safe_get_local_fp32_param

            for name, p in self.params:
                part = safe_get_local_fp32_param(p)
                offset = self.rank * part.numel()
                length = max(0, min(part.numel(), p.ds_numel - offset))
                if length:
                    yield name, offset, part.narrow(0, 0, length)
        else:
            for name, p in self.params:
                mapping = getattr(p, "_hp_mapping", None)
                if mapping is not None and mapping.lp_fragment_address.numel:
                    yield name, mapping.lp_fragment_address.start, mapping.hp_fragment

    @torch.no_grad()
    def update(self, step: int) -> None:
        if step % self.cfg.every:
            return
        dst, src = [], []
        for name, _, master in self._masters():
            dst.append(self.shards[name][1])
            src.append(master.detach().float())
        if dst:
            torch._foreach_lerp_(dst, src, 1.0 - self.decay_at(step))

    # -- on disk: one safetensors file per rank, keys "<name>@<offset>", shapes in the metadata --
    def save(self, path: Path) -> None:
        from safetensors.torch import save_file

        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {f"{n}@{off}": t.contiguous() for n, (off, t) in self.shards.items()}
        save_file(tensors, str(path), metadata={"shapes": json.dumps(self.shapes), "world_size": str(self.world)})

    def load(self, path: Path) -> None:
        from safetensors.torch import load_file

        saved = {k.rsplit("@", 1)[0]: (int(k.rsplit("@", 1)[1]), v) for k, v in load_file(str(path)).items()}
        for name, (offset, t) in self.shards.items():
            if name not in saved or saved[name][0] != offset or saved[name][1].shape != t.shape:
                raise CheckpointError(f"{path}: EMA fragment of {name} does not match this rank's ZeRO partition")
            t.copy_(saved[name][1])

    def full_state(self) -> dict[str, torch.Tensor]:
        """Every rank's fragments assembled into full tensors (one all-reduce; for sampling only)."""
        numels = {n: int(torch.Size(s).numel()) for n, s in self.shapes.items()}
        flat = torch.zeros(sum(numels.values()), dtype=torch.float32, device=next(iter(self.shards.values()))[1].device
                           if self.shards else "cpu")
        starts, at = {}, 0
        for n, _ in self.params:
            starts[n], at = at, at + numels[n]
        for n, (off, t) in self.shards.items():
            flat[starts[n] + off: starts[n] + off + t.numel()] = t
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flat)  # fragments are disjoint: the sum is the concatenation
        return {n: flat[starts[n]: starts[n] + numels[n]].view(self.shapes[n]).clone() for n, _ in self.params}


def consolidate_ema(files: list[Path]) -> dict[str, torch.Tensor]:
    """Full EMA tensors from every rank's fragment file (used by export, without a process group)."""
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    pieces: dict[str, list[tuple[int, torch.Tensor]]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            shapes.update(json.loads(fh.metadata()["shapes"]))
            for key in fh.keys():
                name, off = key.rsplit("@", 1)
                pieces.setdefault(name, []).append((int(off), fh.get_tensor(key)))
    out = {}
    for name, shape in shapes.items():
        numel = int(torch.Size(shape).numel())
        flat = torch.empty(numel, dtype=torch.float32)
        covered = 0
        for off, t in pieces.get(name, []):
            flat[off: off + t.numel()] = t
            covered += t.numel()
        if covered != numel:
            raise CheckpointError(f"EMA fragments of {name} cover {covered} of {numel} elements: a rank's file is missing")
        out[name] = flat.view(shape)
    return out


class DeepSpeedState:
    """How the Checkpointer saves and loads a DeepSpeed engine (see the module docstring)."""

    format = "deepspeed"
    can_async = False

    def __init__(self, engine: "DeepSpeedEngine") -> None:
        self.engine = engine

    def write(self, path: Path, pg, asynchronous: bool) -> None:
        e = self.engine
        client = {"ditill_scheduler": e.scheduler.state_dict()}
        e.ds.save_checkpoint(str(path), tag=TAG, client_state=client, save_latest=False)
        if e.ema is not None:
            e.ema.save(path / EMA_DIR / f"rank{e.env.rank:05d}.safetensors")
        dist.barrier()  # every rank's files exist before any rank checksums its share
        return None

    def read(self, path: Path, pg, saved_world_size: int) -> None:
        e = self.engine
        if saved_world_size != e.env.world_size:
            raise CheckpointError(
                f"{path} is a DeepSpeed checkpoint of {saved_world_size} ranks and this run has {e.env.world_size}: "
                "DeepSpeed checkpoints resume at the same world size. Export it (python -m launch.export) and start "
                "from the export with student.init=path, or use engine.kind=fsdp, whose checkpoints reshard"
            )
        _, client = e.ds.load_checkpoint(str(path), tag=TAG, load_module_strict=True, load_optimizer_states=True,
                                         load_lr_scheduler_states=False)
        if client is None:
            raise CheckpointError(f"DeepSpeed could not load {path / TAG}")
        e.scheduler.load_state_dict(client["ditill_scheduler"])
        if e.ema is not None:
            e.ema.load(path / EMA_DIR / f"rank{e.env.rank:05d}.safetensors")

    def files(self, path: Path, rank: int, world_size: int) -> list[Path]:
        ours = {"extra", "sums"}
        every = sorted(p for p in path.rglob("*") if p.is_file() and p.relative_to(path).parts[0] not in ours
                       and p.name != "config.yaml")
        return every[rank::world_size]


@contextlib.contextmanager
def withheld_update(optimizers: list[torch.optim.Optimizer]) -> Iterator[None]:
    """Inside, each optimizer's `step` does nothing (moves no parameter, moment or step count)."""
    saved = [vars(opt).get("step") for opt in optimizers]
    for opt in optimizers:
        opt.step = lambda *args, **kwargs: None
    try:
        yield
    finally:
        for opt, own in zip(optimizers, saved):
            del opt.step
            if own is not None:
                opt.step = own


def zero3_student(deepspeed, student: nn.Module, conf: dict[str, Any], inherit: InheritPlan | None,
                  device: torch.device) -> nn.Module:
    """The student partitioned by ZeRO-3's `zero.Init`, its inherited partitions read from the teacher file.

    `zero.Init(module=student)` moves each parameter of the student (built on the CPU with the run's
    seed, so its random part equals the single-process run's) to the device one at a time, broadcasts
    it from rank 0 and keeps this rank's flat partition. Each rank then copies the flat range of every
    inherited tensor its partition holds (`read_flat`: only the rows that cover it). Building the model
    inside the `zero.Init` context is not an option: a family's model-level initialisation (DiT's
    `initialize_weights`) would run on parameters already partitioned away and fail."""
    dtype = torch.bfloat16 if conf.get("bf16", {}).get("enabled") else torch.float32
    with torch.no_grad():
        for p in student.parameters():
            p.data = p.data.to(dtype)  # ZeRO-Init parameters carry the configured dtype
        for mod in student.modules():
            for name, b in list(mod._buffers.items()):
                if b is not None:
                    mod._buffers[name] = b.to(device)  # buffers are never partitioned
    deepspeed.zero.Init(module=student, config_dict_or_path=conf, dtype=dtype)
    if inherit is None:
        return student
    params = dict(student.named_parameters())
    buffers = [k for k in inherit.inherited if k not in params]
    with torch.no_grad():
        for name in inherit.inherited:
            if name not in params:
                continue
            p, src = params[name], inherit.source[name]
            part = p.ds_tensor
            start = part.ds_numel * dist.get_rank(group=p.ds_process_group)
            length = max(0, min(part.ds_numel, p.ds_numel - start))
            if length:
                new = read_flat(src, start, start + length).to(part.dtype)
                if name in inherit.keep:  # a partial exclusion: the student's own values stay there
                    own = flat_kept(p.ds_shape, inherit.keep[name], start, length, new.device)
                    new = torch.where(own, part.narrow(0, 0, length), new)
                part.narrow(0, 0, length).copy_(new)
    inherit_into(student, InheritPlan(inherited=buffers, source=inherit.source))
    return student


def flat_kept(shape, spans, start: int, length: int, device) -> torch.Tensor:
    """(length,) bool: which elements of the flat range [start, start+length) of a tensor of `shape`
    fall in the (axis, span) regions a partial inheritance exclusion keeps."""
    idx = torch.arange(start, start + length, device=device)
    cols = int(torch.Size(shape[1:]).numel()) if len(shape) > 1 else 1
    row, col = idx // cols, idx % cols
    inner = int(torch.Size(shape[2:]).numel()) if len(shape) > 2 else 1
    out = torch.zeros(length, dtype=torch.bool, device=device)
    for axis, span in spans:
        coord = row if axis == 0 else col // inner
        out |= (coord >= span.start) & (coord < span.stop)
    return out


class DeepSpeedEngine(Engine):
    name = "deepspeed"

    def setup(self, student: nn.Module, teacher: Checkpoint | None, inherit: InheritPlan | None = None) -> None:
        deepspeed = import_deepspeed()
        env, cfg = self.env, self.cfg
        deepspeed.init_distributed(dist_backend=env.backend, auto_mpi_discovery=False, verbose=False)
        conf = ds_config(cfg, env.world_size, env.device)
        if conf["zero_optimization"]["stage"] == 3:
            self.raw_student = zero3_student(deepspeed, student, conf, inherit, env.device)
        else:
            self.raw_student = student.to(env.device)
            inherit_into(self.raw_student, inherit)  # ZeRO-1/2 keep whole parameters on every rank
        apply_activation_checkpointing(self.raw_student, cfg.engine)
        apply_compile(self.raw_student, cfg.engine)
        optimizer = build_optimizer(param_groups(student.named_parameters(), cfg.dynamic.router_lr_mult, cfg.optim.lr_mult), cfg.optim, env.device)
        self.scheduler = build_scheduler(optimizer, cfg.optim, cfg.train.steps)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=self.raw_student, optimizer=optimizer, config=conf,
                                                             dist_init_required=False)
        self.student = self.ds
        self.stage = int(self.ds.zero_optimization_stage())
        if teacher is not None:
            self.teacher = place_teacher(teacher, cfg, env, shard=cfg.teacher.shard)
            if any(hasattr(p, "ds_id") for p in self.teacher.parameters()):
                raise RuntimeError("the teacher's parameters were partitioned by ZeRO-3; it must stay outside the engine")
        self.ema = ShardedEMA(self.ds, cfg.ema, self.stage, env.rank, env.world_size)  # type: ignore[assignment]
        # the torch optimizers ZeRO steps on its fp32 partitions: ours, and any it made (offload)
        self._torch_optimizers = [o for o in vars(self.ds.optimizer).values() if isinstance(o, torch.optim.Optimizer)]
        if optimizer not in self._torch_optimizers:
            raise RuntimeError("DeepSpeed did not wrap DiTill's optimizer; a skipped step could not withhold its update")

    def accumulate(self, last_micro_batch: bool) -> contextlib.AbstractContextManager:
        self.ds.set_gradient_accumulation_boundary(last_micro_batch)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss, scale_wrt_gas=False)  # the step already divides by the accumulation count

    def step(self, step: int, skip: bool = False) -> dict[str, float]:
        with withheld_update(self._torch_optimizers) if skip else contextlib.nullcontext():
            self.ds.step()  # every rank calls it (skip is agreed), so ZeRO's collectives stay matched
        applied = not skip and not bool(getattr(self.ds.optimizer, "overflow", False))
        if applied:
            self.ema.update(step)
        self.scheduler.step()
        norm = self.ds.get_global_grad_norm()
        norm = float(norm) if norm is not None else float("nan")
        return {"grad_norm": norm, "lr": self.scheduler.get_last_lr()[0], "skipped": float(not applied)}

    def state_dict(self) -> dict[str, Any]:
        raise NotImplementedError("DeepSpeed engines are checkpointed through checkpoint_state()")

    def load_state_dict(self, state: dict[str, Any]) -> None:
        raise NotImplementedError("DeepSpeed engines are checkpointed through checkpoint_state()")

    def checkpoint_state(self) -> DeepSpeedState:
        return DeepSpeedState(self)

    def _full_module(self, state: dict[str, torch.Tensor]) -> nn.Module:
        from models import build_model

        module = build_model(self.raw_student.config).to(self.env.device)
        missing, unexpected = module.load_state_dict(state, strict=False)
        buffers = {n for n, _ in module.named_buffers()}
        if unexpected or set(missing) - buffers:  # buffers (pos_embed) are rebuilt by the constructor
            raise RuntimeError(f"EMA does not match the student: missing {sorted(set(missing) - buffers)[:5]}, unexpected {unexpected[:5]}")
        return module.eval().requires_grad_(False)

    def eval_modules(self) -> Iterator[tuple[str, nn.Module]]:
        """Full copies for sampling: the EMA assembled from every rank's fragments, then the teacher."""
        yield "ema", self._full_module(self.ema.full_state())
        if self.teacher is not None:
            yield "teacher", self.teacher
