"""Validation that knows the model family, before any process group starts.

`trainer/config.py` checks values one key at a time; this checks what only the family can tell:
that the objective fits the model's output, that the data yields what the model consumes, that the
timestep sampling exists for the objective, and that the teacher (read from its file's header
where the format allows, no tensor loaded) and the student can be distilled and inherited. Every
error names the key and the fix (exit code 2 in `launch.train`).
"""
from __future__ import annotations

import fnmatch
from typing import Any

import torch

from models import family_of, model_config
from models.family import OBJECTIVE_LAYOUTS
from models.inherit import split_pattern, whole_patterns
from trainer.config import ConfigError, RunConfig

SAMPLING = {"gaussian": ("uniform", "stratified"), "flow": ("uniform", "logit_normal")}
FLOW_ONLY = ("logit_mean", "logit_std", "shift", "dynamic_shift")


def validate_models(cfg: RunConfig) -> None:
    student = _student(cfg)
    family = family_of(student)
    _objective(cfg, student, family)
    _conditioning(cfg, student, family)
    teacher = None
    for source, key in ((cfg.teacher.path if cfg.teacher else None, "teacher.path"),
                        (cfg.student.init_path if cfg.student.init == "path" else None, "student.init_path")):
        if source is None:
            continue
        other = _read_config(source, key)
        if key == "teacher.path":
            teacher = other
            _same_family(student, other, key)
            try:
                family.check_pair(student, other)
            except ValueError as e:
                raise ConfigError(f"{e} (teacher {source})") from e
        if key == "student.init_path" or cfg.student.init == "inherit":
            _inheritable(cfg, student, other, key, source)
            _peft(cfg, student, other)
    _guidance(cfg, student, teacher)
    _features(cfg, student, teacher)


def _peft(cfg: RunConfig, student: Any, source_cfg: Any) -> None:
    """The adapters fit: inheritance and `peft.*` applied to meta-device models (no weights), so a pattern
    that selects nothing fails here, not after the process group and the teacher are up."""
    if cfg.peft.method == "none":
        return
    from models.inherit import plan_inheritance
    from trainer.peft import apply_peft

    family = family_of(student)
    with torch.device("meta"):
        model = family.build(student)
        source = family_of(source_cfg).build(source_cfg).state_dict()
    exclude = cfg.student.inherit_exclude
    plan = plan_inheritance(model, source, family.inherit_exclude(source_cfg, student) if exclude is None else exclude)
    apply_peft(cfg, model, plan)


def _guidance(cfg: RunConfig, student: Any, teacher: Any | None) -> None:
    """Who takes a guidance value, and whether the teacher's target is guided (see trainer/step.py)."""
    lo_hi = list(cfg.diffusion.guidance_range)
    if len(lo_hi) != 2 or not all(isinstance(v, (int, float)) for v in lo_hi) or not 0 < lo_hi[0] <= lo_hi[1]:
        raise ConfigError(f"config diffusion.guidance_range={lo_hi!r} is invalid: [min, max] with 0 < min <= max "
                          "(equal for a fixed value, e.g. [3.5, 3.5])")
    s_g = family_of(student).conditioning(student).guidance
    t_g = teacher is not None and family_of(teacher).conditioning(teacher).guidance
    d = cfg.distill
    if d.guidance_distill:
        if teacher is None:
            raise ConfigError("config distill.guidance_distill=true needs a teacher (teacher.path) to guide")
        if not s_g:
            raise ConfigError(f"config distill.guidance_distill=true but {cfg.student.model} has no guidance input: set "
                              "student.args.guidance_embed=true (the student learns the guided output at its g)")
        if t_g:
            raise ConfigError("config distill.guidance_distill=true but the teacher already takes a guidance value (it was "
                              "guidance-distilled): set distill.guidance_distill=false; student and teacher then get the same g")
    elif s_g and teacher is not None and not t_g:
        raise ConfigError(f"{cfg.student.model} has a guidance input but the teacher has none: set "
                          "distill.guidance_distill=true to teach it the teacher's guided output, or drop "
                          "student.args.guidance_embed")
    elif t_g and not s_g and lo_hi[0] != lo_hi[1]:
        raise ConfigError(f"the teacher takes a guidance value but {cfg.student.model} does not: the student can only "
                          "learn one fixed guidance, so set diffusion.guidance_range=[g, g]")
    if not (s_g or t_g) and lo_hi != [3.5, 3.5]:
        raise ConfigError(f"config diffusion.guidance_range={lo_hi!r} has no effect: neither student nor teacher takes a "
                          "guidance value; remove it")


def _features(cfg: RunConfig, student: Any, teacher: Any | None) -> None:
    """distill.features patterns must name modules that exist in both models (checked on meta models)."""
    patterns = list(cfg.distill.features)
    if not patterns:
        return
    if teacher is None:
        raise ConfigError("config distill.features needs a teacher (teacher.path)")
    from trainer.features import matching_modules

    with torch.device("meta"):
        s_model, t_model = family_of(student).build(student), family_of(teacher).build(teacher)
    names = matching_modules(s_model, patterns)
    if not names:
        some = [n for n, _ in s_model.named_modules() if n][:8]
        raise ConfigError(f"config distill.features={patterns} matches no module of {cfg.student.model} "
                          f"(module names look like {some}); use fnmatch patterns such as 'blocks.*.attn'")
    t_names = {n for n, _ in t_model.named_modules()}
    missing = [n for n in names if n not in t_names]
    if missing:
        raise ConfigError(f"config distill.features: the teacher has no module {missing[0]!r}; choose layers both have")


