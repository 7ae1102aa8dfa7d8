"""`python -m launch.benchmark pixart-routing --data SHARDS --out DIR [--teacher PATH] [--quick]`: should a
DyDiT-PixArt-Σ student route its cross-attention heads? Both variants measured on the captioned-digits
test bed (issue 11 item 9).

The shards are the test bed as `launch.make_shards --source digits-captions` and `launch.precompute`
(tiny T5 with the ByT5 tokenizer) write it: digits (8×8 images, or latents) with T5 embeddings of
their captions, `null_text.safetensors` (T5("")) and the evaluation prompts `prompts.jsonl` +
`prompts.safetensors`, some of whose sentence templates were held out of training. Stages, each a run
of the real trainer under OUT:
1. a tiny PixArt-Σ teacher trained from scratch on the shards (or `--teacher`), initialised with the
   data's null caption (the trainer cannot fill the buffer itself: `student.init=path`);
2. two DyDiT students distilled from it at the same FLOPs target λ: cross-attention heads routed or
   not (`cross_attn_routing`), everything else equal;
3. every evaluation prompt sampled by the teacher and both students from the same noise (DDIM,
   classifier-free guidance with the null caption and the prompt's mask): the students' error
   relative to the teacher's samples, the digit classifier's accuracy against the prompted digit (8×8
   images only), and the FLOPs the students' routers realised while sampling — on seen and on
   held-out templates.
The lower teacher-relative error per realised FLOP on both splits decides the default
(`PixArtConfig.cross_attn_routing`); a teacher that does not yet follow its prompts decides nothing.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import yaml

from models import build_model, family_of, load_pretrained
from models.convert import save_safetensors
from models.diffusion import build_objective
from models.diffusion.samplers import sample

NULL_TEXT, PROMPTS_JSONL, PROMPT_EMBEDDINGS = "null_text.safetensors", "prompts.jsonl", "prompts.safetensors"
VARIANTS = {"heads_only": False, "cross_routed": True}


@dataclass(frozen=True)
class Settings:
    teacher_steps: int = 3000
    student_steps: int = 1500
    batch: int = 64
    flops_target: float = 0.6
    hidden: int = 128
    depth: int = 6
    heads: int = 4
    samples_per_prompt: int = 4
    sample_steps: int = 20
    cfg_scale: float = 4.5
    lr: float = 3e-4
    classifier_epochs: int = 30


QUICK = Settings(teacher_steps=4, student_steps=4, batch=8, hidden=32, depth=2, heads=2, samples_per_prompt=1,
                 sample_steps=2, classifier_epochs=1)


class TestBedError(ValueError):
    """The shard directory is not the captioned-digits test bed (or lacks what the measurement reads)."""


def read_test_bed(data: Path) -> dict[str, Any]:
    """Manifest facts, the null caption and the evaluation prompts of a precomputed test bed."""
    from safetensors.torch import load_file

    from data.manifest import read_manifest

    manifest = read_manifest(str(data))
    missing = [n for n in (NULL_TEXT, PROMPTS_JSONL, PROMPT_EMBEDDINGS) if not (data / n).is_file()]
    if missing or not manifest.text:
        raise TestBedError(f"{data}: not a precomputed captioned-digits test bed (missing {missing or ['manifest text entry']}); "
                           "write it with launch.make_shards --source digits-captions, then launch.precompute --text-encoder")
    rows = [json.loads(line) for line in (data / PROMPTS_JSONL).read_text().splitlines() if line.strip()]
    prompts = load_file(str(data / PROMPT_EMBEDDINGS))
    if len(prompts["text_emb"]) != len(rows):
        raise TestBedError(f"{data}: {PROMPT_EMBEDDINGS} holds {len(prompts['text_emb'])} prompts, {PROMPTS_JSONL} {len(rows)}")
    latent = "latent" in manifest.fields
    group = manifest.groups[0]
    shape = list(group.latent_shape) if latent else [manifest.channels or 1, 8, 8]
    return {"input": "latent" if latent else "image", "shape": shape, "text_len": int(manifest.text["max_length"]),
            "text_dim": int(manifest.text["dim"]), "null": load_file(str(data / NULL_TEXT)), "rows": rows,
            "prompts": {k: v for k, v in prompts.items() if k in ("text_emb", "text_mask")}}


def model_args(bed: dict[str, Any], s: Settings) -> dict[str, Any]:
    c, h, w = bed["shape"]
    return {"depth": s.depth, "hidden_size": s.hidden, "num_heads": s.heads, "in_channels": c, "input_size": h,
            "pe_interpolation": 1.0, "caption_channels": bed["text_dim"], "model_max_length": bed["text_len"]}


def write_run_config(path: Path, model: str, args: dict[str, Any], data: Path, bed: dict[str, Any], s: Settings,
                     steps: int, init: dict[str, Any], teacher: Path | None) -> Path:
    cfg = {
        "run_dir": str(path.parent / path.stem),
        "student": {"model": model, "args": args, **init},
        "teacher": {"path": str(teacher)} if teacher else None,
        "data": {"format": json.loads((data / "manifest.json").read_text())["format"], "path": str(data),
                 "input": bed["input"], "cond": "text_emb", "image_size": bed["shape"][1]},
        "diffusion": {"objective": "gaussian", "cfg_dropout": 0.1},
        "distill": {"lambda_noise": 1.0, "lambda_var": 0.05},
        "dynamic": {"flops_target": s.flops_target, "warmup_steps": max(1, steps // 5), "hold_steps": 0,
                    "router_lr_mult": 10.0},
        "optim": {"lr": s.lr},
        "ema": {"decay": 0.999},
        "train": {"steps": steps, "global_batch": s.batch, "log_every": max(1, steps // 20)},
        "checkpoint": {"every": max(1, steps // 2), "async_save": False},
    }
    path.write_text(yaml.safe_dump(cfg))
    return path


def train(config: Path, nproc: int) -> Path:
    """Run (or resume) `launch.train` on `config` in its own process(es); return the exported EMA weights."""
    import subprocess

    from trainer.config import load_config
    from trainer.export import export_run

    cfg = load_config(config, [], world_size=nproc)  # a bad config fails here, before any launch
    repo = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": repo}
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    code = subprocess.run([sys.executable, *launcher, "-m", "launch.train", str(config)], env=env,
                          stdout=subprocess.DEVNULL).returncode
    if code != 0:
        raise RuntimeError(f"training {config} failed (exit code {code}); rerun to resume it")
    return export_run(cfg.run_dir, Path(cfg.run_dir) / "export")["ema"]


def initial_teacher(path: Path, args: dict[str, Any], bed: dict[str, Any]) -> Path:
    """A freshly initialised teacher whose null caption is the data's T5("")."""
    torch.manual_seed(0)
    model = build_model("pixart-sigma-xl/2", **args)
    model.set_null_condition(bed["null"])
    save_safetensors(model.state_dict(), model.config, path)
    return path


