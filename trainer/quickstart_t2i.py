"""The text-to-image quickstart's own stages: the captioned-digits shards, prompt-conditioned sampling
and scoring on seen and held-out sentence templates.

Data (`text_shards`), as a cluster run makes it: `launch.make_shards --source digits-captions` (the
training templates only; `prompts.jsonl` lists every evaluation prompt, held-out templates marked) →
`launch.tiny_encoders` (random T5, and CLIP for FLUX's pooled vector, with the byte tokenizer) →
`launch.precompute` (text-embedding shards, `null_text.safetensors`, `prompts.safetensors`). The text
encoders are random: the task tests the conditioning path, not language understanding.

Scoring (`eval_row`): every evaluation prompt `per_prompt` times from fixed noise; the digit classifier
must see the digit the prompt names. Accuracy on the seen and on the held-out templates, the Fréchet
distance of all samples in the classifier's feature space, the FLOPs the routers realised.
Each row samples one way (`Row.mode`): `cfg` classifier-free guidance with the null caption at
`cfg_scale`; `plain` the conditional model alone; `guidance` a guidance-distilled model told g.
"""
from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

MODES = ("cfg", "plain", "guidance")


@dataclass
class T2IEvalSettings:
    """How every T2I model is sampled, scored and timed (the same for all, so rows compare)."""

    per_prompt: int = 4  # samples per evaluation prompt: 170 prompts (140 seen, 30 held out) → 680
    method: str = "ddim"
    steps: int = 20
    cfg_scale: float = 4.5  # classifier-free guidance scale; a guidance-distilled model is told g = this
    seed: int = 0
    timing_batch: int = 110  # the first 110 prompts per timed run (the same for every row)
    timing_repeats: int = 3

    @classmethod
    def for_family(cls, family: str, quick: bool = False) -> "T2IEvalSettings":
        ev = cls(method="euler", cfg_scale=4.0) if family == "flux" else cls()
        if quick:
            ev.per_prompt, ev.steps, ev.timing_batch, ev.timing_repeats = 1, 4, 20, 1
        return ev


@dataclass(frozen=True)
class Row:
    """One line of the report: a trained stage sampled one way."""

    name: str
    stage: str
    mode: str  # cfg | plain | guidance


def _log(msg: str) -> None:
    from trainer.quickstart import _log as log

    log(msg)


# --- data -------------------------------------------------------------------------------------------

def text_shards(opts) -> Path:
    """`<out>/shards/<fmt>-text`: the captioned digits with T5 (+ CLIP) embeddings, made once."""
    from data.captions import TEMPLATES
    from data.manifest import MANIFEST
    from trainer.quickstart import QuickstartError, _read_json, _write_json

    bed, fmt = opts.suite.text, opts.data
    root = opts.out / "shards"
    raw, text, enc = root / f"{fmt}-captions", root / f"{fmt}-text", opts.out / "encoders"
    key = {**asdict(bed), "format": fmt, "templates": [[t.text, t.held_out] for t in TEMPLATES]}
    stamp_path = root / f"{fmt}-text.json"
    stamp = _read_json(stamp_path)
    if stamp is not None and stamp["key"] != key:
        raise QuickstartError(f"{text} was made with other text settings ({stamp['key']}, now {key}); use another "
                              f"--out, or delete {root} and {enc} to redo the data")
    if stamp is not None and (text / MANIFEST).exists():
        _log(f"shards: reusing {text}")
        return text
    t0 = time.perf_counter()
    for d in (raw, text, enc):
        if d.exists():
            shutil.rmtree(d)  # a partial write of ours (the stamp comes last)
    _run("launch.make_shards", ["--source", "digits-captions", "--captions-per-image", str(bed.captions_per_image),
                              "--format", fmt, "--out", str(raw), "--samples-per-shard", "2000", "--seed", str(bed.seed)])
    enc_args = ["--out", str(enc), "--seed", str(bed.seed), "--dim", str(bed.t5_dim), "--layers", str(bed.t5_layers),
                "--heads", str(bed.t5_heads), "--head-dim", str(bed.t5_head_dim), "--ff-dim", str(bed.t5_ff_dim)]
    enc_args += ["--clip-dim", str(bed.clip_dim)] if bed.clip_dim else ["--no-clip"]
    enc_args += ["--output-gain", str(bed.output_gain)] + (["--local-bias", str(bed.local_bias)] if bed.local_bias else [])
    _run("launch.tiny_encoders", enc_args)
    pre = ["--text-encoder", str(enc / "t5"), "--max-length", str(bed.max_length), "--in", str(raw), "--out", str(text),
           "--batch-size", "256", "--dtype", "fp32", "--device", "cpu"]
    if not bed.mask:
        pre.append("--no-text-mask")
    if bed.clip_dim:
        pre += ["--clip-encoder", str(enc / "clip")]
    _run("launch.precompute", pre)
    _write_json(stamp_path, {"key": key, "seconds": time.perf_counter() - t0})
    _log(f"shards: captioned digits ({bed.captions_per_image} training captions per image) → {fmt} text-embedding "
         f"shards {text} (random T5{' + CLIP' if bed.clip_dim else ''}) in {time.perf_counter() - t0:.1f}s")
    return text


