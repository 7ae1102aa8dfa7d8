"""Training memory per rank, planned on the meta device (no weights): full fine-tuning vs LoRA vs TD-LoRA.

What a rank holds while distilling, as the trainer builds it:
- student weights: fp32 master parameters (FSDP2 shards them over the ranks; DDP/single keep all);
- gradients: fp32, for trainable parameters only (a frozen base gets none);
- optimizer: AdamW's two fp32 moments per trainable parameter (none for the frozen base);
- EMA: a copy of the trainable parameters; on one device or DDP it shares the frozen base with the
  student (`TorchEngine.make_ema_copy`), under FSDP2 each module shards its own copy of the base;
- teacher: its weights in the compute dtype, sharded with `teacher.shard`;
- activations: what autograd saves for the backward of one micro-batch's student forward, measured by
  running that forward on meta tensors with a saved-tensors hook (deduplicated by storage), in the
  compute dtype; with full activation checkpointing, the block inputs plus one block's recompute.
The sum is the peak estimate; allocator fragmentation, communication buffers and FSDP2's gathered
(unsharded, one block at a time) parameters come on top and are not modelled.
"""
from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from models import family_of
from models.lora import LoraSpec, apply_lora

GB = 1024**3
ADAM_MOMENTS = 2


@dataclass
class MemoryPlan:
    method: str  # full | lora | tdlora
    trainable: int
    frozen: int
    weights_bytes: int
    grad_bytes: int
    optimizer_bytes: int
    ema_bytes: int
    teacher_bytes: int
    activation_bytes: int

    @property
    def peak_bytes(self) -> int:
        return (self.weights_bytes + self.grad_bytes + self.optimizer_bytes + self.ema_bytes + self.teacher_bytes
                + self.activation_bytes)

    @property
    def checkpoint_bytes(self) -> int:
        """A checkpoint's tensors (all ranks): student, EMA and AdamW moments of the trainable parameters in
        fp32 (a PEFT checkpoint leaves out the frozen base; the manifest names it)."""
        return self.trainable * 4 * (2 + ADAM_MOMENTS)

    def as_dict(self) -> dict[str, Any]:
        return {**dataclasses.asdict(self), "peak_bytes": self.peak_bytes, "checkpoint_bytes": self.checkpoint_bytes}


def teacher_of(student_cfg: Any) -> Any:
    """The static softmax configuration a student inherits from (same sizes; a LiT student's teacher may
    have more heads, which changes no parameter name it inherits)."""
    return dataclasses.replace(student_cfg, attention="softmax", dynamic=False)


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
        full = sorted(set(report.initialised + report.skipped) & set(params))
        apply_lora(model, spec, full)
    return model


def saved_activation_bytes(model: nn.Module, batch: int, dtype: torch.dtype, checkpointing: str = "none") -> int:
    """Bytes autograd saves in one training forward of `model` (meta) on a batch of `batch` samples."""
    family = family_of(model)
    cfg = model.config
    c, h, w = family.latent_shape(cfg)
    model = model.to(device="meta", dtype=dtype).train()  # (buffers made from numpy start on the CPU)
    x = torch.zeros(batch, c, h, w, device="meta", dtype=dtype)
    t = torch.zeros(batch, device="meta")
    cond = _meta_condition(model, family, batch)
    blocks = list(model.all_blocks())
    current: list[int] = [-1]
    per_block: dict[int, int] = {}
    block_inputs: dict[int, int] = {}
    # weights (and views of them) are not activations: their storages count as seen
    seen: set[int] = {t.untyped_storage()._cdata for t in [*model.parameters(), *model.buffers()]}

    def enter(i):
        def hook(module, args):
            current[0] = i
            block_inputs[i] = args[0].numel() * args[0].element_size()
        return hook

    handles = [b.register_forward_pre_hook(enter(i)) for i, b in enumerate(blocks)]

    def pack(t: torch.Tensor):
        key = t.untyped_storage()._cdata
        if key not in seen:
            seen.add(key)
            per_block[current[0]] = per_block.get(current[0], 0) + t.untyped_storage().nbytes()
        return t

    try:
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), _flash_attention():
            out = model(x, t, **cond, return_aux=True)
            current[0] = -1
            del out
    finally:
        for h_ in handles:
            h_.remove()
    outside = per_block.pop(-1, 0)
    if checkpointing == "none":
        return outside + sum(per_block.values())
    return outside + sum(block_inputs.values()) + max(per_block.values(), default=0)


@contextlib.contextmanager
def _flash_attention():
    """SDPA as a fused (flash) kernel on meta tensors. The meta device dispatches SDPA to its math path,
    which keeps the N² attention weights for the backward; the fused kernels GPUs (and CPUs) run keep
    the output and its log-sum-exp instead, as this op does."""
    from unittest import mock

    def flash(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **kw):
        if attn_mask is not None or dropout_p or kw:
            return original(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p, is_causal=is_causal, scale=scale, **kw)
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, is_causal=is_causal, scale=scale)[0]

    original = torch.nn.functional.scaled_dot_product_attention
    with mock.patch.object(torch.nn.functional, "scaled_dot_product_attention", flash):
        yield


def _meta_condition(model: nn.Module, family, batch: int) -> dict[str, torch.Tensor]:
    spec = family.conditioning(model.config)
    if spec.kind == "class":
        cond = {"y": torch.zeros(batch, dtype=torch.long, device="meta")}
    else:
        raise NotImplementedError(f"memory planning of {spec.kind!r}-conditioned families needs their text shapes; "
                                  "add them here when the family lands")
    if spec.guidance:
        cond["guidance"] = torch.zeros(batch, device="meta")
    return cond


def plan(student_cfg: Any, spec: LoraSpec | None, *, batch: int = 32, world: int = 1, engine: str = "fsdp",
         compute_dtype: torch.dtype = torch.bfloat16, checkpointing: str = "none", teacher_shard: bool = True,
         master_dtype: torch.dtype = torch.float32) -> MemoryPlan:
    """Per-rank memory of distilling `student_cfg` (None spec: full fine-tuning) with `batch` samples per rank."""
    model = adapted_student(student_cfg, spec)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    frozen = total - trainable
    m = torch.tensor([], dtype=master_dtype).element_size()
    shard = world if engine == "fsdp" else 1
    with torch.device("meta"):
        t_params = sum(p.numel() for p in family_of(student_cfg).build(teacher_of(student_cfg)).parameters())
    t_bytes = t_params * torch.tensor([], dtype=compute_dtype).element_size() // (world if teacher_shard and engine == "fsdp" else 1)
    ema = trainable + (frozen if engine == "fsdp" else 0)  # single/DDP: the EMA shares the frozen base
    return MemoryPlan(
        method=spec.method if spec is not None else "full",
        trainable=trainable, frozen=frozen,
        weights_bytes=total * m // shard,
        grad_bytes=trainable * m // shard,
        optimizer_bytes=ADAM_MOMENTS * trainable * 4 // shard,
        ema_bytes=ema * m // shard,
        teacher_bytes=t_bytes,
        activation_bytes=saved_activation_bytes(model, batch, compute_dtype, checkpointing),
    )