@torch.no_grad()
def generate(model, noise: torch.Tensor, cond: dict[str, torch.Tensor], s: Settings, records: list | None = None) -> torch.Tensor:
    model.eval()

    def fn(x, t, **c):
        out, aux = model(x, t, **c, return_aux=True)
        if records is not None and aux:
            records.append(aux)
        return out

    x = sample(fn, build_objective("gaussian"), noise, cond, null_cond=model.null_condition(cond), cfg_scale=s.cfg_scale,
               steps=s.sample_steps, method="ddim")
    return x.float()


def evaluate(weights: dict[str, Path], bed: dict[str, Any], s: Settings) -> dict[str, Any]:
    """Teacher-relative error, prompt accuracy (8×8 digit images) and realised FLOPs, per split."""
    models = {k: load_pretrained(p) for k, p in weights.items()}
    rows, emb, mask = bed["rows"], bed["prompts"]["text_emb"].float(), bed["prompts"]["text_mask"].bool()
    n = s.samples_per_prompt
    index = torch.arange(len(rows)).repeat_interleave(n)
    cond = {"text_emb": emb[index], "text_mask": mask[index]}
    noise = torch.randn(len(index), *bed["shape"], generator=torch.Generator().manual_seed(0))
    records: dict[str, list] = {k: [] for k in models}
    out = {k: generate(m, noise, cond, s, records[k]) for k, m in models.items()}
    held = torch.tensor([bool(r.get("held_out")) for r in rows])[index]
    digits = torch.tensor([int(r.get("digit", -1)) for r in rows])[index]
    classifier = _classifier(s.classifier_epochs) if bed["input"] == "image" and bed["shape"] == [1, 8, 8] else None
    report: dict[str, Any] = {}
    ref = out["teacher"]
    for name, x in out.items():
        rec: dict[str, Any] = {}
        for split, sel in (("seen", ~held), ("held_out", held)):
            if not sel.any():
                continue
            r = {"samples": int(sel.sum())}
            if name != "teacher":
                r["teacher_rel_mse"] = float((x[sel] - ref[sel]).pow(2).mean() / ref[sel].var())
            if classifier is not None:
                pred = classifier(x[sel].clamp(-1, 1)).argmax(1)
                r["digit_accuracy"] = float((pred == digits[sel]).float().mean())
            rec[split] = r
        if records[name]:
            cfg, fam = models[name].config, family_of(models[name])
            hw = tuple(bed["shape"][1:])
            rec["flops_ratio"] = float(torch.cat([a["flops_ratio"] for a in records[name]]).mean())
            rec["gflops"] = float(torch.cat([fam.realised_flops(cfg, a, hw) for a in records[name]]).mean()) / 1e9
            rec["gflops_static"] = fam.flops(cfg, hw)["total"] / 1e9
            if "cross_masks" in records[name][0]:
                rec["cross_heads_on"] = float(torch.cat([a["cross_masks"] for a in records[name]]).float().mean())
        report[name] = rec
    return report