def _run(module: str, argv: list[str]) -> None:
    """`python -m <module> argv` in its own process, as a user would run it (its memory is its own)."""
    import os
    import subprocess
    import sys

    from trainer.quickstart import QuickstartError

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])}
    proc = subprocess.run([sys.executable, "-m", module, *argv], env=env, capture_output=True, text=True)
    if proc.returncode:
        raise QuickstartError(f"python -m {module} {' '.join(argv)} failed (exit {proc.returncode}): "
                              f"{(proc.stdout + proc.stderr)[-2000:]}")


# --- prompts ----------------------------------------------------------------------------------------

@dataclass
class Prompts:
    cond: dict[str, torch.Tensor]  # text_emb, text_mask, text_pooled: one row per sample
    digits: torch.Tensor  # (N,) the digit each sample's prompt names
    held_out: torch.Tensor  # (N,) bool: from a held-out template
    template: torch.Tensor  # (N,) the template id of each sample's prompt
    rows: list[dict]

    def __len__(self) -> int:
        return len(self.digits)

    def head(self, n: int) -> "Prompts":
        """The first n samples, cycling through the prompts (timing batches)."""
        idx = torch.arange(n) % len(self)
        return Prompts({k: v[idx] for k, v in self.cond.items()}, self.digits[idx], self.held_out[idx], self.template[idx],
                       self.rows)


def prompt_set(shards: Path, per_prompt: int) -> Prompts:
    """Every evaluation prompt of the shards `per_prompt` times (prompt-major), as encoded by precompute."""
    from data import load_prompt_embeddings

    loaded = load_prompt_embeddings(str(shards))
    if loaded is None:
        raise FileNotFoundError(f"{shards} has no prompts.jsonl / prompts.safetensors: not the captioned-digits test bed")
    rows, tensors = loaded
    idx = torch.arange(len(rows)).repeat_interleave(per_prompt)
    cond = {k: (v.float() if v.dtype.is_floating_point else v)[idx] for k, v in tensors.items()}
    digits = torch.tensor([int(r["digit"]) for r in rows])[idx]
    held = torch.tensor([bool(r["held_out"]) for r in rows])[idx]
    template = torch.tensor([int(r["template"]) for r in rows])[idx]
    return Prompts(cond, digits, held, template, rows)


def model_condition(model, prompts: Prompts, mode: str, g: float) -> dict[str, torch.Tensor]:
    """The model's own condition of the prompts (its batch keys), plus g for a guidance-distilled one."""
    cond = model.condition(prompts.cond)
    if mode == "guidance":
        cond = {**cond, "guidance": torch.full((len(prompts),), float(g))}
    return cond


