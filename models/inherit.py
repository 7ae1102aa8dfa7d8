"""Teacher → student weights by name, with a report (LiT Guideline 4; DyDiT fine-tuning).

Teacher and student are the same classes, so inheritance is a name-for-name copy with one
documented exception per family (`ModelFamily.inherit_exclude`): when the attention kind or the
head layout changes (softmax → linear), the self-attention projections are not copied and the new
DWC starts random. Routers do not exist in a static teacher; they keep their "all on" initialisation.

`plan_inheritance` decides and checks what is copied from names and shapes alone (the source may be
lazy: `models.lazy`); the engine then fills the planned keys into the student once it is placed,
each rank only the rows its shard holds (`models.sharded_load.fill`). `inherit_weights` does both at
once on a whole model.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Any, Mapping

from torch import nn

from models.sharded_load import fill, state_tensors

ATTENTION_PATTERNS = ("blocks.*.attn.qkv.*", "blocks.*.attn.proj.*")  # the DiT family's


@dataclass
class InheritReport:
    inherited: list[str] = field(default_factory=list)
    initialised: list[str] = field(default_factory=list)  # student keys with no teacher counterpart
    skipped: list[str] = field(default_factory=list)  # keys present in both, excluded by policy
    unused: list[str] = field(default_factory=list)  # teacher keys the student does not have

    def summary(self) -> str:
        return (
            f"inherited {len(self.inherited)}, newly initialised {len(self.initialised)}, "
            f"skipped by policy {len(self.skipped)}, unused teacher keys {len(self.unused)}"
        )


@dataclass
class InheritPlan(InheritReport):
    """What a student copies from `source` (`inherited`: the keys to fill), checked but not yet copied."""

    source: Mapping[str, Any] = field(default_factory=dict, repr=False)

    def apply(self, student: nn.Module) -> None:
        """Copy the planned keys into `student` (whole, or the local rows of an FSDP2-sharded student)."""
        fill(student, self.source, self.inherited)


def attention_exclude(teacher_cfg, student_cfg, patterns) -> list[str]:
    """`patterns` (a family's self-attention projections) when the attention kind or head count changes."""
    if teacher_cfg.attention != student_cfg.attention or teacher_cfg.num_heads != student_cfg.num_heads:
        return list(patterns)
    return []


def default_exclude(teacher_cfg, student_cfg) -> list[str]:
    """The student's family rule (LiT: the self-attention projections of a changed attention)."""
    from models.family import family_of

    return family_of(student_cfg).inherit_exclude(teacher_cfg, student_cfg)


def plan_inheritance(
    student: nn.Module,
    source: Mapping[str, Any],
    exclude: list[str] | None = None,
) -> InheritPlan:
    """Which of the student's keys `source` (tensors or lazy tensors) provides; raise on a shape mismatch
    of a key to copy. `exclude` are fnmatch patterns of keys not to copy (default: nothing). Reads no
    values, so it works on a meta-device or sharded student."""
    exclude = exclude or []
    plan = InheritPlan(source=source)
    own = state_tensors(student)
    mismatched = []
    for key, dst in own.items():
        if key not in source:
            plan.initialised.append(key)
            continue
        if any(fnmatch.fnmatchcase(key, pat) for pat in exclude):
            plan.skipped.append(key)
            continue
        src = source[key]
        if tuple(src.shape) != tuple(dst.shape):
            mismatched.append(f"{key}: teacher {tuple(src.shape)} vs student {tuple(dst.shape)}")
            continue
        plan.inherited.append(key)
    if mismatched:
        raise ValueError(
            "cannot inherit teacher weights, shapes differ (student and teacher sizes must match; "
            "exclude these keys explicitly if intended):\n  " + "\n  ".join(mismatched)
        )
    plan.unused = sorted(set(source) - set(own))
    return plan


def inherit_weights(
    student: nn.Module,
    teacher_state: Mapping[str, Any],
    exclude: list[str] | None = None,
) -> InheritReport:
    """Copy `teacher_state` into `student` in place; raise on a shape mismatch of a copied key.

    `exclude` are fnmatch patterns of keys not to copy (default: nothing). Use `default_exclude`
    for the LiT rule; an ablation can pass e.g. `["blocks.*.attn.proj.*"]` to load Q, K and V.
    """
    plan = plan_inheritance(student, teacher_state, exclude)
    plan.apply(student)
    return InheritReport(plan.inherited, plan.initialised, plan.skipped, plan.unused)