def _student(cfg: RunConfig) -> Any:
    try:
        return model_config(cfg.student.model, **dict(cfg.student.args))
    except ValueError as e:
        raise ConfigError(f"config student.model={cfg.student.model!r} / student.args: {e}") from e


def _objective(cfg: RunConfig, student: Any, family) -> None:
    d = cfg.diffusion
    fits = family.objectives(student)
    if d.objective not in fits:
        raise ConfigError(
            f"config diffusion.objective={d.objective!r} does not fit {cfg.student.model}: its output has "
            f"{student.out_channels} channels for {student.in_channels} input channels "
            f"({OBJECTIVE_LAYOUTS[fits[0]]}); use diffusion.objective={fits[0]!r}"
            + (", or student.args.learn_sigma=false for a flow model" if hasattr(student, "learn_sigma") else "")
        )
    allowed = SAMPLING[d.objective]
    if d.timestep_sampling not in allowed:
        raise ConfigError(f"config diffusion.timestep_sampling={d.timestep_sampling!r} is not one the {d.objective} "
                          f"objective has: use one of {allowed}")
    if d.objective != "flow":
        defaults = type(d)()
        changed = [k for k in FLOW_ONLY if getattr(d, k) != getattr(defaults, k)]
        if changed:
            raise ConfigError(f"config diffusion.{changed[0]}={getattr(d, changed[0])!r} has no effect with "
                              f"diffusion.objective={d.objective!r} (a rectified-flow option); remove it")
    if d.shift <= 0:
        raise ConfigError(f"config diffusion.shift={d.shift!r} is invalid: a positive factor (1 = no shift)")
    if d.dynamic_shift and d.shift != 1.0:
        raise ConfigError("config diffusion.shift and diffusion.dynamic_shift both set: give a fixed shift or FLUX's "
                          "resolution-dependent one, not both")
    if d.logit_std <= 0:
        raise ConfigError(f"config diffusion.logit_std={d.logit_std!r} is invalid: must be > 0")
    if d.max_seq_len <= d.base_seq_len:
        raise ConfigError(f"config diffusion.max_seq_len={d.max_seq_len} must exceed diffusion.base_seq_len={d.base_seq_len}")


def _conditioning(cfg: RunConfig, student: Any, family) -> None:
    spec = family.conditioning(student)
    if cfg.data.cond != spec.data_cond:
        raise ConfigError(
            f"config data.cond={cfg.data.cond!r}, but {cfg.student.model} ({family.name} family) consumes "
            f"{spec.kind} conditioning ({', '.join(spec.batch_keys)}): set data.cond={spec.data_cond!r}"
            + (" and point data.path at shards with precomputed text embeddings (launch.precompute)"
               if spec.data_cond == "text_emb" else "")
        )
    if "text_pooled" in spec.batch_keys and cfg.data.path and cfg.data.layout == "ditill":
        from data.manifest import read_manifest

        try:
            text = read_manifest(cfg.data.path).text or {}
        except (FileNotFoundError, ValueError):
            return  # the loader reports an unreadable shard directory with its own message
        if not text.get("pooled_dim"):
            raise ConfigError(
                f"config data.path={cfg.data.path!r}: {cfg.student.model} conditions on CLIP's pooled text vector "
                "(text_pooled), which these shards do not carry; precompute them with `python -m launch.precompute "
                "--clip-encoder CLIP_DIR` (FLUX: with --no-text-mask)")


def _read_config(source: str, key: str) -> Any:
    from models.convert import CheckpointError, read_config

    try:
        return read_config(source)
    except (CheckpointError, FileNotFoundError, ValueError) as e:
        raise ConfigError(f"config {key}={source!r}: {e}") from e


def _same_family(student: Any, other: Any, key: str) -> None:
    fs, fo = family_of(student), family_of(other)
    if fs is not fo:
        raise ConfigError(f"config {key}: the file holds a {fo.name}-family model but student.model is of the "
                          f"{fs.name} family; distil within one family")


def _inheritable(cfg: RunConfig, student: Any, source_cfg: Any, key: str, path: str) -> None:
    """Every key the student copies has the source's shape: compared on meta-device models (no weights)."""
    _same_family(student, source_cfg, key)
    family = family_of(student)
    with torch.device("meta"):
        dst = {k: tuple(v.shape) for k, v in family.build(student).state_dict().items()}
        src = {k: tuple(v.shape) for k, v in family_of(source_cfg).build(source_cfg).state_dict().items()}
    exclude = cfg.student.inherit_exclude
    if exclude is None:
        exclude = family.inherit_exclude(source_cfg, student)
    for pattern in exclude:  # a partial exclusion (name@rows=a:b) keeps the shape check of its key
        try:
            split_pattern(pattern)
        except ValueError as e:
            raise ConfigError(f"config student.inherit_exclude: {e}") from e
    exclude = whole_patterns(exclude)
    bad = [f"{k}: {key} {src[k]} vs student {dst[k]}" for k in sorted(set(dst) & set(src))
           if src[k] != dst[k] and not any(fnmatch.fnmatchcase(k, p) for p in exclude)]
    if bad:
        fields = sorted(k for k in ("hidden_size", "depth", "mlp_ratio", "patch_size", "in_channels", "num_heads")
                        if hasattr(student, k) and getattr(student, k) != getattr(source_cfg, k))
        hint = f" (differs: {', '.join(f'student.args.{f}={getattr(student, f)!r} vs {getattr(source_cfg, f)!r}' for f in fields)})" if fields else ""
        raise ConfigError(
            f"config student.init={cfg.student.init!r}: {len(bad)} weights of {path} cannot be copied into the student"
            f"{hint}; match the student's sizes to it, or exclude keys with student.inherit_exclude. First: "
            + "; ".join(bad[:3])
        )
