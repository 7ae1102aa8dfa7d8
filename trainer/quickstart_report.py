"""The quickstart's report: one row per model (quality, compute, speed), the bars, report.json/.md."""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

MODELS = ("teacher", "lit", "dydit", "dylit")
STUDENTS = MODELS[1:]


def bars(evals: dict[str, dict], stages: dict[str, dict] | None = None) -> dict:
    """The issue's bars: teacher sample accuracy ≥ 0.80, each student ≥ 0.9 × the teacher's; with
    --peft, a TD-LoRA DyDiT student ≥ 0.9 × its full fine-tune's accuracy with ≤ 10% of its trainable
    parameters (LiT and DyLiT train their new attention fully: their PEFT rows carry no bar)."""
    t = evals["teacher"]["accuracy"]
    out = {"teacher_accuracy_ge_0.80": t >= 0.80}
    for s in STUDENTS:
        out[f"{s}_accuracy_ge_0.9x_teacher"] = evals[s]["accuracy"] >= 0.9 * t
    if stages is not None and "dydit-tdlora" in evals and "trainable_params" in stages["dydit"]:
        full, peft = "dydit", "dydit-tdlora"
        out["dydit-tdlora_accuracy_ge_0.9x_full"] = evals[peft]["accuracy"] >= 0.9 * evals[full]["accuracy"]
        out["dydit-tdlora_trainable_le_0.1x_full"] = (
            stages[peft]["trainable_params"] <= 0.1 * stages[full]["trainable_params"])
    return out


def build_report(opts, stages: dict, evals: dict, timing: dict, classifier_info: dict, floor: float,
                 wall_s: float, relative: dict[str, dict[str, float]] | None = None) -> dict:
    relative = relative or {}
    teacher_gflops = evals["teacher"]["gflops"]
    rows = []
    for name in evals:
        e, s = evals[name], stages[name]
        full = name.partition("-")[0]  # a PEFT variant's full fine-tune
        timed = name in timing["median_s"]
        rows.append({
            "model": name, "arch": s["model"], "params_m": e["params_m"], "train_steps": s["steps"],
            "train_s": s["train_s"], "accuracy": e["accuracy"],
            "accuracy_vs_teacher": e["accuracy"] / max(evals["teacher"]["accuracy"], 1e-9), "fd": e["fd"],
            "gflops": e["gflops"], "gflops_static": e["gflops_static"], "gflops_vs_teacher": e["gflops"] / teacher_gflops,
            "flops_ratio": e.get("flops_ratio"), "flops_target": s.get("flops_target"),
            "sample_time_s": timing["median_s"][name] if timed else None,
            "sample_time_vs_teacher": timing["relative"][name] if timed else None,
            "peft": s.get("peft", "none"), "trainable_params": s.get("trainable_params"),
            "trainable_vs_full": (s["trainable_params"] / stages[full]["trainable_params"]
                                  if s.get("trainable_params") and stages[full].get("trainable_params") else None),
            "accuracy_vs_full": e["accuracy"] / max(evals[full]["accuracy"], 1e-9) if full != "teacher" else None,
            "teacher_mse": relative.get(name, {}).get("teacher_mse_images"),
            "teacher_psnr": relative.get(name, {}).get("teacher_psnr_images"),
        })
    return {
        "out": str(opts.out), "quick": opts.quick, "data": opts.data, "wall_s": wall_s,
        "eval": {**asdict(opts.eval), "note": "samples per model, class i % 10; EMA weights; guidance on the ε channels"},
        "classifier": classifier_info, "real_fd_floor": floor, "rows": rows,
        "timing": {k: timing[k] for k in ("batch", "steps", "method", "cfg_scale", "threads", "repeats", "median_s")},
        "stages": {n: {k: v for k, v in s.items() if k != "key"} for n, s in stages.items()},
        "bars": bars(evals, stages),
    }