def _classifier(epochs: int):
    from trainer.digits_eval import train_classifier

    model, _ = train_classifier(epochs=epochs)
    return model.eval()


def measure(data: Path, out: Path, s: Settings, teacher: Path | None = None, nproc: int = 1) -> dict[str, Any]:
    bed = read_test_bed(data)
    out.mkdir(parents=True, exist_ok=True)
    args = model_args(bed, s)
    if teacher is None:
        init = {"init": "path", "init_path": str(initial_teacher(out / "teacher-init.safetensors", args, bed))}
        cfg = write_run_config(out / "teacher.yaml", "pixart-sigma-xl/2", args, data, bed, s, s.teacher_steps, init, None)
        teacher = train(cfg, nproc)
    weights = {"teacher": teacher}
    for name, cross in VARIANTS.items():
        student = {**args, "mlp_groups": s.heads, "cross_attn_routing": cross}
        cfg = write_run_config(out / f"{name}.yaml", "dydit-pixart-sigma-xl/2", student, data, bed, s, s.student_steps,
                               {"init": "inherit"}, teacher)
        weights[name] = train(cfg, nproc)
    report = {"suite": "pixart-routing", "data": str(data), "settings": s.__dict__, "weights": {k: str(v) for k, v in weights.items()},
              "results": evaluate(weights, bed, s)}
    report["choice"] = choose(report["results"])
    (out / "routing.json").write_text(json.dumps(report, indent=1))
    return report


MIN_TEACHER_ACCURACY = 0.5  # below it the teacher has not learnt the conditioning the question is about


