"""FLUX's double-stream (MMDiT) and single-stream blocks, static or dynamic (DyFLUX).

Three execution modes, as DiT's block: "static" (every unit), "masked" (training: every unit
computed, switched-off heads, channel groups and tokens multiplied by the straight-through 0/1
masks) and "sliced" (inference: inactive heads and groups sliced out of the weights, unrouted image
tokens gathered out). What DyFLUX routes:

- heads (`attn_rate`, one router per block on the timestep + guidance embedding): a head that is off
  is off for the joint attention of both streams, so its q, k, v and output columns go in both;
- MLP channel groups (`img_mlp_rate`, `txt_mlp_rate` in double blocks; `mlp_rate` on the fused MLP
  rows of a single block's `linear1`/`linear2`), on the same embedding — so width is a function of
  (t, g), shared by a batch at a sampling step, and the width-plan cache applies;
- image tokens (`token_selection`, reading the text as the released router does): in a double block
  an unrouted image token skips the image MLP; in a single block it skips the whole fused output
  projection (`single_token_skip: output`, released DyFLUX: its attention output is discarded too)
  or only the MLP share (`single_token_skip: mlp`). Text tokens are always computed.

Each block returns its extras: the masks the FLOPs loss and logs read, and (when asked) its
attention output for feature distillation — the merged heads before any output projection,
(B, L_txt + N_img, D), text first.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from models.attention import QKNorm
from models.dynamic import (
    Router, SlicedWeights, UnitSelection, WidthPlan, WidthPlanCache, expand_group_mask, rows_from_samples,
    sliced_linear, token_masked_residual, token_routed_residual,
)
from models.flux_config import FluxConfig
from models.flux_layers import (
    LN_EPS, Modulation, SelfAttention, TokenMixer, TokenRouter, call_router, full_heads, split_heads,
)
from models.kernels.dispatch import get_ops
from models.mlp import SequentialMlp
from models.rope import flux_rope

SALTS_PER_BLOCK = 8  # router k of block i draws with salt i·8 + k


def _mixer(cfg: FluxConfig) -> TokenMixer:
    return TokenMixer(cfg.attention, cfg.head_dim, cfg.dwc_kernel, cfg.linear_eps, cfg.linear_rope, cfg.kernels)


def _head_masked(o: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return o if mask is None else o * mask[:, None, :, None].to(o.dtype)


class _DynamicWidth(nn.Module):
    """Width routers of a block: one head router and one router per MLP, all on the t(+g) embedding."""

    mlp_routers: tuple[str, ...]

    def _init_width(self, cfg: FluxConfig, index: int) -> None:
        self.dynamic = cfg.dynamic
        self.token_routing = cfg.dynamic and cfg.token_routing
        self.salt = index * SALTS_PER_BLOCK
        if not cfg.dynamic:
            return
        self.attn_rate = Router(cfg.hidden_size, cfg.num_heads, cfg.router_tau, cfg.router_threshold)
        for name in self.mlp_routers:
            setattr(self, name, Router(cfg.hidden_size, cfg.groups, cfg.router_tau, cfg.router_threshold))
        if self.token_routing:
            self.token_selection = TokenRouter(cfg.hidden_size, cfg.router_tau, cfg.router_threshold)
        self.plans = {name: WidthPlanCache() for name in self.mlp_routers}  # inference plans per (t, g)

    def width_plans(self, t_emb: torch.Tensor, sliced: bool, key: tuple | None,
                    seeds: torch.Tensor | None) -> list[WidthPlan]:
        """One `WidthPlan` per MLP router (each with the shared head decision), routers run once each;
        at a cached sampling step (`key`), looked up instead."""
        if key is not None:
            head: list[torch.Tensor] = []  # the head router runs once for the plans not yet cached

            def head_once() -> torch.Tensor:
                if not head:
                    head.append(call_router(self.attn_rate, t_emb, seeds, self.salt))
                return head[0]

            return [self._cached(t_emb, name, key, seeds, head_once) for name in self.mlp_routers]
        head_mask = call_router(self.attn_rate, t_emb, seeds, self.salt)
        return [WidthPlan.build(head_mask, call_router(getattr(self, name), t_emb, seeds, self.salt + 1 + i), sliced)
                for i, name in enumerate(self.mlp_routers)]

    def _cached(self, t_emb: torch.Tensor, name: str, key: tuple, seeds: torch.Tensor | None, head) -> WidthPlan:
        router = getattr(self, name)
        i = self.mlp_routers.index(name)
        params = [*self.attn_rate.parameters(), *router.parameters()]
        return self.plans[name].get(key, params, t_emb.shape[0], lambda: WidthPlan.build(
            head(), call_router(router, t_emb, seeds, self.salt + 1 + i), True))

    def route_tokens(self, img: torch.Tensor, vec: torch.Tensor, txt: torch.Tensor, seeds: torch.Tensor | None) -> torch.Tensor:
        """(B, N_img) token mask (all ones without SDT)."""
        if not self.token_routing:
            return img.new_ones(img.shape[:2], dtype=torch.float32)
        return self.token_selection(img, vec, txt, seeds, self.salt + len(self.mlp_routers) + 1)


class DoubleStreamBlock(_DynamicWidth):
    """MMDiT block: image and text streams with their own modulation, projections and MLPs, one joint
    attention over [text; image] with RoPE and no mask."""

    mlp_routers = ("img_mlp_rate", "txt_mlp_rate")

    def __init__(self, cfg: FluxConfig, index: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.kernels, self.num_heads = cfg.kernels, cfg.num_heads
        self.axes_dim, self.theta = tuple(cfg.axes_dim), cfg.theta
        self.img_mod = Modulation(d, double=True)
        self.img_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.img_mlp = SequentialMlp(d, cfg.mlp_hidden, cfg.groups)
        self.txt_mod = Modulation(d, double=True)
        self.txt_attn = SelfAttention(d, cfg.num_heads, cfg.qkv_bias)
        self.txt_mlp = SequentialMlp(d, cfg.mlp_hidden, cfg.groups)
        self.attn_mix = _mixer(cfg)
        self._init_width(cfg, index)

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, t_emb: torch.Tensor,
                grid_hw: tuple[int, int], mode: str, plan_key: tuple | None = None, seeds: torch.Tensor | None = None,
                want_features: bool = False) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
        """img (B, N, D), txt (B, L, D), vec (B, D) the modulation input, t_emb (B, D) the routers' input."""
        ops = get_ops(self.kernels, img.device)
        rope = flux_rope(txt.shape[1], grid_hw, self.axes_dim, self.theta, img.device)
        i_shift1, i_scale1, i_gate1, i_shift2, i_scale2, i_gate2 = self.img_mod(vec)
        t_shift1, t_scale1, t_gate1, t_shift2, t_scale2, t_gate2 = self.txt_mod(vec)
        extras: dict[str, torch.Tensor] = {}
        plan_i = plan_t = None
        if mode != "static":
            plan_i, plan_t = self.width_plans(t_emb, mode == "sliced", plan_key, seeds)
        heads = plan_i.heads if plan_i is not None else None

        qi, ki, vi = self.img_attn.project(ops.modulate_layernorm(img, i_shift1, i_scale1, LN_EPS), heads)
        qt, kt, vt = self.txt_attn.project(ops.modulate_layernorm(txt, t_shift1, t_scale1, LN_EPS), heads)
        o = self.attn_mix(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2), rope, txt.shape[1], grid_hw)
        if mode == "masked":
            o = _head_masked(o, plan_i.head_mask)
        elif heads is not None:
            o = _head_masked(o, heads.mask)
        if want_features:
            extras["features"] = full_heads(o, heads, self.num_heads)
        n_txt = txt.shape[1]
        img = ops.gated_residual(img, i_gate1, self.img_attn.output(o[:, n_txt:], heads))
        txt = ops.gated_residual(txt, t_gate1, self.txt_attn.output(o[:, :n_txt], heads))
        h_img = ops.modulate_layernorm(img, i_shift2, i_scale2, LN_EPS)
        h_txt = ops.modulate_layernorm(txt, t_shift2, t_scale2, LN_EPS)
        if mode == "static":
            img = ops.gated_residual(img, i_gate2, self.img_mlp(h_img))
            return img, ops.gated_residual(txt, t_gate2, self.txt_mlp(h_txt)), extras

        token_mask = self.route_tokens(img, vec, txt, seeds)
        if mode == "masked":
            img = token_masked_residual(img, self.img_mlp(h_img, unit_mask=plan_i.group_mask.unsqueeze(1)), i_gate2, token_mask)
            txt = ops.gated_residual(txt, t_gate2, self.txt_mlp(h_txt, unit_mask=plan_t.group_mask.unsqueeze(1)))
        else:
            img = token_routed_residual(img, h_img, i_gate2, token_mask, self.img_mlp, plan_i.groups, ops)
            txt_all = txt.new_ones(txt.shape[:2], dtype=torch.float32)
            txt = token_routed_residual(txt, h_txt, t_gate2, txt_all, self.txt_mlp, plan_t.groups, ops)
        extras.update(head=plan_i.head_mask, img_channel=plan_i.group_mask, txt_channel=plan_t.group_mask, token=token_mask)
        return img, txt, extras