def generate(model, objective, noise: torch.Tensor, cond: dict, mode: str, ev: T2IEvalSettings,
             on_aux: Callable[[dict], None] | None = None, steps: int | None = None) -> torch.Tensor:
    from trainer.quickstart import sample_model

    cfg_scale = ev.cfg_scale if mode == "cfg" else 1.0
    return sample_model(model, objective, noise, cond, cfg_scale, steps or ev.steps, ev.method, on_aux)


# --- scoring ----------------------------------------------------------------------------------------

def eval_row(row: Row, weights: Path, opts, classifier, reference, prompts: Prompts) -> dict:
    from models import family_of, load_pretrained
    from models.convert import weights_digest
    from trainer.build import build_objective
    from trainer.digits_eval import accuracy, score
    from trainer.export import read_run_config
    from trainer.quickstart import _read_json, _write_json, flops_of, save_grid

    ev = opts.eval
    path = opts.out / "eval" / f"{row.name}.json"
    png = opts.out / f"samples_{row.name}.png"
    key = {"weights_digest": weights_digest(weights), "settings": asdict(ev), "mode": row.mode}
    saved = _read_json(path)
    if saved is not None and saved.get("key") == key and png.exists():
        _log(f"{row.name}: reusing samples and scores ({path})")
        return {**saved, "reused": True}

    model = load_pretrained(weights)
    objective = build_objective(read_run_config(opts.out / row.stage))
    g = torch.Generator().manual_seed(ev.seed)
    noise = torch.randn(len(prompts), *family_of(model).latent_shape(model.config), generator=g)
    records: list[dict] = []
    t0 = time.perf_counter()
    cond = model_condition(model, prompts, row.mode, ev.cfg_scale)
    images = generate(model, objective, noise, cond, row.mode, ev, on_aux=records.append if model.config.dynamic else None)
    sample_s = time.perf_counter() - t0
    scores = score(classifier, images, prompts.digits, reference)
    held = prompts.held_out
    scores["accuracy_seen"] = accuracy(classifier, images[~held], prompts.digits[~held])
    scores["accuracy_held_out"] = accuracy(classifier, images[held], prompts.digits[held])
    scores["accuracy_by_template"] = {int(t): accuracy(classifier, images[prompts.template == t], prompts.digits[prompts.template == t])
                                      for t in prompts.template.unique()}
    save_grid(_grid_order(images, prompts), png)
    rec = {"key": key, "model": row.name, "stage": row.stage, "mode": row.mode,
           "params_m": sum(p.numel() for p in model.parameters()) / 1e6, **scores, **flops_of(model, records),
           "sample_s": sample_s, "grid": str(png)}
    _write_json(path, rec)
    extra = f", realised FLOPs ratio {rec['flops_ratio']:.3f}" if "flops_ratio" in rec else ""
    _log(f"{row.name}: accuracy seen {rec['accuracy_seen']:.3f} / held-out {rec['accuracy_held_out']:.3f}, FD "
         f"{rec['fd']:.2f} on {rec['n']} samples{extra} ({sample_s:.0f}s)")
    return {**rec, "reused": False}


def _grid_order(images: torch.Tensor, prompts: Prompts) -> torch.Tensor:
    """Rows of digits 0..9, ten samples each: held-out-template samples first (what generalises)."""
    out = []
    for d in range(10):
        idx = [i for i in torch.argsort((~prompts.held_out).int(), stable=True).tolist() if int(prompts.digits[i]) == d]
        pick = (idx * 10)[:10]
        out.append(images[pick])
    return torch.cat(out)