def choose(results: dict[str, Any]) -> dict[str, Any]:
    """Per split, the variant with the lower teacher-relative error × realised FLOPs ratio (the quantity
    the FLOPs target trades against). A decision only when every split agrees and the teacher follows
    its prompts (digit accuracy ≥ MIN_TEACHER_ACCURACY where it is measured); else None and why."""
    splits = [s for s in ("seen", "held_out") if s in results["heads_only"]]
    score = {s: {k: results[k][s]["teacher_rel_mse"] * results[k]["flops_ratio"] for k in VARIANTS} for s in splits}
    best = {s: min(score[s], key=score[s].get) for s in splits}
    out: dict[str, Any] = {"error_x_flops": score, "best": best, "route_cross_attention": None}
    accuracy = results["teacher"].get("seen", {}).get("digit_accuracy")
    if accuracy is not None and accuracy < MIN_TEACHER_ACCURACY:
        out["why"] = (f"the teacher draws the prompted digit {accuracy:.0%} of the time: it has not learnt the "
                      "conditioning yet; train longer (--steps)")
    elif len(set(best.values())) > 1:
        out["why"] = "the splits disagree: inconclusive at this training length and sample count"
    else:
        out["route_cross_attention"] = VARIANTS[next(iter(best.values()))]
        out["why"] = "every split agrees"
    return out


def format_report(rep: dict[str, Any]) -> str:
    lines = [f"pixart-routing on {rep['data']} (λ = {rep['settings']['flops_target']}, teacher {rep['weights']['teacher']})", "",
             f"{'model':<14}{'split':<10}{'samples':>8}{'rel. MSE vs teacher':>22}{'digit acc.':>12}{'FLOPs ratio':>13}"
             f"{'GFLOPs':>10}{'cross heads on':>16}"]
    for name, rec in rep["results"].items():
        for split in ("seen", "held_out"):
            if split not in rec:
                continue
            r = rec[split]
            mse = f"{r['teacher_rel_mse']:.4f}" if "teacher_rel_mse" in r else "-"
            acc = f"{r['digit_accuracy']:.3f}" if "digit_accuracy" in r else "-"
            ratio = f"{rec['flops_ratio']:.3f}" if "flops_ratio" in rec else "1"
            gfl = f"{rec['gflops']:.4f}" if "gflops" in rec else "-"
            cross = f"{rec['cross_heads_on']:.3f}" if "cross_heads_on" in rec else "-"
            lines.append(f"{name:<14}{split:<10}{r['samples']:>8}{mse:>22}{acc:>12}{ratio:>13}{gfl:>10}{cross:>16}")
    c = rep["choice"]
    lines.append("")
    for split, score in c["error_x_flops"].items():
        lines.append(f"{split}: rel. MSE × FLOPs ratio " + ", ".join(f"{k} {v:.4f}" for k, v in score.items())
                     + f" -> {c['best'][split]}")
    lines.append(f"route cross-attention heads = {c['route_cross_attention']} ({c['why']})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark pixart-routing", description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="the precomputed captioned-digits shards")
    p.add_argument("--out", required=True, help="directory for the runs and routing.json (rerun to resume)")
    p.add_argument("--teacher", default=None, help="a trained PixArt teacher on these shards (skips stage 1)")
    p.add_argument("--quick", action="store_true", help="a few steps of tiny models: checks the pipeline, measures nothing")
    p.add_argument("--steps", type=int, default=None, help="student steps (teacher: twice as many)")
    p.add_argument("--flops-target", type=float, default=None, help="λ for both students (default 0.6)")
    p.add_argument("--nproc", type=int, default=1, help="training processes (DDP over CPU cores)")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    s = QUICK if a.quick else Settings()
    if a.steps:
        s = Settings(**{**s.__dict__, "student_steps": a.steps, "teacher_steps": 2 * a.steps})
    if a.flops_target:
        s = Settings(**{**s.__dict__, "flops_target": a.flops_target})
    try:
        rep = measure(Path(a.data), Path(a.out), s, Path(a.teacher) if a.teacher else None, a.nproc)
    except (TestBedError, FileNotFoundError) as e:
        print(f"pixart-routing: error: {e}", file=sys.stderr)
        return 2
    print(json.dumps(rep, indent=1) if a.json else format_report(rep))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
