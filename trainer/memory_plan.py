"""Per-rank memory of a distillation run under FSDP2, before any GPU is touched (`launch.info --plan`),
for full fine-tuning or a PEFT student (LoRA, TD-LoRA: `--peft`), on a meta-device model.

Static state is counted from parameter counts and the engine's layout:
- student: fp32 master weights of every parameter, fp32 gradients and AdamW's two fp32 moments of
  the trainable ones (a PEFT student's frozen base has neither), each sharded over the N ranks
  (16 B/param/N when everything trains), plus the EMA copy (fp32, sharded the same way; under FSDP2
  each module shards its own copy of a frozen base too: 4 B/param/N); buffers (e.g. FLUX's null
  text) are replicated;
- teacher: its weights in the teacher dtype (bf16), sharded (`teacher.shard: true`: its blocks and its
  root unit, which the frozen teacher reshards after each forward; `trainer/engines/placement.py`) or
  replicated;
- FSDP's transients: the unsharded bf16 parameters of the block being computed and the one prefetched
  (2 · 2 B · block params), in backward also that block's unsharded bf16 gradients and their fp32
  reduce-scatter copy (6 B · trainable block params); the root module's parameters unsharded in bf16.

Activations are *traced*, not guessed: one forward of the student in the compute dtype on the meta
device (no memory, no FLOPs) under saved-tensor hooks, with every saved storage attributed to the
block (or the outside of the blocks) that saved it first. Softmax attention is modelled as
FlashAttention keeps it (q, k, v, output and the fp32 log-sum-exp; never the N² probabilities).
With activation checkpointing a block keeps only its inputs, and one block at a time re-materialises
its saved tensors in backward. The teacher's no-grad forward is bounded by its largest block's.
CUDA context, NCCL buffers and allocator fragmentation are a fixed `reserve` (an estimate: measure
one step with `torch.cuda.max_memory_allocated`).
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from models import family_of
from models.lora import LoraSpec, apply_lora

GiB = 2**30
AC_MODES = ("none", "full")
PEFT_METHODS = ("none", "lora", "tdlora")
ADAM_MOMENTS = 2


class _FlashAttentionSaves(torch.autograd.Function):
    """What FlashAttention keeps for backward (q, k, v, out, fp32 log-sum-exp), as a stand-in for SDPA
    on the meta device, where torch would take the math path and save the N² probabilities."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = q.new_empty(*q.shape[:-1], v.shape[-1])
        lse = q.new_empty(q.shape[:-1], dtype=torch.float32)
        ctx.save_for_backward(q, k, v, out, lse)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):  # pragma: no cover - never run: planning traces forwards only
        q, k, v, _, _ = ctx.saved_tensors
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)