@dataclass(frozen=True)
class _Selection:
    """Heads and MLP groups of a single block as one key for `SlicedWeights`."""

    heads: UnitSelection
    groups: UnitSelection

    @property
    def key(self) -> tuple:
        return (self.heads.key, self.groups.key)


class SingleStreamBlock(_DynamicWidth):
    """Parallel attention + MLP on the joint [text; image] sequence, fused in `linear1`
    ([q | k | v | mlp_in] rows) and `linear2` ([attention | GELU(mlp)] columns)."""

    mlp_routers = ("mlp_rate",)

    def __init__(self, cfg: FluxConfig, index: int) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.kernels, self.num_heads, self.head_dim = cfg.kernels, cfg.num_heads, cfg.head_dim
        self.hidden, self.mlp_hidden, self.group_size = d, cfg.mlp_hidden, cfg.mlp_hidden // cfg.groups
        self.axes_dim, self.theta = tuple(cfg.axes_dim), cfg.theta
        self.skip = cfg.single_token_skip
        self.linear1 = nn.Linear(d, 3 * d + cfg.mlp_hidden, bias=True)
        self.linear2 = nn.Linear(d + cfg.mlp_hidden, d, bias=True)
        self.norm = QKNorm(cfg.head_dim)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(d, double=False)
        self.attn_mix = _mixer(cfg)
        self._init_width(cfg, index)
        self._slices = SlicedWeights()

    def forward(self, x: torch.Tensor, vec: torch.Tensor, t_emb: torch.Tensor, n_txt: int, grid_hw: tuple[int, int],
                mode: str, plan_key: tuple | None = None, seeds: torch.Tensor | None = None,
                want_features: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """x (B, L + N, D): text then image tokens."""
        ops = get_ops(self.kernels, x.device)
        rope = flux_rope(n_txt, grid_hw, self.axes_dim, self.theta, x.device)
        shift, scale, gate = self.modulation(vec)
        h = ops.modulate_layernorm(x, shift, scale, LN_EPS)
        extras: dict[str, torch.Tensor] = {}
        d3 = 3 * self.hidden
        if mode == "static":
            qkv, mlp = self.linear1(h).split([d3, self.mlp_hidden], dim=-1)
            o = self.attn_mix(*split_heads(qkv, self.num_heads, self.head_dim, self.norm), rope, n_txt, grid_hw)
            if want_features:
                extras["features"] = o.flatten(2)
            out = self.linear2(torch.cat([o.flatten(2), self.mlp_act(mlp)], dim=2))
            return ops.gated_residual(x, gate, out), extras

        (plan,) = self.width_plans(t_emb, mode == "sliced", plan_key, seeds)
        token_mask = self.route_tokens(x[:, n_txt:], vec, x[:, :n_txt], seeds)
        keep = torch.cat([token_mask.new_ones(x.shape[0], n_txt), token_mask], dim=1)  # text always kept
        extras.update(head=plan.head_mask, channel=plan.group_mask, token=token_mask)
        if mode == "masked":
            qkv, mlp = self.linear1(h).split([d3, self.mlp_hidden], dim=-1)
            mlp = mlp * expand_group_mask(plan.group_mask, self.group_size).to(mlp.dtype)
            o = self.attn_mix(*split_heads(qkv, self.num_heads, self.head_dim, self.norm), rope, n_txt, grid_hw)
            o = _head_masked(o, plan.head_mask)
            if want_features:
                extras["features"] = o.flatten(2)
            k = keep.unsqueeze(-1).to(o.dtype)
            act = self.mlp_act(mlp)
            if self.skip == "mlp":
                out = self.linear2(torch.cat([o.flatten(2), act * k], dim=2))
            else:
                out = self.linear2(torch.cat([o.flatten(2), act], dim=2)) * k
            return ops.gated_residual(x, gate, out), extras
        return self._sliced(x, h, gate, plan, keep, rope, n_txt, grid_hw, want_features, extras, ops)

    def _sliced(self, x, h, gate, plan: WidthPlan, keep, rope, n_txt, grid_hw, want_features, extras, ops):
        """Inference: only active heads and groups, MLP rows (and, released variant, the whole output
        projection) only for kept tokens; gather → compute → scatter-add for the rest. Adapters on
        `linear1`/`linear2` (models/lora) are sliced with the weights (`sliced_linear`: the same rows and
        columns, and only the rows of the tokens computed)."""
        heads, groups = plan.heads, plan.groups
        w1, b1, w2, rows, cols, nq, na = self._weights(heads, groups)
        n1, n2 = self.linear1.out_features, self.linear2.in_features
        flat_keep = keep.reshape(-1) > 0.5
        every = bool(flat_keep.all())
        if every:
            qkv, mlp = sliced_linear(self.linear1, h, w1, b1, rows=rows).split([nq, w1.shape[0] - nq], dim=-1)
        else:
            qkv = sliced_linear(self.linear1, h, w1[:nq], b1[:nq], rows=_part(rows, 0, nq, n1, h.device))
        o = self.attn_mix(*split_heads(qkv, heads.index.numel(), self.head_dim, self.norm), rope, n_txt, grid_hw)
        o = _head_masked(o, heads.mask)
        if want_features:
            extras["features"] = full_heads(o, heads, self.num_heads)
        o = o.flatten(2)
        group_mask = None if groups.mask is None else expand_group_mask(groups.mask, self.group_size)  # (B, 1, U·gs)
        if every:
            if group_mask is not None:
                mlp = mlp * group_mask.to(mlp.dtype)
            out = sliced_linear(self.linear2, torch.cat([o, self.mlp_act(mlp)], dim=2), w2, self.linear2.bias, cols=cols)
            return ops.gated_residual(x, gate, out), extras
        index = flat_keep.nonzero().squeeze(1)
        samples = torch.div(index, x.shape[1], rounding_mode="floor")
        with rows_from_samples(samples):  # a gathered row's sample (per-sample adapter gates)
            mlp = sliced_linear(self.linear1, ops.gather_tokens(h, index), w1[nq:], b1[nq:],
                                rows=_part(rows, nq, w1.shape[0], n1, h.device))
        if group_mask is not None:
            mlp = mlp * group_mask[:, 0].index_select(0, samples).to(mlp.dtype)
        act = self.mlp_act(mlp)
        if self.skip == "mlp":
            attn_out = sliced_linear(self.linear2, o, w2[:, :na], self.linear2.bias, cols=_part(cols, 0, na, n2, o.device))
            x = ops.gated_residual(x, gate, attn_out)
            with rows_from_samples(samples):
                y = sliced_linear(self.linear2, act, w2[:, na:], None, cols=_part(cols, na, w2.shape[1], n2, o.device))
            return ops.scatter_add_tokens(x, index, y, gate), extras
        with rows_from_samples(samples):
            out = sliced_linear(self.linear2, torch.cat([ops.gather_tokens(o, index), act], dim=1), w2, self.linear2.bias,
                                cols=cols)
        return ops.scatter_add_tokens(x, index, out, gate), extras

    def _weights(self, heads: UnitSelection, groups: UnitSelection):
        """(linear1 rows [q|k|v|mlp], their bias, linear2 columns [attn|mlp], the indices of those rows and
        columns (None: all), #qkv rows, #attn columns) for the selected units: the full weights when every
        unit is on, else cached copies."""
        d = self.hidden
        if heads.full and groups.full:
            return self.linear1.weight, self.linear1.bias, self.linear2.weight, None, None, 3 * d, d
        params = (self.linear1.weight, self.linear1.bias, self.linear2.weight)
        mlp_rows = groups.rows(self.group_size)
        rows = torch.cat([heads.rows(self.head_dim, copies=3, stride=d), 3 * d + mlp_rows])
        cols = torch.cat([heads.rows(self.head_dim), d + mlp_rows])

        def make() -> tuple[torch.Tensor, ...]:
            return (self.linear1.weight.index_select(0, rows), self.linear1.bias.index_select(0, rows),
                    self.linear2.weight.index_select(1, cols))

        w1, b1, w2 = self._slices.get(_Selection(heads, groups), params, make)
        na = heads.index.numel() * self.head_dim
        return w1, b1, w2, rows, cols, 3 * na, na


def _part(index: torch.Tensor | None, start: int, stop: int, total: int, device: torch.device) -> torch.Tensor | None:
    """Entries [start, stop) of a row/column index, where None stands for all `total` of them."""
    if index is not None:
        return index[start:stop]
    return None if (start, stop) == (0, total) else torch.arange(start, stop, device=device)
