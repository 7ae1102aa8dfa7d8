"""The text-to-image quickstart's report: one row per model and sampling mode, the bars, report.json/.md."""
from __future__ import annotations

import json
import resource
from dataclasses import asdict
from pathlib import Path

from data.captions import HELD_OUT_TEMPLATES, TRAIN_TEMPLATES

WALL_BAR_S = 15 * 60  # each family's full run from a fresh clone (install excluded)
MEMORY_BAR_GB = 4.0
TEACHER_BAR = 0.80  # held-out-template prompt accuracy of every teacher
STUDENT_BAR = 0.9  # × its teacher's accuracy (seen and held-out templates)

ENCODERS_NOTE = ("The text encoders are random (a tiny T5{clip} with random weights and ByT5's byte tokenizer): the "
                 "task tests the conditioning path — captions through launch.precompute, text-embedding shards, "
                 "cross-attention / joint attention{pooled} — not language understanding.")


def peak_memory() -> dict:
    """Peak resident memory (GiB) of this process and of the largest child it waited for (a training rank)."""
    self_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    child_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20
    return {"pipeline_gb": self_gb, "largest_child_gb": child_gb}


def _rank_peak(stage: dict) -> float:
    return float(stage.get("peak_gb") or 0.0)


def bars(opts, rows: dict[str, dict], stages: dict, memory: dict, wall_s: float | None) -> dict:
    s = opts.suite
    out = {}
    teachers = [r for r in rows if r in (s.reference, "teacher-cfg") or (r == "teacher" and not s.guided)]
    for t in teachers:
        out[f"{t}_held_out_accuracy_ge_{TEACHER_BAR:.2f}"] = rows[t]["accuracy_held_out"] >= TEACHER_BAR
    ref = rows[s.reference]
    for st in s.students:
        for split in ("seen", "held_out"):
            out[f"{st}_{split}_accuracy_ge_{STUDENT_BAR}x_{s.reference}"] = (
                rows[st][f"accuracy_{split}"] >= STUDENT_BAR * ref[f"accuracy_{split}"])
    out[f"peak_memory_le_{MEMORY_BAR_GB:.0f}GB"] = memory["total_gb"] <= MEMORY_BAR_GB
    if wall_s is not None:
        out[f"full_run_le_{WALL_BAR_S // 60}min"] = wall_s <= WALL_BAR_S
    return out


def build_report(opts, row_specs, stages: dict, evals: dict, timing: dict, classifier_info: dict, floor: float,
                 wall_s: float, memory: dict) -> dict:
    s = opts.suite
    ref = evals[s.reference]
    rows = []
    for spec in row_specs:
        e, st = evals[spec.name], stages[spec.stage]
        timed = spec.name in timing["median_s"]
        rows.append({
            "model": spec.name, "stage": spec.stage, "mode": spec.mode, "arch": st["model"], "params_m": e["params_m"],
            "train_steps": st["steps"], "train_s": st["train_s"], "accuracy": e["accuracy"],
            "accuracy_seen": e["accuracy_seen"], "accuracy_held_out": e["accuracy_held_out"],
            "held_out_vs_teacher": e["accuracy_held_out"] / max(ref["accuracy_held_out"], 1e-9), "fd": e["fd"],
            "gflops": e["gflops"], "gflops_static": e["gflops_static"], "gflops_vs_teacher": e["gflops"] / ref["gflops"],
            "flops_ratio": e.get("flops_ratio"), "flops_target": st.get("flops_target"),
            "sample_time_s": timing["median_s"][spec.name] if timed else None,
            "sample_time_vs_teacher": timing["relative"][spec.name] if timed else None,
            "teacher": _teacher_of(opts, spec.stage),
        })
    # while a stage trains: this process (waiting) + its ranks at their peak; otherwise this process alone
    training = [float(st.get("parent_gb") or memory["pipeline_gb"]) + st.get("nproc", opts.nproc) * _rank_peak(st)
                for st in stages.values()]
    rank_gb = max((_rank_peak(st) for st in stages.values()), default=0.0)
    memory = {**memory, "training_rank_gb": rank_gb, "ranks": opts.nproc, "training_gb": max(training, default=0.0),
              "total_gb": max([memory["pipeline_gb"], *training])}
    fresh = not any(st.get("reused") for st in stages.values()) and not opts.quick
    by_name = {r["model"]: r for r in rows}
    return {
        "family": s.family, "out": str(opts.out), "quick": opts.quick, "data": opts.data, "wall_s": wall_s,
        "fresh_run": fresh, "eval": asdict(opts.eval),
        "text": asdict(s.text), "classifier": classifier_info, "real_fd_floor": floor, "rows": rows,
        "reference": s.reference, "memory": memory,
        "timing": {k: timing[k] for k in ("batch", "steps", "method", "cfg_scale", "threads", "repeats", "median_s",
                                          "reference")},
        "stages": {n: {k: v for k, v in st.items() if k != "key"} for n, st in stages.items()},
        "ablations": {n: s.ablations[n].why for n in s.ablations if n in by_name},
        "bars": bars(opts, by_name, stages, memory, wall_s if fresh else None),
    }


def _teacher_of(opts, stage: str) -> str | None:
    from trainer.quickstart import teacher_stage

    return teacher_stage(stage, opts)


MODE_WORDS = {"cfg": "CFG {g}", "plain": "no guidance", "guidance": "g = {g} (input)"}