class _FlashSDPA(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is F.scaled_dot_product_attention and not kwargs and len(args) == 3:
            return _FlashAttentionSaves.apply(*args)
        return func(*args, **kwargs)


@dataclass
class ActivationProfile:
    """Bytes per sample that one training forward keeps for backward, by where they are saved."""

    outside: float  # embeddings, final layer, loss
    blocks: list[float]  # saved inside each block (no activation checkpointing)
    block_inputs: list[float]  # what each block keeps under activation checkpointing (its new inputs)
    block_kinds: list[str]
    tokens: int  # sequence length the blocks see (image + text tokens)

    def held(self, ac: str) -> float:
        """Per-sample bytes alive at the end of the forward."""
        if ac == "none":
            return self.outside + sum(self.blocks)
        return self.outside + sum(self.block_inputs)

    def peak(self, ac: str) -> float:
        """Per-sample peak in backward: with checkpointing, one block's tensors re-materialised on top."""
        return self.held(ac) + (max(self.blocks, default=0.0) if ac == "full" else 0.0)

    def per_token(self) -> dict[str, float]:
        """Mean saved bytes per token of each block kind (the unit of T2I.md §2.8)."""
        out: dict[str, list[float]] = {}
        for kind, b in zip(self.block_kinds, self.blocks):
            out.setdefault(kind, []).append(b / self.tokens)
        return {k: sum(v) / len(v) for k, v in out.items()}


def example_inputs(model: nn.Module, n: int, resolution: int | tuple[int, int] | None, text_len: int | None,
                   device: torch.device | str, dtype: torch.dtype = torch.float32):
    """(x, t, cond) of the model's family for `n` samples, zero-filled (guidance included where taken)."""
    family = family_of(model)
    cfg = model.config
    x = torch.zeros(n, *family.latent_shape(cfg, resolution), device=device, dtype=dtype)
    cond = model.condition(family.example_batch(cfg, n, text_len, device))
    if family.conditioning(cfg).guidance:
        cond["guidance"] = torch.full((n,), 3.5, device=device)
    return x, torch.full((n,), 500.0, device=device), cond


def trace_activations(model: nn.Module, resolution: int | tuple[int, int] | None = None, text_len: int | None = None,
                      batch: int = 1, device: torch.device | str = "meta") -> ActivationProfile:
    """Trace one training forward (and the loss's cast) of `model` and attribute what autograd saves.

    The model must live on `device` in its compute dtype ("meta" for planning; a real device to
    compare against bytes counted there). Storages are counted once, where first saved.
    """
    blocks = list(model.all_blocks())
    index = {id(b): i for i, b in enumerate(blocks)}
    current: list[int] = []
    # Weights saved by linear layers are parameters (FSDP frees and re-gathers them), not activations.
    seen: set = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}
    saved = [0.0] * (len(blocks) + 1)  # last: outside the blocks
    inputs = [0.0] * len(blocks)

    def storage(t: torch.Tensor) -> tuple[int, int]:
        s = t.untyped_storage()
        return s._cdata, s.nbytes()

    def pack(t: torch.Tensor) -> torch.Tensor:
        key, nbytes = storage(t)
        if key not in seen:
            seen.add(key)
            saved[current[-1] if current else -1] += nbytes
        return t

    def pre(module: nn.Module, args: tuple, kwargs: dict) -> None:
        i = index[id(module)]
        current.append(i)
        for a in [*args, *kwargs.values()]:
            if isinstance(a, torch.Tensor) and a.is_floating_point():
                key, nbytes = storage(a)
                if ("in", key) not in seen:
                    seen.add(("in", key))
                    inputs[i] += nbytes

    def post(module: nn.Module, args: tuple, kwargs: dict, out: Any) -> None:
        current.pop()

    hooks = [h for b in blocks for h in (b.register_forward_pre_hook(pre, with_kwargs=True),
                                         b.register_forward_hook(post, with_kwargs=True))]
    dtype = next(model.parameters()).dtype
    x, t, cond = example_inputs(model, batch, resolution, text_len, device, dtype)
    was_training = model.training
    model.train()
    try:
        with _FlashSDPA(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = model(x, t, **cond)
            out.float().pow(2).mean()  # the loss reads the output in fp32
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    family = family_of(model)
    hw = tuple(x.shape[-2:])
    tokens = family.image_tokens(model.config, hw) + (cond["text_emb"].shape[1] if "text_emb" in cond else 0)
    return ActivationProfile(outside=saved[-1] / batch, blocks=[b / batch for b in saved[:-1]],
                             block_inputs=[b / batch for b in inputs], block_kinds=[type(b).__name__ for b in blocks],
                             tokens=tokens)


@dataclass
class ModelCounts:
    params: int
    buffers: int  # bytes, replicated
    largest_block: int  # parameters of the largest block (FSDP unit)
    root: int  # parameters outside the blocks (the root FSDP unit)
    trainable: int = 0
    largest_block_trainable: int = 0  # trainable parameters of the block with the most


def model_counts(model: nn.Module) -> ModelCounts:
    blocks = list(model.all_blocks())
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    return ModelCounts(
        params=sum(p.numel() for p in model.parameters()),
        buffers=sum(b.numel() * b.element_size() for b in model.buffers()),
        largest_block=max((sum(p.numel() for p in b.parameters()) for b in blocks), default=0),
        root=sum(p.numel() for p in model.parameters() if id(p) not in in_blocks),
        trainable=sum(p.numel() for p in model.parameters() if p.requires_grad),
        largest_block_trainable=max((sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks), default=0),
    )


def teacher_of(student_cfg: Any) -> Any:
    """The static softmax configuration a student inherits from (same sizes)."""
    import dataclasses

    return dataclasses.replace(student_cfg, attention="softmax", dynamic=False).validate()


def adapted_student(student_cfg: Any, spec: LoraSpec | None, teacher_cfg: Any | None = None) -> nn.Module:
    """The student on the meta device, with `spec`'s adapters on what it inherits from `teacher_cfg`
    (what training builds: non-inherited parts train fully, the rest is frozen)."""
    from models.inherit import default_exclude, plan_inheritance

    family = family_of(student_cfg)
    teacher_cfg = teacher_cfg or teacher_of(student_cfg)
    with torch.device("meta"):
        model = family.build(student_cfg)
        if spec is None:
            return model
        report = plan_inheritance(model, family_of(teacher_cfg).build(teacher_cfg).state_dict(),
                                  default_exclude(teacher_cfg, student_cfg))
        params = dict(model.named_parameters())
        apply_lora(model, spec, sorted(set(report.initialised + report.skipped) & set(params)))
    return model


@contextmanager
def _meta_model(cfg: Any, dtype: torch.dtype, spec: LoraSpec | None = None, teacher_cfg: Any | None = None) -> Iterator[nn.Module]:
    model = adapted_student(cfg, spec, teacher_cfg)
    yield model.to(device="meta", dtype=dtype)  # (buffers made from numpy start on the CPU)


@dataclass
class MemoryPlan:
    """Per-rank bytes by item; `per_sample` items scale with the micro-batch."""

    gpus: int
    gpu_mem: float  # bytes per GPU
    micro_batch: int
    ac: str
    rows: dict[str, float] = field(default_factory=dict)  # fixed per-rank bytes
    per_sample: dict[str, float] = field(default_factory=dict)  # per-rank bytes per sample of the micro-batch
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def fixed(self) -> float:
        return sum(self.rows.values())

    @property
    def total(self) -> float:
        return self.fixed + self.micro_batch * sum(self.per_sample.values())

    @property
    def max_micro_batch(self) -> int:
        per = sum(self.per_sample.values())
        return max(0, int((self.gpu_mem - self.fixed) // per)) if per else 0

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_mem

    @property
    def checkpoint_bytes(self) -> int:
        """A checkpoint's tensors (all ranks): student, EMA and AdamW moments of the trainable parameters in
        fp32 (a PEFT checkpoint leaves out the frozen base; the manifest names it)."""
        return self.notes["trainable"] * 4 * (2 + ADAM_MOMENTS)


def plan_memory(student_cfg: Any, teacher_cfg: Any | None, gpus: int, gpu_mem_gib: float, *, micro_batch: int | None = None,
                resolution: int | tuple[int, int] | None = None, text_len: int | None = None, ac: str = "full",
                teacher_shard: bool = True, ema: bool = True, reserve_gib: float = 4.0,
                compute_dtype: torch.dtype = torch.bfloat16, teacher_dtype: torch.dtype = torch.bfloat16,
                peft: LoraSpec | None = None) -> MemoryPlan:
    """The per-rank plan of distilling `teacher_cfg` into `student_cfg` on `gpus` ranks of `gpu_mem_gib`.

    `micro_batch` None: the largest that fits. `resolution` in pixels (None: the config's native size).
    `peft`: LoRA / TD-LoRA adapters on what the student inherits from the teacher (None: full fine-tuning).
    """
    if gpus < 1:
        raise ValueError(f"--gpus {gpus}: at least one")
    if ac not in AC_MODES:
        raise ValueError(f"activation checkpointing {ac!r}: one of {AC_MODES}")
    tb = torch.tensor([], dtype=teacher_dtype).element_size()
    cb = torch.tensor([], dtype=compute_dtype).element_size()
    inherit_from = teacher_cfg if teacher_cfg is not None and family_of(teacher_cfg) is family_of(student_cfg) else None
    with _meta_model(student_cfg, compute_dtype, peft, inherit_from) as student:
        s = model_counts(student)
        acts = trace_activations(student, resolution, text_len)
    rows = {
        "student params (fp32, sharded)": 4 * s.params / gpus + s.buffers,
        "student grads (fp32, sharded)": 4 * s.trainable / gpus,
        "optimizer AdamW m, v (fp32, sharded)": 4 * ADAM_MOMENTS * s.trainable / gpus,
        "EMA (fp32, sharded)": (4 * s.params / gpus + s.buffers) if ema else 0.0,
        "FSDP unsharded student block + grads": 2 * cb * s.largest_block + (cb + 4) * s.largest_block_trainable + cb * s.root,
    }
    per_sample = {f"student activations ({'checkpointed' if ac == 'full' else 'no checkpointing'})": acts.peak(ac)}
    notes: dict[str, Any] = {"student_params": s.params, "trainable": s.trainable, "activation_profile": acts,
                             "method": "full" if peft is None else peft.method}
    if teacher_cfg is not None:
        with _meta_model(teacher_cfg, teacher_dtype) as teacher:
            t = model_counts(teacher)
            t_acts = trace_activations(teacher, resolution, text_len)
        if teacher_shard:  # every unit, the root too, reshards after its forward (a frozen teacher has no backward)
            rows["teacher (sharded)"] = tb * t.params / gpus + t.buffers
            rows["FSDP unsharded teacher blocks"] = 2 * tb * t.largest_block
        else:
            rows["teacher (replicated)"] = tb * t.params + t.buffers
        per_sample["teacher forward (no grad, one block)"] = max(t_acts.blocks, default=0.0)
        notes["teacher_params"] = t.params
    rows["CUDA context, NCCL, fragmentation (estimate)"] = reserve_gib * GiB
    plan = MemoryPlan(gpus=gpus, gpu_mem=gpu_mem_gib * GiB, micro_batch=micro_batch or 1, ac=ac, rows=rows,
                      per_sample=per_sample, notes=notes)
    if micro_batch is None:
        plan.micro_batch = plan.max_micro_batch
    return plan


def format_plan(plan: MemoryPlan, title: str) -> str:
    """The table `launch.info --plan` prints (GiB per rank)."""
    acts: ActivationProfile = plan.notes["activation_profile"]
    method = plan.notes["method"]
    lines = [title, f"{plan.gpus} GPUs x {plan.gpu_mem / GiB:.0f} GiB, FSDP2, bf16 compute, activation checkpointing "
             f"{plan.ac}, micro-batch {plan.micro_batch} per rank, "
             f"{'full fine-tuning' if method == 'full' else method} ({plan.notes['trainable']:,} trainable parameters)",
             "", f"{'per rank':<52}{'GiB':>9}"]
    for name, value in plan.rows.items():
        lines.append(f"{name:<52}{value / GiB:9.2f}")
    for name, value in plan.per_sample.items():
        lines.append(f"{name + f' x {plan.micro_batch}':<52}{plan.micro_batch * value / GiB:9.2f}"
                     f"   ({value / GiB:.3f} per sample)")
    lines.append(f"{'total':<52}{plan.total / GiB:9.2f}   {'fits' if plan.fits else 'DOES NOT FIT'} in "
                 f"{plan.gpu_mem / GiB:.0f} GiB; largest micro-batch that fits: {plan.max_micro_batch}")
    per_token = ", ".join(f"{k} {v / 1024:.0f} KiB" for k, v in acts.per_token().items())
    lines.append(f"saved for backward per token and block (no checkpointing): {per_token}; "
                 f"{acts.tokens} tokens per sample")
    return "\n".join(lines)


def format_comparison(plans: list[MemoryPlan]) -> str:
    """Full fine-tuning vs LoRA vs TD-LoRA in one table (`launch.info --plan --peft all`)."""
    full = plans[0]
    lines = [f"{'method':<8}{'trainable':>15}{'vs full':>9}{'total GiB':>11}{'vs full':>9}{'max micro-batch':>17}"
             f"{'checkpoint GiB':>16}"]
    for p in plans:
        lines.append(f"{p.notes['method']:<8}{p.notes['trainable']:>15,}{p.notes['trainable'] / full.notes['trainable']:>9.3f}"
                     f"{p.total / GiB:>11.2f}{p.total / full.total:>9.3f}{p.max_micro_batch:>17}{p.checkpoint_bytes / GiB:>16.3f}")
    return "\n".join(lines)
