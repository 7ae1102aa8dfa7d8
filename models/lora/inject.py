"""Adapters into any family's model by pattern: choose the linear layers, freeze the base, merge.

Generic over families: layers are chosen by the family's parameter groups (`ModelFamily.param_group`:
attention, mlp, adaLN, embeddings, final_layer) or by fnmatch patterns on module names, and TD-LoRA's
gates read the module the family names as its timestep embedder (`ModelFamily.timestep_module`).
Parameters the caller says train fully (a student's newly initialised parts: LiT's attention and
DWC, the routers) get no adapter and keep their gradients; every other base parameter is frozen.
"""
from __future__ import annotations

import fnmatch
from dataclasses import asdict, dataclass, field
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from models.family import family_of
from models.lora.layers import LoRALinear, TimestepSource

LORA_METHODS = ("lora", "tdlora")
TARGET_GROUPS = ("attention", "mlp", "adaLN", "embeddings", "final_layer")  # routers train fully, never adapted


@dataclass(frozen=True)
class LoraSpec:
    """What to adapt and how (the run config's `peft.*`; error messages name those keys).

    rank: LoRA's R; for TD-LoRA the total rank of its K experts (R/K each), so `lora` and `tdlora`
    with the same rank have the same adapter parameters (TD-LoRA adds its gates, K·(D+1) a layer).
    alpha: the update is scaled by alpha/rank (None: alpha = rank, scale 1).
    """

    method: str = "lora"
    rank: int = 8
    alpha: float | None = None
    experts: int = 4
    targets: tuple[str, ...] = ("attention", "mlp", "adaLN")
    modules: tuple[str, ...] = ()  # fnmatch patterns of module names; when given, used instead of targets
    exclude: tuple[str, ...] = ()

    @property
    def layer_experts(self) -> int:
        return self.experts if self.method == "tdlora" else 1

    @property
    def scale_alpha(self) -> float:
        return float(self.rank if self.alpha is None else self.alpha)

    def validate(self) -> "LoraSpec":
        def bad(key: str, allowed: str) -> None:
            raise ValueError(f"peft.{key}={getattr(self, key)!r} is invalid: {allowed}")

        if self.method not in LORA_METHODS:
            bad("method", f"one of {LORA_METHODS} (or none for full fine-tuning)")
        if self.rank < 1:
            bad("rank", "a positive integer")
        if self.alpha is not None and self.alpha <= 0:
            bad("alpha", "> 0, or null for alpha = rank")
        if self.method == "tdlora" and (self.experts < 2 or self.rank % self.experts):
            bad("experts", f"TD-LoRA needs >= 2 experts that divide peft.rank={self.rank} (each expert has rank/experts)")
        for g in self.targets:
            if g not in TARGET_GROUPS:
                bad("targets", f"parameter groups among {TARGET_GROUPS} (routers are newly initialised and train "
                               "fully; they are never adapted)")
        if not self.targets and not self.modules:
            bad("targets", "at least one group, or module patterns in peft.modules")
        return self


@dataclass
class LoraReport:
    adapted: list[str] = field(default_factory=list)  # module names now LoRALinear
    trainable: list[str] = field(default_factory=list)  # parameters with gradients (adapters + trained fully)
    frozen: list[str] = field(default_factory=list)
    full: list[str] = field(default_factory=list)  # base parameters trained fully (not adapted)

    def counts(self, model: nn.Module) -> dict[str, int]:
        params = dict(model.named_parameters())
        n = lambda names: sum(params[k].numel() for k in names)  # noqa: E731
        adapters = [k for k in self.trainable if k not in set(self.full)]
        return {"adapter": n(adapters), "full": n(self.full), "trainable": n(self.trainable), "frozen": n(self.frozen)}

    def summary(self, model: nn.Module) -> str:
        c = self.counts(model)
        total = c["trainable"] + c["frozen"]
        return (f"{len(self.adapted)} layers adapted; trainable {c['trainable']:,} of {total:,} parameters "
                f"({100 * c['trainable'] / max(total, 1):.2f}%: adapters {c['adapter']:,}, trained fully {c['full']:,})")


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, LoRALinear)}


def select_targets(model: nn.Module, spec: LoraSpec, full: Iterable[str] = ()) -> list[str]:
    """Names of the linear layers `spec` adapts: in its groups (or matching its module patterns), not
    excluded, and not trained fully anyway."""
    family = family_of(model)
    full = set(full)
    # a TD-LoRA gate reads the timestep embedding: the layers computing it cannot be gated on it
    inside = tuple(f"{n}." for n, _ in timestep_modules(model)) if spec.method == "tdlora" else ()
    out = []
    for name, m in model.named_modules():
        if type(m) is not nn.Linear:  # LoRALinear is a subclass: an adapted layer is not adapted again
            continue
        if spec.modules:
            hit = any(fnmatch.fnmatchcase(name, p) for p in spec.modules)
        else:  # a layer fusing several groups (FLUX's single-block linear1) is in each of them
            hit = bool(set(family.param_split(model.config, f"{name}.weight", tuple(m.weight.shape))) & set(spec.targets))
        if inside and name.startswith(inside):
            continue
        if not hit or any(fnmatch.fnmatchcase(name, p) for p in spec.exclude):
            continue
        if f"{name}.weight" in full:
            continue
        out.append(name)
    return out