def table(report: dict) -> str:
    ev = report["eval"]
    g = ev["cfg_scale"]
    lines = [
        "| model | arch | sampling | params (M) | GFLOPs/fwd | vs teacher | FLOPs ratio (λ) | accuracy seen | "
        "accuracy held-out | held-out vs teacher | FD | sample time (s) | vs teacher |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        if r["model"] in report["ablations"]:
            continue
        lines.append(_row(r, g))
    c = report["classifier"]
    lines.append(f"| real digits | — | — | — | — | — | — | — | {c['held_out_accuracy']:.3f} (classifier, held-out digits) "
                 f"| — | {report['real_fd_floor']:.2f} (floor) | — | — |")
    out = "\n".join(lines)
    if report["ablations"]:
        out += "\n\nAblations (--ablations):\n\n" + "\n".join(lines[:2] + [_row(r, g) for r in report["rows"]
                                                                       if r["model"] in report["ablations"]])
        out += "\n\n" + "\n".join(f"- {n}: {why}" for n, why in report["ablations"].items())
    rows = {r["model"]: r for r in report["rows"]}
    notes = []
    if "teacher-cfg" in rows:
        t, c, gd = rows["teacher"], rows["teacher-cfg"], rows[report["reference"]]
        notes.append(f"Guidance (FLUX-dev's way): the base teacher unguided {t['accuracy_held_out']:.3f} held-out / "
                     f"{t['accuracy_seen']:.3f} seen; with classifier-free guidance {g} (two forwards a step) "
                     f"{c['accuracy_held_out']:.3f} / {c['accuracy_seen']:.3f}; guidance-distilled `{report['reference']}` "
                     f"told g = {g} (one forward) {gd['accuracy_held_out']:.3f} / {gd['accuracy_seen']:.3f}.")
    bed = report["text"]
    clip = f" + a tiny CLIPTextModel ({bed['clip_dim']}-d pooled vector)" if bed.get("clip_dim") else ""
    notes += [
        ENCODERS_NOTE.format(clip=clip, pooled=", the pooled vector in the modulation" if bed.get("clip_dim") else ""),
        f"Prompts: every (template, digit) prompt {ev['per_prompt']}× from fixed noise ({ev['method']}, {ev['steps']} "
        f"steps), EMA weights, dynamic students on their sliced path. Accuracy: the digit classifier agrees with the digit "
        f"the prompt names, on the {len(TRAIN_TEMPLATES)} training templates (seen) and on the {len(HELD_OUT_TEMPLATES)} held-out "
        f"templates (never in the shards). FD: "
        f"Fréchet distance of all samples to the 1,797 real digits in the classifier's 128-d feature space.",
        "GFLOPs: multiply-adds per forward per sample (text tokens included); realised for dynamic students. "
        "FLOPs ratio: the dynamic students' realised ratio while sampling (target λ in brackets).",
        f"Sample time: median of {len(next(iter(report['timing']['repeats'].values())))} timed runs of "
        f"{report['timing']['batch']} prompts after a warm-up, {report['timing']['threads']} CPU thread(s); relative to "
        f"`{report['timing']['reference']}`.",
    ]
    return out + "\n\n" + "\n".join(f"- {n}" for n in notes)


def _row(r: dict, g: float) -> str:
    lam = "—" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f} ({r['flops_target']})"
    timed = r["sample_time_s"] is not None
    return (f"| {r['model']} | {r['arch']} | {MODE_WORDS[r['mode']].format(g=g)} | {r['params_m']:.2f} | {r['gflops']:.4f} | "
            f"{r['gflops_vs_teacher']:.2f}x | {lam} | {r['accuracy_seen']:.3f} | {r['accuracy_held_out']:.3f} | "
            f"{r['held_out_vs_teacher']:.2f} | {r['fd']:.2f} | "
            + (f"{r['sample_time_s']:.2f} | {r['sample_time_vs_teacher']:.2f}x |" if timed else "— | — |"))


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    kind = "quick smoke run" if report["quick"] else "full run"
    md = [f"# Quickstart report: {report['family']} ({kind})", "", table(report), "", "## Bars", ""]
    md += [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in report["bars"].items()]
    m = report["memory"]
    md += ["", f"Peak memory (resident): {m['total_gb']:.2f} GiB — while training, this process and {m['ranks']} rank(s) "
               f"of at most {m['training_rank_gb']:.2f} GiB each, {m['training_gb']:.2f} GiB together; this process alone "
               f"(scoring, timing) peaked at {m['pipeline_gb']:.2f} GiB."]
    md += ["", "## Training", "", "| stage | teacher | steps | processes | train time (s) | this run |", "|---|---|---|---|---|---|"]
    teacher = {r["stage"]: r["teacher"] for r in report["rows"]}
    md += [f"| {n} | {teacher.get(n) or '—'} | {s['steps']} | {s.get('nproc', '—')} | {s['train_s']:.0f} | "
           f"{'reused' if s['reused'] else 'trained'} |" for n, s in report["stages"].items()]
    wall = f"This run took {report['wall_s']:.0f}s"
    md += ["", wall + (" (nothing reused)." if report["fresh_run"] else " (finished stages are reused on the next run).")]
    md += ["", "## Samples", "", "Rows: digits 0–9; held-out-template prompts first."]
    md += [f"![{r['model']}](samples_{r['model']}.png)" for r in report["rows"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
