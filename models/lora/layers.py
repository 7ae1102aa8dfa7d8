"""LoRA and TD-LoRA layers that keep the base layer's names, so sliced execution can slice them.

`LoRALinear` is an `nn.Linear` whose `weight` and `bias` are the base layer's own parameters (same
names in the state dict, so inheritance, FSDP units and converters see the model unchanged) plus a
low-rank update `ΔW = (α/R)·B·A` with `A` (R, in) and `B` (out, R), B = 0 at the start.

TD-LoRA (timestep-dependent LoRA, our formulation; DyDiT++'s exact one was not available): the R
ranks form K experts of R/K ranks each, and a per-layer gate on the timestep embedding weighs them,

    ΔW(t) = (α/R) · Σ_k  K·softmax(W_g·e_t + b_g)_k · B_k A_k

— the same embedding DyDiT's width routers read, so the adaptation changes with t as the width
does. Why this form: the gate scales whole rank blocks, so the mixture is still one rank-R product
(two GEMMs, as plain LoRA of rank R, no loop over experts); with W_g = 0 the gates are all 1 and a
TD-LoRA layer *is* the plain rank-R LoRA with the same parameters, so the two compare at equal
trainable parameters and equal initial function, differing only by the gate (K·(D+1) parameters);
and the gates depend on t alone, so inference with a shared timestep sees one fixed ΔW(t).

`lora_delta(x, rows=, cols=)` is what sliced execution calls (`models.dynamic.sliced_linear`):
output rows (heads, channel groups) slice B's rows, input columns slice A's columns, exactly as
the base weight is sliced, and gathered tokens (token routing) pay the adapter only for themselves.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from models.dynamic import row_samples


class TimestepSource:
    """The timestep embedding of the forward in progress, for TD-LoRA gates.

    A forward hook on the family's timestep embedder (`ModelFamily.timestep_module`) stores its
    output here; every TD-LoRA layer of the model holds this one object. Detached: the gates train,
    the (frozen) embedder is not moved by them. A family whose embedding is a sum of several modules'
    outputs (FLUX: `time_in` + `guidance_in`) hooks each: the first module's output starts the sum of a
    forward, each later one (`TimestepSource.part(i)`) adds its own.
    """

    def __init__(self) -> None:
        self.value: torch.Tensor | None = None

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> None:
        self.value = output.detach()

    def part(self, index: int) -> "_LaterPart":
        """The hook of the `index`-th (≥ 1) module of the sum."""
        return _LaterPart(self, index)


class _LaterPart:
    def __init__(self, source: TimestepSource, index: int) -> None:
        self.source, self.index = source, index

    def __call__(self, module: nn.Module, args, output: torch.Tensor) -> None:
        if self.source.value is None:
            raise RuntimeError("TD-LoRA: a later part of the timestep embedding ran before its first module "
                               "(ModelFamily.timestep_module lists them in execution order)")
        self.source.value = self.source.value + output.detach()


class LoRALinear(nn.Linear):
    """`F.linear(x, W, b) + (α/R)·B·(g(t) ⊙ A·x)` with the base `W`, `b` frozen; g ≡ 1 for plain LoRA.

    Built from an existing `nn.Linear` (`from_linear`), whose parameters it takes over unchanged.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float, experts: int = 1,
                 gate_dim: int = 0, device=None, dtype=None) -> None:
        nn.Module.__init__(self)  # no base weight of its own: `from_linear` hands it the base's
        if rank < 1 or rank % experts:
            raise ValueError(f"LoRA rank {rank} must be >= 1 and divisible by the {experts} TD-LoRA experts")
        self.in_features, self.out_features = in_features, out_features
        self.rank, self.alpha, self.experts = rank, float(alpha), experts
        self.scaling = self.alpha / rank
        kw = {"device": device, "dtype": dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(out_features, rank, **kw))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as peft and nn.Linear: B·A = 0 at the start
        self.lora_gate: nn.Linear | None = None
        self.source: TimestepSource | None = None
        if experts > 1:
            self.lora_gate = nn.Linear(gate_dim, experts, **kw)
            nn.init.zeros_(self.lora_gate.weight)  # gates K·softmax(0) = 1: starts as plain rank-R LoRA
            nn.init.zeros_(self.lora_gate.bias)

    @classmethod
    def from_linear(cls, base: nn.Linear, rank: int, alpha: float, experts: int = 1, gate_dim: int = 0,
                    source: TimestepSource | None = None) -> "LoRALinear":
        if experts > 1 and source is None:
            raise ValueError("a TD-LoRA layer needs the model's TimestepSource")
        layer = cls(base.in_features, base.out_features, rank, alpha, experts, gate_dim,
                    device=base.weight.device, dtype=base.weight.dtype)
        layer.weight = base.weight
        layer.bias = base.bias
        layer.source = source
        return layer

    def extra_repr(self) -> str:
        kind = f"TD-LoRA experts={self.experts}" if self.experts > 1 else "LoRA"
        return f"{super().extra_repr()}, {kind} rank={self.rank} alpha={self.alpha:g}"

    def adapter_parameters(self) -> list[nn.Parameter]:
        gate = list(self.lora_gate.parameters()) if self.lora_gate is not None else []
        return [self.lora_A, self.lora_B, *gate]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.lora_delta(x)

    def lora_delta(self, x: torch.Tensor, rows: torch.Tensor | None = None,
                   cols: torch.Tensor | None = None) -> torch.Tensor:
        """The adapter's output for `x`, restricted to output `rows` and input `cols` (sliced path):
        `x` then holds only those input columns, and the result only those output rows."""
        a = self.lora_A if cols is None else self.lora_A.index_select(1, cols)
        h = F.linear(x, a)
        if self.lora_gate is None:
            h = h * self.scaling
        else:
            h = h * self.gates(x, h.dtype)
        b = self.lora_B if rows is None else self.lora_B.index_select(0, rows)
        return F.linear(h, b)

    def gate_values(self) -> torch.Tensor:
        """(B, K) expert weights K·softmax(W_g·e_t + b_g) of the current forward's timesteps."""
        t_emb = self.source.value if self.source is not None else None
        if t_emb is None:
            raise RuntimeError("a TD-LoRA layer ran before the model's timestep embedder: it has no timestep "
                               "embedding to gate on (is ModelFamily.timestep_module the right module?)")
        logits = self.lora_gate(t_emb.to(self.lora_gate.weight.dtype)).float()
        return self.experts * torch.softmax(logits, dim=-1)

    def gates(self, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The per-rank scale (α/R)·g(t), shaped to broadcast over the rows of `x`: (B, 1…, R) for
        inputs with the batch first, (M, R) for tokens gathered from the flattened batch (token
        routing says which sample each row came from, `models.dynamic.row_samples`)."""
        g = (self.gate_values() * self.scaling).repeat_interleave(self.rank // self.experts, dim=-1).to(dtype)
        samples = row_samples()
        if samples is not None and x.ndim == 2 and samples.numel() == x.shape[0]:
            return g.index_select(0, samples)
        if x.shape[0] == g.shape[0]:
            return g.view(g.shape[0], *([1] * (x.ndim - 2)), g.shape[1])
        if bool((g == g[:1]).all()):  # one timestep for the whole batch (every sampling step)
            return g[0]
        raise RuntimeError(f"TD-LoRA: {x.shape[0]} input rows cannot be matched to the {g.shape[0]} samples' "
                           "timesteps (rows gathered without models.dynamic.rows_from_samples)")

    @torch.no_grad()
    def merged_weight(self) -> torch.Tensor:
        """W + (α/R)·B·A in the base weight's dtype (computed in fp32): plain LoRA only."""
        if self.lora_gate is not None:
            raise ValueError("a TD-LoRA layer's update depends on the timestep: it has no single merged weight")
        delta = (self.lora_B.float() @ self.lora_A.float()) * self.scaling
        return (self.weight.float() + delta).to(self.weight.dtype)

    def to_linear(self, merge: bool = True) -> nn.Linear:
        """A plain `nn.Linear` with the merged weight (or the base weight alone with `merge=False`)."""
        out = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                        device="meta", dtype=self.weight.dtype)
        out.weight = nn.Parameter(self.merged_weight() if merge else self.weight.detach().clone(),
                                  requires_grad=self.weight.requires_grad)
        if self.bias is not None:
            out.bias = self.bias
        return out