def table(report: dict) -> str:
    ev = report["eval"]
    lines = [
        "| model | arch | params (M) | GFLOPs/fwd | vs teacher | FLOPs ratio (λ) | accuracy | vs teacher | FD | "
        "sample time (s) | vs teacher | MSE vs teacher's samples (PSNR) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in report["rows"]:
        lam = "—" if r["flops_ratio"] is None else f"{r['flops_ratio']:.3f} ({r['flops_target']})"
        timed = r["sample_time_s"] is not None
        lines.append(
            f"| {r['model']} | {r['arch']} | {r['params_m']:.2f} | {r['gflops']:.4f} | {r['gflops_vs_teacher']:.2f}x | "
            f"{lam} | {r['accuracy']:.3f} | {r['accuracy_vs_teacher']:.2f} | {r['fd']:.2f} | "
            + (f"{r['sample_time_s']:.2f} | {r['sample_time_vs_teacher']:.2f}x |" if timed else "— | — |")
            + (f" {r['teacher_mse']:.4f} ({r['teacher_psnr']:.1f} dB) |" if r.get("teacher_mse") is not None else " — |")
        )
    c = report["classifier"]
    lines.append(
        f"| real digits | — | — | — | — | — | {c['held_out_accuracy']:.3f} (held out) | — | "
        f"{report['real_fd_floor']:.2f} (floor) | — | — | — |"
    )
    t = report["timing"]
    notes = [
        f"Samples: {ev['samples']} per model ({ev['method']}, {ev['steps']} steps, guidance {ev['cfg_scale']}, seed "
        f"{ev['seed']}), EMA weights, dynamic students on their sliced path. Accuracy: the digit classifier's "
        f"agreement with the requested class. FD: Fréchet distance to all 1,797 real digits in the classifier's "
        f"128-d feature space; the floor is {ev['samples']} resampled real digits.",
        "GFLOPs: multiply-adds per forward per sample (DiT convention); static for static models, realised "
        "(units the routers switched on while sampling) for dynamic ones. FLOPs ratio: DyDiT's attention+MLP "
        "ratio as realised while sampling (target λ in brackets).",
        "MSE vs teacher's samples: each student's samples against the teacher's from the same noise and labels, "
        "pixels in [0, 1] (PSNR in brackets): how closely the student reproduces its teacher, not just the data.",
        f"Sample time: median of {len(next(iter(t['repeats'].values())))} timed runs of {t['batch']} samples "
        f"({t['method']} {t['steps']} steps, guidance batch x2) after a warm-up, {t['threads']} CPU thread(s).",
    ]
    return "\n".join(lines + peft_table(report)) + "\n\n" + "\n".join(f"- {n}" for n in notes)


def peft_table(report: dict) -> list[str]:
    """With --peft: each student's full fine-tune beside its adapters (trainable parameters, accuracy)."""
    rows = [r for r in report["rows"] if r["model"] != "teacher"]
    if not any(r.get("peft", "none") != "none" for r in rows):
        return []
    out = ["", "| student | fine-tuning | trainable params | vs full | accuracy | vs full | FD |", "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["model"].partition("-")[0], r["model"])):
        n = r.get("trainable_params")
        vs_t = "—" if r.get("trainable_vs_full") is None else f"{r['trainable_vs_full']:.3f}"
        vs_a = "—" if r.get("accuracy_vs_full") is None else f"{r['accuracy_vs_full']:.3f}"
        out.append(f"| {r['model'].partition('-')[0]} | {r.get('peft', 'none')} | {'—' if n is None else f'{n:,}'} | "
                   f"{vs_t} | {r['accuracy']:.3f} | {vs_a} | {r['fd']:.2f} |")
    return out


def write_report(report: dict, out: Path) -> None:
    (out / "report.json").write_text(json.dumps(report, indent=2, sort_keys=True) + "\n")
    md = [f"# Quickstart report ({'quick smoke run' if report['quick'] else 'full run'})", "", table(report), "",
          "## Bars", ""]
    md += [f"- {k}: {'PASS' if v else 'FAIL'}" for k, v in report["bars"].items()]
    md += ["", "## Training", "", "| stage | steps | processes | train time (s) | this run |", "|---|---|---|---|---|"]
    md += [f"| {n} | {s['steps']} | {s.get('nproc', '—')} | {s['train_s']:.0f} | {'reused' if s['reused'] else 'trained'} |"
           for n, s in report["stages"].items()]
    md += ["", f"This run took {report['wall_s']:.0f}s (finished stages are reused on the next run)."]
    md += ["", "## Samples", ""] + [f"![{r['model']}](samples_{r['model']}.png)" for r in report["rows"]]
    (out / "report.md").write_text("\n".join(md) + "\n")
