"""The model-family protocol: all the trainer, engines, export, evaluation, `launch.info` and the
benchmarks ever see of a model.

A family (DiT, PixArt-Σ, FLUX, or one defined outside this package) is one `ModelFamily` object
plus the model class it builds. The trainer asks the family what a model consumes (`ConditionSpec`),
which objectives fit its output, how to read its weights, what a student inherits from a teacher
and what it costs; it asks the model instance for its blocks (the FSDP / checkpointing / compile
units) and to turn a batch into its condition. Nothing outside a family's own files names its
classes, so adding a family touches its model file, its converter, its configs and its tests.

Every model of a family follows one calling convention:

    out = model(x, t, **cond)                            # (B, C_out, H, W) from (B, C_in, H, W)
    out, aux = model(x, t, **cond, return_aux=True)      # aux: masks + "flops_ratio" of a dynamic student
    out = model(x, t, **cond, complete=True)             # a dynamic student with every unit on

where `t` is what `objective.model_timestep` gives and `cond` is what `model.condition(batch)`
returns (possibly after `drop_condition`), so one training step and one sampler serve every family.
"""
from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Protocol, runtime_checkable

import torch
from torch import nn

if TYPE_CHECKING:
    from models.weights_io import RawWeights

# what a family's output channels can hold; the objectives it can be trained with follow from them
OBJECTIVE_LAYOUTS = {"gaussian": "ε + learned-σ interpolation (2·C channels), or ε alone with a fixed variance",
                     "flow": "velocity (C channels)"}


@dataclass(frozen=True)
class ConditionSpec:
    """What a family's models consume, and where it comes from.

    kind: "class" (labels `y`), "text" (T5 embeddings and their mask) or "text_pooled" (also a
        pooled CLIP vector). `batch_keys`: the loader fields `condition(batch)` reads; `data_cond`:
        the `data.cond` that yields them. `guidance`: the model takes a guidance value `g` (FLUX-dev,
        guidance-distilled students), which the training step draws per sample.
    """

    kind: str
    batch_keys: tuple[str, ...]
    data_cond: str
    guidance: bool = False


CLASS_LABELS = ConditionSpec("class", ("y",), "class")


@runtime_checkable
class FamilyConfig(Protocol):
    """What every family's config dataclass provides (beyond its own fields)."""

    in_channels: int
    attention: str  # "softmax" (teacher) | "linear" (LiT student)
    dynamic: bool  # DyDiT-style routers
    kernels: str

    @property
    def out_channels(self) -> int: ...

    def validate(self) -> "FamilyConfig": ...

    def to_dict(self) -> dict[str, Any]: ...


@runtime_checkable
class FamilyModel(Protocol):
    """What the trainer calls on a model instance (besides `forward`, `train`, `state_dict`)."""

    config: Any

    def all_blocks(self) -> list[nn.Module]:
        """Transformer blocks of every stack, in execution order: the FSDP units, activation-
        checkpoint and compile targets."""
        ...

    def condition(self, batch: Mapping[str, Any]) -> dict[str, torch.Tensor]: ...

    def null_condition(self, cond: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]: ...

    def drop_condition(self, cond: Mapping[str, torch.Tensor], drop: torch.Tensor) -> dict[str, torch.Tensor]: ...

    def reset_routers(self) -> None: ...


@dataclass(frozen=True)
class Checkpoint:
    """A state dict in a family's own parameter names plus what is known about it."""

    state_dict: dict[str, torch.Tensor]
    config: Any
    format: str  # "official" | "safetensors" | "diffusers" | …
    source: str


