"""Materialising a model from a (lazy) state dict, each rank reading only the rows it holds.

A model is built with its parameters on the meta device (`build_meta`: no initialisation, no memory),
given the dtypes its tensors will have (`set_dtypes`: the stored ones unless asked otherwise), wrapped
or sharded by the engine and allocated (`to_empty_keeping_buffers`), then filled (`fill`): a
parameter sharded by FSDP2 (a DTensor, `Shard(0)` over the mesh) receives the rows of its local
shard, a plain tensor the whole tensor, read from the source by row ranges (`models.lazy`). Nothing
here knows a family or an engine: ZeRO-3 partitions (flat ranges) use `models.lazy.read_flat` in the
DeepSpeed engine.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from models.lazy import materialise, read_rows

Weight = Any  # torch.Tensor | models.lazy.LazyTensor


def build_meta(build: Callable[[], nn.Module]) -> nn.Module:
    """`build()` with every parameter on the meta device (shapes and names only: no initialisation, no
    memory). Buffers are computed as the constructor computes them (they are small): a non-persistent
    one (a RoPE table, a fixed position embedding), which no weights file holds, keeps its value through
    `to_empty_keeping_buffers`; persistent ones are then filled from the weights like parameters."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            kind = type(module._parameters[name])
            module._parameters[name] = kind(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta  # type: ignore[method-assign]
    try:
        return build()
    finally:
        nn.Module.register_parameter = register  # type: ignore[method-assign]


def to_empty_keeping_buffers(module: nn.Module, device: torch.device) -> nn.Module:
    """`module.to_empty(device)` (allocate every tensor, after sharding: only this rank's shards), then
    the non-persistent buffers' constructed values copied back (`to_empty` leaves them uninitialised)."""
    keep = {name: b.detach().to("cpu", copy=True) for name, b in named_non_persistent(module)}
    module.to_empty(device=device)
    with torch.no_grad():
        for name, b in named_non_persistent(module):
            b.copy_(keep[name])
    return module


def state_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """Parameters and persistent buffers by state-dict name (what a weights file holds)."""
    out: dict[str, torch.Tensor] = {}
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, p in mod._parameters.items():
            if p is not None:
                out.setdefault(dot + name, p)
        for name, b in mod._buffers.items():
            if b is not None and name not in mod._non_persistent_buffers_set:
                out.setdefault(dot + name, b)
    return out


def named_non_persistent(module: nn.Module) -> list[tuple[str, torch.Tensor]]:
    return [(f"{prefix}.{name}".lstrip("."), mod._buffers[name]) for prefix, mod in module.named_modules()
            for name in sorted(mod._non_persistent_buffers_set) if mod._buffers.get(name) is not None]


def set_dtypes(module: nn.Module, state: Mapping[str, Weight], dtype: torch.dtype | None) -> None:
    """Give every parameter and buffer the dtype it will be filled with: `dtype`, or (None) the stored
    dtype of its source, so a bf16 file stays bf16 and no fp32 copy is ever made. On a meta model this
    costs nothing; call it before sharding."""
    missing = sorted(set(state_tensors(module)) - set(state))
    if missing:
        raise KeyError(f"the weights lack {len(missing)} tensors of the model: {missing[:5]}")
    for prefix, mod in module.named_modules():
        dot = f"{prefix}." if prefix else ""
        for name, p in list(mod._parameters.items()):
            want = dtype or state[dot + name].dtype
            if p is not None and p.dtype != want and p.is_floating_point():
                mod._parameters[name] = nn.Parameter(p.detach().to(want), requires_grad=p.requires_grad)
        for name, b in list(mod._buffers.items()):
            key = dot + name
            if b is not None and key in state and b.is_floating_point():
                want = dtype or state[key].dtype
                if b.dtype != want:
                    mod._buffers[name] = b.to(want)


def local_rows(t: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """(the tensor this rank writes, first row, end row) of a full tensor or an FSDP2/DTensor shard.

    Only dim-0 sharding (FSDP2's default `Shard(0)`) and replication are supported: the shard of a
    rank is then a row range, the unit a lazy tensor reads."""
    from torch.distributed.tensor import DTensor

    if not isinstance(t, DTensor):
        return t, 0, (t.shape[0] if t.ndim else 0)
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    local = t.to_local()
    shape, offset = compute_local_shape_and_global_offset(t.shape, t.device_mesh, t.placements)
    if any(o != 0 for o in offset[1:]) or tuple(shape[1:]) != tuple(t.shape[1:]) or tuple(local.shape) != tuple(shape):
        raise ValueError(f"cannot fill a DTensor sharded as {t.placements} by rows (local {tuple(local.shape)} "
                         f"of {tuple(t.shape)} at {tuple(offset)}): shard dim 0 only")
    return local, int(offset[0]) if t.ndim else 0, int(offset[0] + shape[0]) if t.ndim else 0


@torch.no_grad()
def fill(module: nn.Module, state: Mapping[str, Weight], keys: Iterable[str] | None = None) -> list[str]:
    """Copy `state[k]` into the module's tensor `k` for each `k` of `keys` (default: all of the
    module's), each rank only its local rows; values are cast to the destination's dtype. Returns the
    names filled."""
    own = state_tensors(module)
    names = list(own) if keys is None else list(keys)
    unknown = [k for k in names if k not in own or k not in state]
    if unknown:
        raise KeyError(f"cannot fill {unknown[:5]}: not in both the model and the weights")
    for name in names:
        dst, src = own[name], state[name]
        if tuple(dst.shape) != tuple(src.shape):
            raise ValueError(f"{name}: weights {tuple(src.shape)} vs model {tuple(dst.shape)}")
        local, a, b = local_rows(dst)
        if dst.ndim == 0:
            local.copy_(materialise(src))
        elif b > a:
            local.copy_(read_rows(src, a, b))
    return names


@torch.no_grad()
def copy_local(dst: nn.Module, src: nn.Module, keys: Iterable[str] | None = None) -> None:
    """Copy each local shard (or tensor) of `src` into the same-named one of `dst`, sharded alike
    (a student's EMA after the student was filled)."""
    mine, theirs = state_tensors(dst), state_tensors(src)
    for name in (list(mine) if keys is None else list(keys)):
        a, _, _ = local_rows(mine[name])
        b, _, _ = local_rows(theirs[name])
        a.copy_(b)


def unfilled(module: nn.Module, filled: Iterable[str]) -> list[str]:
    """Parameters and persistent buffers that `fill` did not write (after `to_empty` they hold garbage)."""
    return sorted(set(state_tensors(module)) - set(filled))


def local_numel(module: nn.Module) -> Iterator[tuple[str, int, int]]:
    """(name, elements this rank holds, elements of the full tensor) per parameter and persistent buffer."""
    for name, t in state_tensors(module).items():
        local, _, _ = local_rows(t)
        yield name, local.numel(), t.numel()