def evaluate_rows(rows: list[Row], opts, classifier, reference, prompts: Prompts) -> dict[str, dict]:
    """`eval_row` of every row, `opts.nproc` at a time (as `trainer.quickstart.evaluate_all`)."""
    from concurrent.futures import ThreadPoolExecutor

    from trainer.quickstart import weights_path

    def task(row: Row) -> dict:
        torch.set_num_threads(opts.threads)
        return eval_row(row, weights_path(opts, row.stage), opts, classifier, reference, prompts)

    with ThreadPoolExecutor(max_workers=max(1, opts.nproc)) as pool:
        futures = {r.name: pool.submit(task, r) for r in rows}
        return {n: f.result() for n, f in futures.items()}


def timing_inputs(model, prompts: Prompts, row: Row, ev: T2IEvalSettings):
    """(noise, cond, sample function) of one timed run of `row`."""
    from models import family_of

    batch = prompts.head(ev.timing_batch)
    g = torch.Generator().manual_seed(ev.seed + 1)
    noise = torch.randn(len(batch), *family_of(model).latent_shape(model.config), generator=g)
    return noise, model_condition(model, batch, row.mode, ev.cfg_scale)


# --- the pipeline -----------------------------------------------------------------------------------

def report_rows(opts, shards: Path) -> list[Row]:
    """The rows scored: every stage sampled its way; a guidance-distilled suite's base teacher (no guidance
    input) twice, plain and with classifier-free guidance at g (what its guidance distillation targets)."""
    from models import family_of
    from trainer.build import student_config
    from trainer.quickstart import stage_config

    rows = []
    for name in opts.models():
        cfg = student_config(stage_config(name, opts, shards))
        if family_of(cfg).conditioning(cfg).guidance:
            rows.append(Row(name, name, "guidance"))
        elif opts.suite.guided:
            rows += [Row(name, name, "plain"), Row(f"{name}-cfg", name, "cfg")]
        else:
            rows.append(Row(name, name, "cfg"))
    return rows


def run_t2i(opts) -> dict:
    """Data → teacher(s) → students → classifier → scores → timing → report, reusing what exists."""
    from trainer.digits_eval import real_floor, real_stats
    from trainer.quickstart import classifier_stage, timing_stage, train_all, weights_path
    from trainer.quickstart_t2i_report import build_report, peak_memory, write_report

    t0 = time.perf_counter()
    torch.set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    shards = text_shards(opts)
    stages = train_all(opts, shards)
    classifier, classifier_info = classifier_stage(opts)
    reference = real_stats(classifier)
    prompts = prompt_set(shards, opts.eval.per_prompt)
    rows = report_rows(opts, shards)
    evals = evaluate_rows(rows, opts, classifier, reference, prompts)
    timed = [r for r in rows if r.stage in opts.suite.stages]  # ablations are scored, not timed
    weights = {r.name: weights_path(opts, r.stage) for r in timed}
    timing = timing_stage(weights, opts, runs=lambda: timing_runs(timed, opts, prompts),
                          names=tuple(r.name for r in timed), reference=opts.suite.reference)
    floor = real_floor(classifier, len(prompts), reference, seed=opts.eval.seed)
    report = build_report(opts, rows, stages, evals, timing, classifier_info, floor, time.perf_counter() - t0,
                          peak_memory())
    write_report(report, opts.out)
    return report


def timing_runs(rows: list[Row], opts, prompts: Prompts) -> dict[str, Callable]:
    """{row: fn(steps) → samples}: each row's model on the same prompts and noise, sampled its way."""
    from models import load_pretrained
    from trainer.build import build_objective
    from trainer.export import read_run_config
    from trainer.quickstart import weights_path

    ev, fns = opts.eval, {}
    for row in rows:
        model = load_pretrained(weights_path(opts, row.stage))
        objective = build_objective(read_run_config(opts.out / row.stage))
        noise, cond = timing_inputs(model, prompts, row, ev)
        fns[row.name] = (lambda steps, m=model, o=objective, n=noise, c=cond, mode=row.mode:
                         generate(m, o, n, c, mode, ev, steps=steps))
    return fns