def timestep_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The modules whose outputs, summed, are the timestep embedding TD-LoRA's gates read
    (`ModelFamily.timestep_module`: one name, or several in execution order). A listed module the model
    was built without (an attribute set to None: FLUX-schnell's `guidance_in`) is left out."""
    family = family_of(model)
    names = family.timestep_module
    names = (names,) if isinstance(names, str) else tuple(names)
    out = []
    for name in names:
        parent, _, attr = name.rpartition(".")
        try:
            owner = model.get_submodule(parent) if parent else model
        except AttributeError:
            owner = None
        if owner is None or not hasattr(owner, attr):
            raise ValueError(f"TD-LoRA gates read the timestep embedding, but the {family.name} family's "
                             f"timestep_module={family.timestep_module!r} names {name!r}, which is not a module of "
                             f"{type(model).__name__}; set ModelFamily.timestep_module to the module(s) whose "
                             "(summed) output is the (B, D) embedding")
        module = getattr(owner, attr)
        if module is not None:
            out.append((name, module))
    if not out:
        raise ValueError(f"{type(model).__name__} has none of the timestep modules {names}")
    return out


def attach_timestep_source(model: nn.Module) -> tuple[TimestepSource, int]:
    """A `TimestepSource` fed by the family's timestep embedder(s), and the embedding's width."""
    modules = timestep_modules(model)
    name, first = modules[0]
    linears = [m for m in first.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{name!r} has no linear layer: cannot tell the timestep embedding's width")
    for hook in first._forward_hooks.values():
        if isinstance(hook, TimestepSource):
            return hook, linears[-1].out_features
    source = TimestepSource()
    first.register_forward_hook(source)
    for i, (_, module) in enumerate(modules[1:], start=1):
        module.register_forward_hook(source.part(i))
    return source, linears[-1].out_features


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, new)


def apply_lora(model: nn.Module, spec: LoraSpec, full: Iterable[str] = ()) -> LoraReport:
    """Put adapters into `model` in place and freeze its base: afterwards exactly the adapters and the
    parameters named in `full` require gradients."""
    spec.validate()
    if lora_layers(model):
        raise ValueError("the model already has LoRA adapters")
    params = dict(model.named_parameters())
    full = set(full)
    unknown = sorted(full - set(params))
    if unknown:
        raise ValueError(f"parameters to train fully that the model does not have: {unknown[:5]}")
    targets = select_targets(model, spec, full)
    if not targets:
        what = f"peft.modules={list(spec.modules)}" if spec.modules else f"peft.targets={list(spec.targets)}"
        raise ValueError(f"{what} selects no linear layer of {type(model).__name__} that is not trained fully; "
                         f"linear layers: {[n for n, m in model.named_modules() if type(m) is nn.Linear][:8]}")
    source, gate_dim = attach_timestep_source(model) if spec.method == "tdlora" else (None, 0)
    for name in targets:
        base = model.get_submodule(name)
        _replace(model, name, LoRALinear.from_linear(base, spec.rank, spec.scale_alpha, spec.layer_experts,
                                                     gate_dim, source))
    adapter_ids = {id(p) for m in lora_layers(model).values() for p in m.adapter_parameters()}
    report = LoraReport(adapted=targets, full=sorted(full))
    for n, p in model.named_parameters():
        train = id(p) in adapter_ids or n in full
        p.requires_grad_(train)
        (report.trainable if train else report.frozen).append(n)
    return report


def merge_lora(model: nn.Module) -> list[str]:
    """Fold every plain LoRA layer into its weight (W + (α/R)·B·A; the layer becomes an `nn.Linear`).
    TD-LoRA layers stay as they are (their update changes with t, see `models.lora.layers`).
    Returns the merged layers' names."""
    merged = []
    for name, layer in lora_layers(model).items():
        if layer.lora_gate is None:
            _replace(model, name, layer.to_linear(merge=True))
            merged.append(name)
    return merged


# --- the adapters' layout, as metadata of an exported file --------------------------------------------

def adapter_layout(model: nn.Module) -> dict[str, Any] | None:
    """What `restore_adapters` needs to rebuild the adapters on the bare model (None: there are none)."""
    layers = lora_layers(model)
    if not layers:
        return None
    return {
        "timestep_module": ([n for n, _ in timestep_modules(model)] if any(m.experts > 1 for m in layers.values())
                            else None),
        "layers": {n: {"rank": m.rank, "alpha": m.alpha, "experts": m.experts,
                       "gate_dim": m.lora_gate.in_features if m.lora_gate is not None else 0}
                   for n, m in layers.items()},
    }


def restore_adapters(model: nn.Module, layout: Mapping[str, Any]) -> None:
    """Put the adapters described by `adapter_layout` into the bare model (values to be loaded after)."""
    layers = dict(layout.get("layers", {}))
    source = None
    if any(int(v["experts"]) > 1 for v in layers.values()):
        source, width = attach_timestep_source(model)
        dims = {int(v["gate_dim"]) for v in layers.values() if int(v["experts"]) > 1}
        if dims != {width}:
            raise ValueError(f"TD-LoRA gates of width {sorted(dims)} do not fit the timestep embedding ({width})")
    for name, v in layers.items():
        try:
            base = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"adapter for {name!r}, which the model does not have") from None
        if type(base) is not nn.Linear:
            raise ValueError(f"adapter for {name!r}, which is not a linear layer")
        experts = int(v["experts"])
        _replace(model, name, LoRALinear.from_linear(base, int(v["rank"]), float(v["alpha"]), experts,
                                                     int(v["gate_dim"]), source if experts > 1 else None))


def spec_dict(spec: LoraSpec) -> dict[str, Any]:
    d = asdict(spec)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters' tensors only (A, B and TD-LoRA gates), in the model's names."""
    out = {}
    for name, layer in lora_layers(model).items():
        for pname, p in layer.named_parameters():
            if pname.startswith("lora_"):
                out[f"{name}.{pname}"] = p.detach()
    return out
