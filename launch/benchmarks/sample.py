"""`python -m launch.benchmark sample [--case cpu|xl-cpu|gpu|quick] [--quickstart DIR] [--json]`: honest speed.

Images per second of a teacher and its students through whole sampling loops (the code
`launch.sample` runs: same sampler, steps, guidance, batch and noise for every model), not single
forwards. A dynamic student's routers make a different choice at every timestep, as trained ones do,
so the width plan and the sliced weights change from step to step and their cost is paid inside the
timed loops: with random weights the routers are set to a DyDiT-like schedule (fewer heads and MLP
groups near the noise end, all of them near the data end; each layer its own curve; mean width about
half), fitted exactly at the sampler's timesteps (`fit_router_schedule_`), and the token routers keep
about 90 % of the tokens; with `--quickstart DIR` the trained quickstart models are timed instead.

Reported per model: GFLOPs per image over the whole loop (realised for dynamic models: what their
routers switched on, both halves of the guided batch counted), images/s, the realised speed-up over
the teacher and the ideal one (teacher FLOPs / model FLOPs), and how many distinct router patterns
the loop used. Warm-up first (a full loop, so the width plans of every timestep are cached as in any
long sampling job — except `xl-cpu`, whose two-step warm-up leaves the plan building inside the timed
loop), then the models take turns for `repeats` loops and medians are reported.

Cases: `cpu` DiT-S/2-shaped models at 256² (teacher, LiT, DyDiT, DyLiT), batch 8, 20 DDIM steps;
`xl-cpu` DiT-XL/2 vs DyDiT-XL/2 at 256², batch 8, a 20-step DDPM loop (timesteps spread over the whole
schedule; a 250-step loop takes hours on a CPU); `gpu` (CUDA only, bf16) DiT-XL/2 vs DyDiT-XL/2 (λ ≈ 0.5)
vs LiT-XL/2 at 256² and 512², 250 DDPM steps, and PixArt-Σ vs LiT-PixArt-Σ at 1024² and 2048², 20 steps,
when that family is registered; `quick` tiny models for the tests.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass, field, replace
from typing import Any, Optional

import torch
from torch import nn

from launch.benchmarks.models import keep_tokens_hook, randomize_, time_interleaved
from models import build_model, family_of, model_config
from models.diffusion import build_objective
from models.inherit import default_exclude, inherit_weights
from trainer.sampling import Sampler, class_labels, sample_latents

TOKEN_KEEP = 0.9


@dataclass(frozen=True)
class Setting:
    """One comparison: the teacher (first) and its students at one resolution."""

    label: str
    models: tuple[str, ...]
    overrides: dict[str, Any] = field(default_factory=dict)
    batch: int = 8
    steps: int = 20
    method: str = "ddim"
    cfg_scale: float = 1.5
    repeats: int = 3
    warmup_steps: Optional[int] = None  # None: one full loop
    resolution: Optional[int] = None  # pixels (text families); None: the config's native size


@dataclass(frozen=True)
class Case:
    name: str
    settings: tuple[Setting, ...]
    device: str = "cpu"
    dtype: str = "fp32"


S4 = ("dit-s/2", "lit-s/2", "dydit-s/2", "dylit-s/2")
XL3 = ("dit-xl/2", "dydit-xl/2", "lit-xl/2")
PIXART = ("pixart-sigma-xl/2", "lit-pixart-sigma-xl/2")
CASES = {
    "quick": Case("quick", (Setting("tiny", S4, {"depth": 2, "hidden_size": 96, "input_size": 8}, batch=2, steps=4,
                                    repeats=1),)),
    "cpu": Case("cpu", (Setting("S/2 256²", S4, {"input_size": 32}),)),
    "xl-cpu": Case("xl-cpu", (Setting("XL/2 256²", ("dit-xl/2", "dydit-xl/2"), {"input_size": 32}, method="ddpm",
                                      repeats=1, warmup_steps=2),)),
    "gpu": Case("gpu", (
        Setting("XL/2 256²", XL3, {"input_size": 32}, batch=32, steps=250, method="ddpm", repeats=3),
        Setting("XL/2 512²", XL3, {"input_size": 64}, batch=8, steps=250, method="ddpm", repeats=3),
        Setting("PixArt-Σ 1024²", PIXART, batch=4, steps=20, cfg_scale=4.5, resolution=1024),
        Setting("PixArt-Σ 2048²", PIXART, batch=1, steps=20, cfg_scale=4.5, resolution=2048),
    ), device="cuda", dtype="bf16"),
}


# --- a realistic router schedule -------------------------------------------------------------------

def width_fraction(t: float, layer: int, depth: int, total: float = 1000.0) -> float:
    """DyDiT-like active fraction at model timestep t: all units near the data end (t → 0), about 0.3 at
    the noise end, each layer on its own curve (exponent 1.5 … 2.5 across depth); mean ≈ 0.53."""
    gamma = 1.5 + layer / max(1, depth - 1)
    return 0.3 + 0.7 * (1.0 - min(max(t / total, 0.0), 1.0)) ** gamma


@torch.no_grad()
def fit_router_schedule_(model: nn.Module, timesteps: torch.Tensor) -> float:
    """Set every width router so that at each of `timesteps` the first round(U·width_fraction) units
    are on (unit 0 always): a least-squares fit of logits ±6 on [t_emb, 1], exact when the timesteps
    are no more than the embedding width. Returns the fraction of (timestep, unit) decisions that hit
    the target (1.0 = the schedule is followed exactly)."""
    emb = model.t_embedder(timesteps.float()).double()  # (S, D): width routers read t_emb alone
    design = torch.cat([emb, torch.ones(len(emb), 1, dtype=emb.dtype)], dim=1)
    hits, total = 0, 0
    depth = len(model.blocks)
    for layer, block in enumerate(model.blocks):
        for router in (block.attn_rate, block.mlp_rate):
            if router.router is None:
                continue
            units = router.num_units
            on = torch.tensor([max(1, round(units * width_fraction(float(t), layer, depth))) for t in timesteps])
            target = torch.where(torch.arange(1, units)[None] < on[:, None], 6.0, -6.0).double()
            solution = torch.linalg.lstsq(design, target, driver="gelsd").solution  # (D + 1, U - 1)
            router.router.weight.copy_(solution[:-1].T.to(router.router.weight.dtype))
            router.router.bias.copy_(solution[-1].to(router.router.bias.dtype))
            got = router(model.t_embedder(timesteps.float()))[:, 1:]
            hits += int((got == (target > 0).float()).sum())
            total += target.numel()
    return hits / max(total, 1)


# --- models ----------------------------------------------------------------------------------------

def build_setting(setting: Setting, device: torch.device, dtype: torch.dtype, objective, sampler: Sampler
                  ) -> tuple[dict[str, nn.Module], dict[str, float]]:
    """The teacher with random non-zero weights, and its students from it: a dynamic student shares the
    teacher's tensors (its routers set to the schedule), a LiT student inherits all but attention."""
    teacher_name = setting.models[0]
    torch.manual_seed(0)
    teacher = build_model(teacher_name, **setting.overrides)
    randomize_(teacher)
    models, fits = {teacher_name: teacher}, {}
    shape = family_of(teacher).latent_shape(teacher.config, setting.resolution)
    t_model = objective.sampling_timesteps(sampler.steps, sampler.method, seq_len=family_of(teacher).image_tokens(
        teacher.config, tuple(shape[-2:]))).float()
    for name in setting.models[1:]:
        torch.manual_seed(1)
        student = build_model(name, **setting.overrides)
        if student.config.attention == teacher.config.attention:  # same tensors, no second copy of the weights
            student.load_state_dict(teacher.state_dict(), strict=False, assign=True)
        else:
            inherit_weights(student, teacher.state_dict(), default_exclude(teacher.config, student.config))
        if getattr(student.config, "dynamic", False):
            fits[name] = fit_router_schedule_(student, t_model)
        models[name] = student
    for name, m in models.items():
        models[name] = m.to(device=device, dtype=dtype).eval()
    for name, m in models.items():
        if getattr(m.config, "dynamic", False) and getattr(m.config, "token_routing", False):
            x = torch.randn(setting.batch, *shape, device=device, dtype=dtype)
            t = torch.full((setting.batch,), float(t_model[len(t_model) // 2]), device=device)
            handles = [b.token_selection.register_forward_pre_hook(keep_tokens_hook(TOKEN_KEEP)) for b in m.blocks]
            with torch.no_grad():
                m(x, t, **condition(m, setting.batch, device))  # one calibration pass at a mid-schedule t
            for h in handles:
                h.remove()
    return models, fits


def quickstart_models(directory: str) -> tuple[dict[str, nn.Module], Any]:
    """The trained quickstart EMA exports (`<dir>/<model>/export/ema.safetensors`) and the teacher's objective."""
    from models import load_pretrained
    from trainer.build import build_objective as run_objective
    from trainer.export import read_run_config
    from trainer.quickstart_report import MODELS

    paths = {n: os.path.join(directory, n, "export", "ema.safetensors") for n in MODELS}
    missing = [p for p in paths.values() if not os.path.isfile(p)]
    if missing:
        raise FileNotFoundError(f"--quickstart {directory}: no {missing[0]}; run `python -m launch.quickstart --out {directory}` first")
    return {n: load_pretrained(p).eval() for n, p in paths.items()}, run_objective(read_run_config(os.path.join(directory, "teacher")))


def condition(model: nn.Module, n: int, device: torch.device) -> dict[str, torch.Tensor]:
    """The condition of n benchmark samples: classes in turn, or random text embeddings (masks all on) of
    the shapes the family's `example_batch` gives where it has one, else of the sizes its config names
    (T5-XXL's 300 × 4096 and CLIP's 768 when it names none)."""
    family = family_of(model)
    spec = family.conditioning(model.config)
    if spec.kind == "class":
        return model.condition({"y": class_labels(0, torch.arange(n), model.config.num_classes, balanced=True).to(device)})
    cfg = model.config
    try:
        shapes = {k: tuple(v.shape) for k, v in family.example_batch(cfg, n).items()}
    except (AttributeError, NotImplementedError):
        length = _first(cfg, ("text_len", "max_text_len", "model_max_length"), 300)
        shapes = {"text_emb": (n, length, _first(cfg, ("text_dim", "caption_channels", "context_in_dim"), 4096)),
                  "text_mask": (n, length), "text_pooled": (n, _first(cfg, ("pooled_dim", "vec_in_dim"), 768))}
    g = torch.Generator().manual_seed(0)
    batch = {k: (torch.ones(shape, dtype=torch.bool) if k == "text_mask" else torch.randn(shape, generator=g)).to(device)
             for k, shape in shapes.items()}
    return model.condition({k: batch[k] for k in spec.batch_keys})


def _first(cfg: Any, names: tuple[str, ...], default: int) -> int:
    return next((int(getattr(cfg, n)) for n in names if hasattr(cfg, n)), default)


# --- timing ----------------------------------------------------------------------------------------

class Patterns:
    """Distinct width patterns (head and channel masks of every layer) the loop's calls used."""

    def __init__(self) -> None:
        self.seen: set[tuple] = set()

    def __call__(self, step: int, t: torch.Tensor, aux) -> None:
        if "head_masks" in aux:
            self.seen.add(tuple(aux["head_masks"][0].flatten().tolist()) + tuple(aux["channel_masks"][0].flatten().tolist()))


def run_setting(setting: Setting, models: dict[str, nn.Module], objective, sampler: Sampler, device: torch.device,
                dtype: torch.dtype) -> list[dict[str, Any]]:
    teacher = next(iter(models.values()))
    shape = tuple(family_of(teacher).latent_shape(teacher.config, setting.resolution))
    idx = torch.arange(setting.batch)
    conds = {n: condition(m, setting.batch, device) for n, m in models.items()}
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else None
    flops: dict[str, float] = {}

    def loop(name: str, s: Sampler, observe=None):
        def fn() -> None:
            _, f = sample_latents(models[name], objective, s, idx, conds[name], shape=shape, device=device,
                                  autocast=autocast, observe=observe)
            flops[name] = float(f.mean())
        return fn

    warm = sampler if setting.warmup_steps is None else replace(sampler, steps=setting.warmup_steps)
    for name in models:  # a full loop fills the width-plan caches, as the first chunk of any sampling job does
        loop(name, warm)()
    counters = {n: Patterns() for n in models}
    cpu: dict[str, list[float]] = {n: [] for n in models}
    times = time_interleaved({n: _synced(loop(n, sampler, counters[n]), device, n, cpu[n]) for n in models},
                             setting.repeats, warmup=0)
    rows = []
    first = next(iter(models))
    base, base_cpu = statistics.median(times[first]), statistics.median(cpu[first])
    for name, m in models.items():
        sec, sec_cpu = statistics.median(times[name]), statistics.median(cpu[name])
        ideal = flops[first] / flops[name]
        rows.append({
            "setting": setting.label, "model": name, "kind": family_of(m).student_kind(m.config), "batch": setting.batch,
            "steps": sampler.steps, "method": sampler.method, "cfg_scale": sampler.cfg_scale,
            "latent_shape": list(shape), "gflops_per_image": flops[name] / 1e9,
            "flops_ratio": flops[name] / flops[first], "seconds_per_loop": sec, "all_seconds": times[name],
            "cpu_seconds_per_loop": sec_cpu, "all_cpu_seconds": cpu[name],
            "images_per_s": setting.batch / sec, "speedup": base / sec, "ideal_speedup": ideal,
            "realised_over_ideal": (base / sec) / ideal, "speedup_cpu_time": base_cpu / sec_cpu,
            "router_patterns": len(counters[name].seen) if getattr(m.config, "dynamic", False) else None,
        })
    return rows


def _registered(name: str) -> bool:
    """Whether a registry name resolves (a family outside `models/` is imported by its `module:` prefix)."""
    try:
        model_config(name)
    except (ValueError, ImportError):
        return False
    return True


def _synced(fn, device: torch.device, name: str, cpu: list[float]):
    """`fn` with the device drained before and after (CUDA is asynchronous), its process CPU time appended
    to `cpu` (with one thread, a measure of the work that other jobs on a shared machine do not inflate),
    and a line on stderr."""
    import time

    def run() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0, c0 = time.perf_counter(), time.process_time()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        cpu.append(time.process_time() - c0)
        print(f"[benchmark sample] {name}: one loop in {time.perf_counter() - t0:.2f}s ({cpu[-1]:.2f}s CPU)",
              file=sys.stderr, flush=True)

    return run


def run_case(case: Case, quickstart: Optional[str] = None) -> dict[str, Any]:
    device = torch.device(case.device)
    dtype = torch.bfloat16 if case.dtype == "bf16" else torch.float32
    load_before = os.getloadavg()
    rows, skipped, fits = [], {}, {}
    if quickstart:
        models, objective = quickstart_models(quickstart)
        setting = Setting("quickstart", tuple(models), batch=100, steps=25, method="ddim", cfg_scale=1.5, repeats=3)
        sampler = Sampler(method=setting.method, steps=setting.steps, cfg_scale=setting.cfg_scale)
        rows += run_setting(setting, models, objective, sampler, device, dtype)
    else:
        objective = build_objective("gaussian")
        for setting in case.settings:
            missing = [n for n in setting.models if not _registered(n)]
            if missing:
                skipped[setting.label] = f"{', '.join(missing)} not registered on this branch (its family is not installed)"
                continue
            teacher_cfg = model_config(setting.models[0], **setting.overrides)
            # learned σ: DDPM/DDIM; a C-channel output: a flow model (FLUX, the test families), Euler
            obj = objective if family_of(teacher_cfg).objectives(teacher_cfg) == ("gaussian",) else build_objective("flow")
            method = setting.method if obj.kind == "gaussian" else "euler"
            sampler = Sampler(method=method, steps=setting.steps, cfg_scale=setting.cfg_scale)
            try:
                models, fit = build_setting(setting, device, dtype, obj, sampler)
                fits.update({f"{setting.label} {k}": v for k, v in fit.items()})
                rows += run_setting(setting, models, obj, sampler, device, dtype)
            except torch.cuda.OutOfMemoryError as e:
                skipped[setting.label] = f"out of memory at batch {setting.batch}: {str(e).splitlines()[0]}"
            except ValueError as e:  # e.g. a family that cannot take this resolution
                skipped[setting.label] = str(e)
            models = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
    return {"suite": "sample", "case": case.name if not quickstart else f"quickstart {quickstart}", "device": str(device),
            "dtype": case.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(), "cpus": os.cpu_count(),
            "load_before": list(load_before), "load_after": list(os.getloadavg()), "rows": rows, "skipped": skipped,
            "schedule_fit": fits, "token_keep": TOKEN_KEEP}


def format_report(res: dict[str, Any]) -> str:
    lines = [f"sample benchmark ({res['case']}): {res['device']} {res['dtype']}, torch {res['torch']}, {res['threads']} "
             f"threads on {res['cpus']} CPUs, load average before/after {res['load_before'][0]:.2f}/{res['load_after'][0]:.2f}", ""]
    header = (f"{'model':<24}{'GFLOPs/img':>12}{'FLOPs':>7}{'img/s':>9}{'s/loop':>9}{'speed-up':>10}{'ideal':>8}"
              f"{'real/ideal':>11}{'CPU-time':>10}{'patterns':>9}")
    setting = None
    for r in res["rows"]:
        if r["setting"] != setting:
            setting = r["setting"]
            lines += ["", f"{setting}: batch {r['batch']}, {r['method']} {r['steps']} steps, guidance {r['cfg_scale']}, "
                      f"latent {tuple(r['latent_shape'])}", header]
        pat = "—" if r["router_patterns"] is None else str(r["router_patterns"])
        lines.append(f"{r['model']:<24}{r['gflops_per_image']:>12.4g}{r['flops_ratio']:>7.3f}{r['images_per_s']:>9.3f}"
                     f"{r['seconds_per_loop']:>9.2f}{r['speedup']:>9.2f}x{r['ideal_speedup']:>7.2f}x{r['realised_over_ideal']:>11.2f}"
                     f"{r['speedup_cpu_time']:>9.2f}x{pat:>9}")
    for label, why in res["skipped"].items():
        lines.append(f"skipped {label}: {why}")
    if res["schedule_fit"]:
        lines += ["", "router schedule fit (fraction of per-timestep unit decisions on target): "
                  + ", ".join(f"{k} {v:.3f}" for k, v in res["schedule_fit"].items())]
    lines += ["", "GFLOPs/img: multiply-adds of the whole loop per image (guided batch counted; realised for dynamic",
              "models). FLOPs: ratio to the teacher. ideal = 1 / FLOPs ratio; real/ideal = measured speed-up / ideal.",
              "CPU-time: the speed-up in process CPU time (with --threads 1 a measure of the work done that other",
              "jobs on a shared machine do not inflate; wall time is what counts on a dedicated one).",
              "patterns: distinct width patterns (heads + channel groups of every layer) the dynamic loop used.",
              "Decoding (VAE) is not timed."]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m launch.benchmark sample", description=__doc__.splitlines()[0])
    p.add_argument("--case", default="cpu", choices=sorted(CASES))
    p.add_argument("--quickstart", help="time the trained quickstart models in this directory instead")
    p.add_argument("--repeats", type=int, help="timed loops per model (default: the case's)")
    p.add_argument("--steps", type=int, help="sampling steps (default: the case's)")
    p.add_argument("--batch", type=int, help="images per loop (default: the case's)")
    p.add_argument("--threads", type=int, help="intra-op threads (default: torch's default)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), help="override the case's dtype (the gpu case: bf16)")
    p.add_argument("--device", choices=("cpu", "cuda"), help="override the case's device")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    case = replace(CASES[a.case], **{k: v for k, v in (("dtype", a.dtype), ("device", a.device)) if v})
    if case.device == "cuda" and not torch.cuda.is_available():
        print(f"launch.benchmark sample: error: --case {a.case} on cuda needs CUDA (none here); the CPU cases are cpu and xl-cpu",
              file=sys.stderr)
        return 2
    if a.threads:
        torch.set_num_threads(a.threads)
    changes = {k: v for k, v in (("repeats", a.repeats), ("steps", a.steps), ("batch", a.batch)) if v}
    if any(v < 1 for v in changes.values()):
        p.error("--repeats, --steps and --batch must be >= 1")
    case = replace(case, settings=tuple(replace(s, **changes) for s in case.settings))
    res = run_case(case, a.quickstart)
    print(json.dumps(res, indent=2, default=str) if a.json else format_report(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