class ModelFamily(ABC):
    """One family: its registry names, what it consumes, its weights formats and its accounting."""

    name: str  # "dit", "pixart", "flux" (and "module:name" for families outside this package)
    config_cls: type

    # -- registry ---------------------------------------------------------------------------------
    @abstractmethod
    def names(self) -> list[str]:
        """Registry names this family answers (teacher and students), e.g. `dit-xl/2`, `dydit-xl/2`."""

    @abstractmethod
    def config(self, name: str, **overrides: Any) -> Any | None:
        """The config of registry model `name` with overrides, or None when `name` is not this family's."""

    def config_from_dict(self, d: Mapping[str, Any]) -> Any:
        """A config from its `to_dict()` (checkpoint metadata), validated."""
        from dataclasses import fields

        known = {f.name for f in fields(self.config_cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown {self.name} config keys {unknown}; allowed: {sorted(known)}")
        return self.config_cls(**d).validate()

    @abstractmethod
    def build(self, cfg: Any) -> nn.Module:
        """The model (teacher or student) for `cfg`, randomly initialised as the family does."""

    def student_kind(self, cfg: Any) -> str:
        """"teacher" (static softmax), "lit", "dydit" or "dylit": which shared student parts are on."""
        return {(False, False): "teacher", (True, False): "lit", (False, True): "dydit", (True, True): "dylit"}[
            (cfg.attention == "linear", bool(cfg.dynamic))
        ]

    # -- what it consumes and produces ------------------------------------------------------------
    @abstractmethod
    def conditioning(self, cfg: Any) -> ConditionSpec: ...

    def objectives(self, cfg: Any) -> tuple[str, ...]:
        """Objectives whose output layout the model's output fits (see OBJECTIVE_LAYOUTS)."""
        if cfg.out_channels == 2 * cfg.in_channels:
            return ("gaussian",)  # learned σ: only a Gaussian process has a variance to learn
        return ("gaussian", "flow")  # C channels: ε with a fixed variance, or a velocity

    @abstractmethod
    def latent_shape(self, cfg: Any, resolution: int | tuple[int, int] | None = None) -> tuple[int, int, int]:
        """(C, H, W) of the model's input at `resolution` (pixels; None: the config's native size)."""

    @abstractmethod
    def image_tokens(self, cfg: Any, latent_hw: tuple[int, int]) -> int:
        """Image tokens of a latent of that size (resolution-dependent flow shifts read it)."""

    def eval_condition(self, model: nn.Module, n: int, batch: Mapping[str, Any] | None) -> dict[str, torch.Tensor]:
        """A fixed condition for `n` evaluation samples (grids, router maps): by default the first rows
        of a batch of the run's data (repeated to n); a class-conditional family shows every class."""
        if batch is None:
            raise ValueError(f"the {self.name} family needs a batch of the run's data to condition evaluation samples")
        keys = self.conditioning(model.config).batch_keys
        rows = {k: batch[k] for k in keys}
        have = len(next(iter(rows.values())))
        index = torch.arange(n) % have
        return model.condition({k: v[index] for k, v in rows.items()})

    def set_null_condition(self, model: nn.Module, null: Mapping[str, torch.Tensor]) -> None:
        """Give a text family's model the null caption of the run's text encoder (T5(""), + CLIP's
        pooled vector) that the data provides (`data.load_null_text`); class families have none."""
        if self.conditioning(model.config).kind != "class":
            model.set_null_condition(null)

    def example_batch(self, cfg: Any, n: int, text_len: int | None = None,
                      device: torch.device | str = "cpu") -> dict[str, torch.Tensor]:
        """A batch of the loader's condition fields for `n` samples, zero-filled, at the config's text
        length unless `text_len` is given (memory planning traces it on the meta device; benchmarks)."""
        if self.conditioning(cfg).kind == "class":
            return {"y": torch.zeros(n, dtype=torch.long, device=device)}
        raise NotImplementedError(f"the {self.name} family does not say what its batches hold (example_batch)")

    # -- weights ----------------------------------------------------------------------------------
    @abstractmethod
    def recognises(self, raw: "RawWeights") -> bool:
        """Whether a file without our metadata (official or diffusers format) is this family's."""

    @abstractmethod
    def from_raw(self, raw: "RawWeights", overrides: Mapping[str, Any]) -> Checkpoint:
        """Map a file read by `models.weights_io.read_any` onto our names and config, checking every
        key and shape (raise `CheckpointError` naming the file)."""

    def describe(self, cfg: Any) -> str:
        """One line naming the architecture (errors, `launch.convert`)."""
        return f"{type(cfg).__name__}({', '.join(f'{k}={v}' for k, v in cfg.to_dict().items())})"

    def inherit_exclude(self, teacher_cfg: Any, student_cfg: Any) -> list[str]:
        """Key patterns a student does not copy from its teacher (LiT: the self-attention projections)."""
        return []

    def diffusers_linear_names(self, cfg: Any) -> dict[str, list[tuple[str, Any]]]:
        """Our linear layers (module names) → the modules of the teacher's diffusers class that compute
        them, each with the output rows it takes (None: all; (start, stop); or several such ranges
        concatenated), e.g. a fused `qkv` → `to_q`, `to_k`, `to_v`.
        Plain-LoRA adapters export in diffusers' `load_lora_weights` layout through it (`models/lora`);
        empty when the family has no diffusers class (or has not mapped it yet)."""
        return {}

    @abstractmethod
    def check_pair(self, student_cfg: Any, teacher_cfg: Any) -> None:
        """Raise ValueError naming `student.args.<key>` when student and teacher cannot be distilled
        (they must read the same inputs and write the same outputs; inheritance needs equal widths)."""

    # -- accounting -------------------------------------------------------------------------------
    @abstractmethod
    def flops(self, cfg: Any, latent_hw: tuple[int, int] | None = None, text_len: int | None = None) -> dict[str, float]:
        """Static multiply-adds per sample, by part ("attention", "mlp", "adaLN", "routers", "embeddings",
        "final_layer"; "total" their sum)."""

    def fused_share(self, cfg: Any, latent_hw: tuple[int, int] | None = None, text_len: int | None = None,
                    aux: Mapping[str, torch.Tensor] | None = None) -> dict[str, Any]:
        """Of "attention" and "mlp", what layers that compute both in one matmul do (FLUX's single-block
        `linear1`/`linear2`), static or per sample for aux's masks: a per-module FLOPs counter sees those
        layers' sum only. Empty for a family without such layers."""
        return {}

    def realised_flops(self, cfg: Any, aux: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                       text_len: int | None = None) -> torch.Tensor:
        """Per-sample multiply-adds a dynamic student actually executed, from its forward's aux."""
        return self.realised_parts(cfg, aux, latent_hw, text_len)["total"]

    def realised_parts(self, cfg: Any, aux: Mapping[str, torch.Tensor], latent_hw: tuple[int, int],
                       text_len: int | None = None) -> dict[str, torch.Tensor]:
        """`realised_flops` by part: (B,) tensors under `flops`' keys (what each part of a dynamic
        forward executed for the masks in aux). A family with dynamic students implements this."""
        raise NotImplementedError(f"the {self.name} family does not count its dynamic students' FLOPs by part")

    block_prefixes: tuple[str, ...] = ("blocks.",)  # parameter-name prefixes of the block stacks
    report_resolutions: tuple[int, ...] = ()  # pixel resolutions `launch.info` also reports (any-size families)
    # the module whose output is the (B, D) timestep embedding that timestep-conditioned adapters read
    # (TD-LoRA's gates, `models/lora`); DyDiT's width routers read the same embedding. Several names, in
    # execution order, when the embedding is their outputs' sum (FLUX: time_in + guidance_in); a listed
    # module a model was built without (set to None) is left out
    timestep_module: str | tuple[str, ...] = "t_embedder"

    def param_group(self, name: str) -> str:
        """The report group of a parameter (`launch.info`): attention, mlp, adaLN, routers, embeddings,
        final_layer. Inside a block by substring (routers first: they live inside blocks)."""
        if any(k in name for k in ("attn_rate", "mlp_rate", "token_selection", "router")):
            return "routers"
        if name.startswith(self.block_prefixes):
            if "attn" in name:
                return "attention"
            if "mlp" in name:
                return "mlp"
            if any(k in name for k in ("adaLN", "modulation", "scale_shift_table")):
                return "adaLN"
        if name.startswith("final_layer"):
            return "final_layer"
        return "embeddings"

    def param_split(self, cfg: Any, name: str, shape: tuple[int, ...]) -> dict[str, int]:
        """Parameter counts of one tensor by report group: all in `param_group(name)`, unless a family
        fuses groups in one tensor (FLUX's single blocks) and splits it here."""
        numel = 1
        for s in shape:
            numel *= int(s)
        return {self.param_group(name): numel}


# --- the registry of families ----------------------------------------------------------------------
_FAMILIES: dict[str, ModelFamily] = {}


def register_family(family: ModelFamily) -> ModelFamily:
    """Make a family's names resolvable (a family outside this package calls this when imported)."""
    _FAMILIES[family.name] = family
    return family


def _builtin() -> None:
    if "dit" not in _FAMILIES:
        importlib.import_module("models.dit_family")
    for module in ("models.pixart_family", "models.flux_family"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as e:
            if e.name != module:
                raise


def families() -> dict[str, ModelFamily]:
    _builtin()
    return dict(_FAMILIES)


def get_family(name: str) -> ModelFamily:
    """A family by name; `package.module:name` imports the module first (families outside `models/`)."""
    _builtin()
    if name not in _FAMILIES and ":" in name:
        importlib.import_module(name.split(":", 1)[0])
    if name not in _FAMILIES:
        raise ValueError(f"unknown model family {name!r}; known: {sorted(_FAMILIES)} (an outside family is "
                         "named 'package.module:family' and registers itself with models.family.register_family)")
    return _FAMILIES[name]


def family_of(cfg_or_model: Any) -> ModelFamily:
    """The family of a config or a model (configs carry their family's name as `family`)."""
    cfg = getattr(cfg_or_model, "config", cfg_or_model)
    name = getattr(cfg, "family", None)
    if name is None:
        raise TypeError(f"{type(cfg).__name__} is not a model-family config (it has no `family` attribute)")
    return get_family(name)


def resolve_name(name: str) -> tuple[ModelFamily, str]:
    """(family, registry name) for `name` or `package.module:name` (an outside family's model)."""
    _builtin()
    if ":" in name:
        module, _, short = name.rpartition(":")
        importlib.import_module(module)
        for fam in _FAMILIES.values():
            if fam.name.startswith(module + ":") and fam.config(short) is not None:
                return fam, short
        raise ValueError(f"no family registered by {module!r} knows the model {short!r}")
    for fam in _FAMILIES.values():
        if fam.config(name) is not None:
            return fam, name
    known = [n for f in _FAMILIES.values() for n in f.names()]
    raise ValueError(f"unknown model {name!r}; known: {', '.join(known)}")
