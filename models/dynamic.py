"""DyDiT's routers and the two ways of executing a dynamic block.

- Training: every unit is computed and multiplied by a 0/1 mask that a straight-through
  Gumbel-sigmoid makes differentiable, so gradients reach the routers.
- Inference: the masks are hard; inactive heads and MLP channel groups are sliced out of the
  weights and unrouted tokens skip the MLP (gather → MLP → scatter), so FLOPs saved are time saved.

Parameter names follow alibaba-damo-academy/DyDiT (`attn_rate.router`, `mlp_rate.router`,
`token_selection.mlp_head.{0,2}`), so its released checkpoints load without renaming.
"""
from __future__ import annotations

from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from models.rng import counter_logistic


def gumbel_sigmoid_ste(logits: torch.Tensor, tau: float, training: bool, threshold: float = 0.5, *,
                       seeds: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
    """Hard 0/1 decisions in the forward pass, sigmoid gradients in the backward pass.

    In training, logistic noise (the difference of two Gumbel samples) explores both decisions;
    in eval the decision is the deterministic `sigmoid(logits) > threshold`. With per-sample
    `seeds` ((B,) int64) and a `salt` per router call site, the noise is a pure function of (seed,
    salt, unit), so it does not depend on the rank, the batch or an activation-checkpoint replay
    (`models/rng.py`); without, it comes from the global RNG.
    """
    if training:
        if seeds is not None:
            noise = counter_logistic(seeds.to(logits.device), salt, logits[0].numel()).view_as(logits)
        else:
            g1 = -torch.empty_like(logits).exponential_().log()
            g2 = -torch.empty_like(logits).exponential_().log()
            noise = g1 - g2
        soft = torch.sigmoid((logits + noise) / tau)
    else:
        soft = torch.sigmoid(logits)
    hard = (soft > threshold).to(soft.dtype)
    if not (torch.is_grad_enabled() and logits.requires_grad):
        return hard  # no gradient to carry (inference): the STE's value is `hard`, minus 2 ops
    return hard - soft.detach() + soft


class Router(nn.Module):
    """Timestep-wise width router: one linear layer on the timestep embedding, unit 0 always on."""

    def __init__(self, dim: int, num_units: int, tau: float, threshold: float) -> None:
        super().__init__()
        self.num_units = num_units
        self.tau = tau
        self.threshold = threshold
        self.router = nn.Linear(dim, num_units - 1) if num_units > 1 else None

    def forward(self, t_emb: torch.Tensor, seeds: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
        """(B, D) → (B, num_units) mask with column 0 fixed to 1."""
        ones = torch.ones(t_emb.shape[0], 1, device=t_emb.device, dtype=torch.float32)
        if self.router is None:
            return ones
        gate = gumbel_sigmoid_ste(self.router(t_emb).float(), self.tau, self.training, self.threshold, seeds=seeds, salt=salt)
        return torch.cat([ones, gate], dim=1)


def init_router_biases_(routers: list[Router], token: "TokenSelect | None", width_bias: float, token_bias: float) -> None:
    """DyDiT's "all on" start: width routers' biases `width_bias`, the token router's final bias `token_bias`."""
    for router in routers:
        if router.router is not None:
            nn.init.constant_(router.router.bias, width_bias)
    if token is not None:
        nn.init.constant_(token.mlp_head[2].bias, token_bias)


def reset_routers_(routers: list[Router], token: "TokenSelect | None", width_bias: float, token_bias: float) -> None:
    """Fresh router weights (xavier) and the "all on" biases, e.g. after inheriting a static teacher."""
    for router in routers:
        if router.router is not None:
            nn.init.xavier_uniform_(router.router.weight)
    if token is not None:
        for lin in (token.mlp_head[0], token.mlp_head[2]):
            nn.init.xavier_uniform_(lin.weight)
            nn.init.zeros_(lin.bias)
    init_router_biases_(routers, token, width_bias, token_bias)


class TokenSelect(nn.Module):
    """Spatial token router: a two-layer MLP per token on the residual stream after attention."""

    def __init__(self, dim: int, reduction: int, tau: float, threshold: float) -> None:
        super().__init__()
        hidden = max(1, dim // reduction)
        self.mlp_head = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))
        self.tau = tau
        self.threshold = threshold

    def forward(self, x: torch.Tensor, seeds: torch.Tensor | None = None, salt: int = 0) -> torch.Tensor:
        """(B, N, D) → (B, N) token mask."""
        logits = self.mlp_head(x).squeeze(-1).float()
        return gumbel_sigmoid_ste(logits, self.tau, self.training, self.threshold, seeds=seeds, salt=salt)


@dataclass
class UnitSelection:
    """Which units of a layer run, for the sliced path.

    `index` are the units active for at least one sample (sorted). `mask` is None when every sample
    uses exactly those units (the common case: a sampling step shares one t), else a (B, |index|)
    mask that zeroes the units a given sample does not use.
    """

    index: torch.Tensor
    mask: torch.Tensor | None
    total: int
    _rows: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def full(self) -> bool:
        return self.mask is None and self.index.numel() == self.total

    @property
    def key(self) -> tuple[int, ...]:
        """The selected unit ids (one host read, memoised): identifies the sliced weights."""
        if "key" not in self._rows:
            self._rows["key"] = (self.total, *self.index.tolist())
        return self._rows["key"]

    def rows(self, unit_size: int, copies: int = 1, stride: int = 0) -> torch.Tensor:
        """Weight rows of the selected units, `copies` times at offsets `k·stride` (q, k, v of a fused
        qkv). Memoised: a cached width plan re-slices with no index arithmetic."""
        key = (unit_size, copies, stride)
        if key not in self._rows:
            rows = unit_rows(self.index, unit_size)
            if copies > 1:
                rows = torch.cat([rows + k * stride for k in range(copies)])
            self._rows[key] = rows
        return self._rows[key]

    @classmethod
    def from_mask(cls, mask: torch.Tensor) -> "UnitSelection":
        hard = mask.detach() > 0.5
        union = hard.any(dim=0)
        index = union.nonzero().squeeze(1)
        sub = hard[:, index]
        per_sample = None if bool(sub.all()) else sub.to(mask.dtype)
        return cls(index=index, mask=per_sample, total=mask.shape[1])


@dataclass
class WidthPlan:
    """One block's timestep-wise width decision for a batch of timesteps: the (B, H) head and (B, G)
    channel-group masks and, for the sliced path, the units to compute. A function of t alone, so
    inference computes it once per sampling step (see `DiTBlock.cached_width_plan`).

    `extra_masks` / `extra`: further width-routed layers of a block by name, e.g. PixArt's
    cross-attention heads ("cross"); cached and expanded like the two above."""

    head_mask: torch.Tensor
    group_mask: torch.Tensor
    heads: UnitSelection | None = None
    groups: UnitSelection | None = None
    extra_masks: dict[str, torch.Tensor] = field(default_factory=dict)
    extra: dict[str, UnitSelection] = field(default_factory=dict)

    @classmethod
    def build(cls, head_mask: torch.Tensor, group_mask: torch.Tensor, sliced: bool, **extra_masks: torch.Tensor) -> "WidthPlan":
        if not sliced:
            return cls(head_mask, group_mask, extra_masks=extra_masks)
        return cls(head_mask, group_mask, UnitSelection.from_mask(head_mask), UnitSelection.from_mask(group_mask),
                   extra_masks, {k: UnitSelection.from_mask(m) for k, m in extra_masks.items()})

    def map_masks(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "WidthPlan":
        """The same plan with `fn` applied to every mask (the selections are shared)."""
        return WidthPlan(fn(self.head_mask), fn(self.group_mask), self.heads, self.groups,
                         {k: fn(m) for k, m in self.extra_masks.items()}, self.extra)


class SlicedWeights:
    """The latest sliced copies of a layer's weights for one unit pattern (inference only).

    Slicing copies the active rows/columns (index_select) on every call, yet at inference one
    pattern serves every call at a timestep (and often neighbouring timesteps). So the copies of the
    latest pattern are kept and reused while the source weights are unchanged (same storage and
    version counter). One pattern per layer bounds the memory at one copy of its active weights.
    With autograd on, slices are made fresh: they must stay differentiable functions of the weights.
    """

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._key: tuple | None = None
        self._value: tuple[torch.Tensor, ...] = ()

    def get(
        self, sel: UnitSelection, params: tuple[torch.Tensor, ...], make: Callable[[], tuple[torch.Tensor, ...]]
    ) -> tuple[torch.Tensor, ...]:
        version = weights_version(params)
        if torch.is_grad_enabled() or version is None:
            return make()
        key = (sel.key, version)
        if key != self._key:
            self._key, self._value = None, ()  # drop the old copies before making the new ones
            self._value = make()
            self._key = key
        return self._value


def weights_version(params) -> tuple | None:
    """Identity and version of tensors, to tell when a cache built from them is stale (an optimiser or
    EMA step, `load_state_dict` or `.to()` changes it); None for inference tensors, which have no
    version counter, so a change could not be seen and nothing may be cached."""
    params = tuple(params)
    if any(p.is_inference() for p in params):
        return None
    return tuple((p.data_ptr(), p._version, p.dtype, p.device) for p in params)


def expand_group_mask(mask: torch.Tensor, group_size: int) -> torch.Tensor:
    """(B, G) unit mask → (B, 1, G·group_size) channel mask broadcastable over tokens."""
    return mask.repeat_interleave(group_size, dim=1).unsqueeze(1)


def unit_rows(index: torch.Tensor, unit_size: int) -> torch.Tensor:
    """Row indices of the units in `index` when each unit owns `unit_size` contiguous rows."""
    offs = torch.arange(unit_size, device=index.device)
    return (index[:, None] * unit_size + offs[None]).reshape(-1)


class WidthPlanCache:
    """Width plans of one block per sampling timestep (inference only), dropped when a router changes.

    The head and channel masks are a function of t alone (METHODS §1.1), so inference runs a block's
    width routers once per sampling timestep (one mask row kept) and then does no router, mask →
    index work or host syncs at that t. The cache lives inside the block, where FSDP has the router
    weights gathered; `key` carries the timestep embedder's weight version (see `plan_key`), and the
    routers' own version is checked here, so any weight change (optimiser, EMA, load) empties it.
    """

    MAX_PLANS = 1024  # distinct sampling timesteps; a plan is a few (1, U) tensors

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        self._plans: dict[tuple, "WidthPlan"] = {}
        self._version: tuple | None = None

    def __len__(self) -> int:
        return len(self._plans)

    def get(self, key: tuple, router_params, batch: int, build: Callable[[], "WidthPlan"]) -> "WidthPlan":
        """The plan for `key` expanded to `batch` rows; `build()` runs the routers on the whole batch."""
        version = weights_version(router_params)
        if version is None:
            return build()
        if version != self._version:
            self._plans, self._version = {}, version
        plan = self._plans.get(key)
        if plan is None:
            if len(self._plans) >= self.MAX_PLANS:
                self._plans.pop(next(iter(self._plans)))
            # On the whole batch, as the uncached and masked paths do (same GEMM, same rounding).
            plan = self._plans[key] = build().map_masks(lambda m: m[:1].clone())
        return plan.map_masks(lambda m: m.expand(batch, -1))


class DynamicExecution:
    """What a family's model class mixes in (before `nn.Module`) to run a dynamic student two ways.

    `exec_mode(complete)`: "static" (a teacher, or every unit on), "masked" (training: every unit
    computed, multiplied by its STE mask) or, in eval, "sliced" (inactive units skipped) unless
    `dynamic_exec = "masked"` asks for the training path. `train()` drops the inference caches
    (width plans, sliced weight copies): they would only hold memory through training.
    """

    dynamic_exec: str = "auto"

    def exec_mode(self, complete: bool) -> str:
        return exec_mode(self.config.dynamic, self.training, self.dynamic_exec, complete)

    def train(self, mode: bool = True):
        if mode:
            clear_inference_caches(self)
        return super().train(mode)


def plan_key(t: torch.Tensor, t_emb: torch.Tensor, mode: str, embedder_params) -> tuple | None:
    """The key under which blocks cache width plans for one forward, or None (the routers run).

    Only at inference (sliced, no autograd) with one timestep shared by the batch, as in every
    sampling step; training, masked eval and per-sample timesteps never cache. The key holds the
    timestep embedder's weight versions, since the plans are functions of its output.
    """
    if mode != "sliced" or torch.is_grad_enabled() or t.ndim != 1 or t.numel() == 0:
        return None
    values = t.tolist()
    if any(v != values[0] for v in values):
        return None
    version = weights_version(embedder_params)
    if version is None:
        return None
    return (values[0], t_emb.dtype, t_emb.device, version)


def token_routed_residual(x: torch.Tensor, h: torch.Tensor, gate: torch.Tensor, token_mask: torch.Tensor,
                          mlp: Callable[..., torch.Tensor], groups: UnitSelection | None, ops) -> torch.Tensor:
    """`x + gate·MLP(h)` computed only for routed tokens and only the active channel groups (sliced path).

    Unrouted tokens skip the MLP (gather → MLP → scatter-add; DyDiT's SDT): the MLP has no token
    interaction, so tokens of different samples are packed into one flattened (B·N) batch.
    `mlp(h, unit_mask=..., groups=...)` is the block's MLP; `gate` is (B, D) or None (no gate).
    """
    b, n, _ = x.shape
    keep = token_mask.reshape(-1) > 0.5
    if bool(keep.all()):
        unit_mask = None if groups is None or groups.mask is None else groups.mask.unsqueeze(1)
        y = mlp(h, unit_mask=unit_mask, groups=groups)
        return x + y if gate is None else ops.gated_residual(x, gate, y)
    index = keep.nonzero().squeeze(1)
    if index.numel() == 0:
        return x
    samples = torch.div(index, n, rounding_mode="floor")
    unit_mask = None
    if groups is not None and groups.mask is not None:
        unit_mask = groups.mask.index_select(0, samples)
    with rows_from_samples(samples):
        y = mlp(ops.gather_tokens(h, index), unit_mask=unit_mask, groups=groups)
    return ops.scatter_add_tokens(x, index, y, gate)


def token_masked_residual(x: torch.Tensor, y: torch.Tensor, gate: torch.Tensor | None, token_mask: torch.Tensor) -> torch.Tensor:
    """The training path of the same: every token computed, unrouted ones multiplied by 0 (STE mask)."""
    m = token_mask.unsqueeze(-1).to(y.dtype)
    return x + (m if gate is None else m * gate.unsqueeze(1)) * y


EXEC_MODES = ("auto", "masked", "sliced")


def exec_mode(dynamic: bool, training: bool, dynamic_exec: str, complete: bool) -> str:
    """How a model runs its blocks: "static" (a static model, or `complete=True`), "masked" (training,
    or eval asked for it with `dynamic_exec="masked"`) or "sliced" (inference)."""
    if not dynamic or complete:
        return "static"
    if training:
        return "masked"
    if dynamic_exec not in EXEC_MODES:
        raise ValueError(f"dynamic_exec={dynamic_exec!r} is not one of {EXEC_MODES}")
    return "masked" if dynamic_exec == "masked" else "sliced"


def clear_inference_caches(model: nn.Module) -> None:
    """Drop every width plan and sliced weight copy held by `model`'s modules (directly or in a dict):
    they serve inference only and would hold memory through training."""
    for module in model.modules():
        for value in vars(module).values():
            for cache in (value.values() if isinstance(value, dict) else (value,)):
                if isinstance(cache, (SlicedWeights, WidthPlanCache)):
                    cache.clear()


# --- per-sample layers inside gathered tokens, and adapters on sliced weights -----------------------
_ROW_SAMPLES: ContextVar[torch.Tensor | None] = ContextVar("row_samples", default=None)


@contextmanager
def rows_from_samples(samples: torch.Tensor) -> Iterator[None]:
    """Within this context, 2-D activations are tokens gathered from the flattened batch and row i came
    from sample `samples[i]`: a layer conditioned per sample (a TD-LoRA gate on the sample's timestep)
    reads it through `row_samples()`. Set by `token_routed_residual` around the MLP it runs."""
    token = _ROW_SAMPLES.set(samples)
    try:
        yield
    finally:
        _ROW_SAMPLES.reset(token)


def row_samples() -> torch.Tensor | None:
    """The sample of each gathered row (see `rows_from_samples`), or None outside a gathered call."""
    return _ROW_SAMPLES.get()


def sliced_linear(layer: nn.Module, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                  rows: torch.Tensor | None = None, cols: torch.Tensor | None = None) -> torch.Tensor:
    """`F.linear(x, weight, bias)` where `weight`/`bias` are `layer`'s output `rows` / input `cols`
    (the sliced path), plus the layer's low-rank adapter, if it has one (`models/lora`), restricted to
    the same rows and columns — so skipped heads and channel groups cost the adapter nothing either."""
    y = F.linear(x, weight, bias)
    delta = getattr(layer, "lora_delta", None)
    return y if delta is None else y + delta(x, rows=rows, cols=cols)
