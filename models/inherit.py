"""Teacher → student weights by name, with a report (LiT Guideline 4; DyDiT fine-tuning).

Teacher and student are the same classes, so inheritance is a name-for-name copy with one
documented exception per family (`ModelFamily.inherit_exclude`): when the attention kind or the
head layout changes (softmax → linear), the self-attention projections are not copied and the new
DWC starts random. Routers do not exist in a static teacher; they keep their "all on" initialisation.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field

import torch
from torch import nn

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


def attention_exclude(teacher_cfg, student_cfg, patterns) -> list[str]:
    """`patterns` (a family's self-attention projections) when the attention kind or head count changes."""
    if teacher_cfg.attention != student_cfg.attention or teacher_cfg.num_heads != student_cfg.num_heads:
        return list(patterns)
    return []


def default_exclude(teacher_cfg, student_cfg) -> list[str]:
    """The student's family rule (LiT: the self-attention projections of a changed attention)."""
    from models.family import family_of

    return family_of(student_cfg).inherit_exclude(teacher_cfg, student_cfg)


def inherit_weights(
    student: nn.Module,
    teacher_state: dict[str, torch.Tensor],
    exclude: list[str] | None = None,
) -> InheritReport:
    """Copy `teacher_state` into `student` in place; raise on a shape mismatch of a copied key.

    `exclude` are fnmatch patterns of keys not to copy (default: nothing). Use `default_exclude`
    for the LiT rule; an ablation can pass e.g. `["blocks.*.attn.proj.*"]` to load Q, K and V.
    """
    exclude = exclude or []
    report = InheritReport()
    own = student.state_dict()  # shares storage with the parameters: copy_ writes through
    mismatched = []
    with torch.no_grad():
        for key, dst in own.items():
            if key not in teacher_state:
                report.initialised.append(key)
                continue
            if any(fnmatch.fnmatchcase(key, pat) for pat in exclude):
                report.skipped.append(key)
                continue
            src = teacher_state[key]
            if tuple(src.shape) != tuple(dst.shape):
                mismatched.append(f"{key}: teacher {tuple(src.shape)} vs student {tuple(dst.shape)}")
                continue
            dst.copy_(src.to(dst.dtype))
            report.inherited.append(key)
    if mismatched:
        raise ValueError(
            "cannot inherit teacher weights, shapes differ (student and teacher sizes must match; "
            "exclude these keys explicitly if intended):\n  " + "\n  ".join(mismatched)
        )
    report.unused = sorted(set(teacher_state) - set(own))
    return report
