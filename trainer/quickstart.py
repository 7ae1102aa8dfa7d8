"""The quickstart: a teacher and three distilled students on the bundled digits, scored and timed.

Stages, each reused when its outputs exist (so running again into the same directory is cheap, and
an interrupted training stage resumes from its last checkpoint):

1. `shards`     (only with `data != digits`) the digits written as webdataset / MDS shards
2. `teacher`    a small DiT trained from scratch (`configs/quickstart/teacher.yaml`), EMA exported
3. `lit`, `dydit`, `dylit`  students distilled from the teacher's EMA (`configs/quickstart/<name>.yaml`);
                with `--peft lora,tdlora` also `<student>-lora`, `<student>-tdlora`: the same recipes with
                adapters on the frozen inherited base (`PEFT_OVERRIDES`), compared with the full fine-tunes
4. `classifier` a CNN on the real digits (`trainer.digits_eval`)
5. `eval/<m>`   fixed-seed class-conditional samples of each model: accuracy, Fréchet distance, the
                realised FLOPs of what actually ran, a PNG grid; each student's error relative to the
                teacher's samples from the same noise and labels (MSE, PSNR)
6. `timing`     sampling wall time of every model, same sampler / steps / batch, relative to the teacher
7. `report.json`, `report.md` and the printed table (always rewritten)

Training is the real trainer on the stage's YAML: with one process `trainer.loop.train` in this
process (what `launch.train` calls), with more (the default on a CPU with 2+ cores: 2 DDP ranks of one
thread each) `torch.distributed.run -m launch.train`. Either way a stage config also runs by hand:
`python -m launch.train configs/quickstart/lit.yaml`.
"""
from __future__ import annotations

import hashlib
import json
import shutil
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch

import configs
from models.convert import weights_digest
from trainer.config import RunConfig, load_config
from trainer.quickstart_report import MODELS, STUDENTS, build_report, write_report
from trainer.quickstart_suites import SUITES, Suite, suite

CONFIG_DIR = Path(configs.__file__).parent / "quickstart"
DATA_FORMATS = ("digits", "wds", "mds")
FAMILIES = tuple(SUITES)

# --peft lora|tdlora: each student again with adapters on its frozen inherited base (models/lora), same
# recipe otherwise (steps, lr, routers, λ), so a row compares with the full fine-tune above it. Rank 8
# on attention, MLP and adaLN keeps a DyDiT student's trainable parameters (adapters + routers) under
# 10% of its full fine-tune's; TD-LoRA splits the same rank into 4 experts of rank 2 (equal adapter
# size, plus 4 gates of 129 parameters per layer). alpha 16 (scale 2): with Adam the scale acts as
# the adapters' learning rate, and 300 steps are few.
PEFT_METHODS = ("lora", "tdlora")
PEFT_OVERRIDES = ["peft.rank=8", "peft.alpha=16", "peft.experts=4"]


class QuickstartError(RuntimeError):
    """A stage cannot run: its directory holds another configuration's work, or its training failed."""


@dataclass
class EvalSettings:
    """How every model is sampled, scored and timed (the same for all, so rows compare)."""

    samples: int = 500  # per model, classes 0..9 in turn; FD needs a few hundred at least
    method: str = "ddim"
    steps: int = 25
    cfg_scale: float = 1.5
    seed: int = 0
    timing_batch: int = 100  # samples per timed run (x2 rows with guidance: 3,200 tokens, compute-bound)
    timing_repeats: int = 3  # median of these, after one warm-up run per model

    @classmethod
    def quick(cls) -> "EvalSettings":
        return cls(samples=40, steps=4, timing_batch=20, timing_repeats=1)


@dataclass
class Options:
    out: Path | None = None  # None: runs/quickstart (DiT), runs/quickstart-<family> (text-to-image)
    quick: bool = False
    # digits (in memory, DiT only) | wds | mds (shards written by the pipeline first); None: digits for
    # DiT, wds for a text-to-image family (its captions always go through shards)
    data: str | None = None
    eval: EvalSettings | None = None  # None: the family's defaults (full or --quick)
    overrides: list[str] = field(default_factory=list)  # extra key=value for every training stage
    nproc: int = 0  # training processes (DDP ranks); 0 = default_nproc()
    threads: int = 1  # torch threads of every process (each training rank, and this one)
    peft: tuple[str, ...] = ()  # also train each student with these adapters (stages <student>-<method>)
    family: str = "dit"  # dit | pixart | flux (trainer.quickstart_suites)
    ablations: bool = False  # also the family's ablation stages (outside the default run)

    def __post_init__(self) -> None:
        s = suite(self.family)  # a clear error for an unknown family
        self.out = Path(self.out or ("runs/quickstart" if not s.t2i else f"runs/quickstart-{s.family}")).absolute()
        self.nproc = self.nproc or default_nproc(self.quick)
        self.data = self.data or ("wds" if s.t2i else "digits")
        if self.data not in DATA_FORMATS:
            raise ValueError(f"data={self.data!r} is not one of {DATA_FORMATS}")
        if s.t2i and self.data == "digits":
            raise ValueError(f"--family {s.family}: the captions always go through text-embedding shards (launch.make_shards "
                             "→ launch.precompute); use --data wds or --data mds")
        bad = [m for m in self.peft if m not in PEFT_METHODS]
        if bad:
            raise ValueError(f"peft={bad[0]!r} is not one of {PEFT_METHODS}")
        if self.peft and s.t2i:
            raise ValueError(f"--peft runs on the DiT quickstart only (not --family {s.family})")
        if self.ablations and not s.ablations:
            raise ValueError(f"--ablations: the {s.family} quickstart has none (--family pixart or flux)")
        if self.eval is None:
            if s.t2i:
                from trainer.quickstart_t2i import T2IEvalSettings

                self.eval = T2IEvalSettings.for_family(s.family, self.quick)
            else:
                self.eval = EvalSettings.quick() if self.quick else EvalSettings()

    @property
    def suite(self) -> Suite:
        return suite(self.family)

    def models(self) -> list[str]:
        """Every model the run trains and scores: the teacher(s), the students, their PEFT variants, and
        with --ablations the ablation stages."""
        s = self.suite
        if not s.t2i:
            return [*MODELS, *(f"{st}-{m}" for m in self.peft for st in STUDENTS)]
        return [*s.stages, *(s.ablations if self.ablations else ())]


def recipe(name: str) -> tuple[str, str | None]:
    """(stage config, PEFT method or None) of a stage: `dydit-tdlora` → (dydit, tdlora), `lit-flux` → (lit-flux, None)."""
    base, _, method = name.rpartition("-")
    return (base, method) if base and method in PEFT_METHODS else (name, None)


def _log(msg: str) -> None:
    sys.stdout.write(f"[quickstart] {msg}\n")  # one write: lines from the evaluation threads never interleave
    sys.stdout.flush()


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    tmp.replace(path)


def _read_json(path: Path):
    return json.loads(path.read_text()) if path.exists() else None


# --- stage 1: shards --------------------------------------------------------------------------------

def write_shards(opts: Options) -> Path | None:
    """The digits as `opts.data` shards under `<out>/shards/<fmt>` (data-layer writer), or None."""
    if opts.data == "digits":
        return None
    from data.manifest import MANIFEST
    from data.sources import digits_source
    from data.writers import write_dataset

    out = opts.out / "shards" / opts.data
    if (out / MANIFEST).exists():
        _log(f"shards: reusing {out}")
        return out
    if out.exists():
        shutil.rmtree(out)  # a partial write of ours (the manifest comes last)
    t0 = time.perf_counter()
    report = write_dataset(digits_source(), str(out), opts.data, samples_per_shard=500)
    _log(f"shards: wrote {report.manifest.samples} digits as {opts.data} shards to {out} in {time.perf_counter() - t0:.1f}s")
    return out


# --- stages 2-3: training ---------------------------------------------------------------------------

def weights_path(opts: Options, name: str) -> Path:
    return opts.out / name / "export" / "ema.safetensors"


def teacher_stage(name: str, opts: Options) -> str | None:
    """The stage whose exported EMA teaches `name` (None: trained from scratch)."""
    s = opts.suite
    return s.teacher(recipe(name)[0]) if s.t2i else (None if name == "teacher" else "teacher")


def stage_overrides(name: str, opts: Options, shards: Path | None) -> list[str]:
    """What the pipeline changes in the stage's config: where things live (and --quick)."""
    s = opts.suite
    base, method = recipe(name)
    overrides = [f"run_dir={opts.out / name}"]
    teacher = teacher_stage(name, opts)
    if teacher is not None:
        overrides.append(f"teacher.path={weights_path(opts, teacher)}")
    if shards is not None:
        overrides += [f"data.format={opts.data}", f"data.path={shards}"]
    if opts.quick:
        overrides += list(s.quick) + (list(s.quick_dynamic) if s.is_dynamic(base) else [])
    if method is not None:
        overrides += [f"peft.method={method}", *PEFT_OVERRIDES]
    return overrides + s.extra_overrides(base) + opts.overrides


def stage_config(name: str, opts: Options, shards: Path | None) -> RunConfig:
    path = opts.suite.config_path(recipe(name)[0])
    return load_config(path, stage_overrides(name, opts, shards), world_size=1)


def _stage_key(cfg: RunConfig, teacher_digest: str | None) -> str:
    """What determines a stage's result: its config (minus where things live) and its teacher."""
    from omegaconf import OmegaConf

    d = OmegaConf.to_container(OmegaConf.structured(cfg))
    d.pop("run_dir", None)
    if d.get("teacher"):
        d["teacher"].pop("path", None)
    d["data"].pop("path", None)
    if d.get("peft", {}).get("method") == "none":
        d.pop("peft")  # full fine-tuning: stages made before the peft keys existed stay valid
    d["teacher_digest"] = teacher_digest
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def default_nproc(quick: bool = False) -> int:
    """Training processes: one per CPU core, up to 2 (DDP, one thread each); one process on a GPU box
    or for --quick (its models are too small to split)."""
    import os

    if quick or torch.cuda.is_available():
        return 1
    return max(1, min(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1))


def launch_train(name: str, opts: Options, overrides: list[str]) -> int:
    """`torch.distributed.run -m launch.train` with `opts.nproc` ranks on the stage config.

    Ranks run with one intra-op thread each: two single-threaded ranks use two cores fully, while two
    OpenMP threads per process stall on each other's barriers as soon as anything else runs on the box.
    """
    import os
    import subprocess

    repo = str(Path(__file__).resolve().parents[1])
    env = {**os.environ, "OMP_NUM_THREADS": str(opts.threads), "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join([repo, *filter(None, [os.environ.get("PYTHONPATH")])])
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    # DDP: the models are small, so replicas beat FSDP's per-block gathers
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={opts.nproc}",
           "-m", "launch.train", str(opts.suite.config_path(recipe(name)[0])), "engine.kind=ddp", *overrides]
    return subprocess.run(cmd, env=env).returncode


def train_stage(name: str, opts: Options, shards: Path | None) -> dict:
    """Train (or resume, or reuse) one model; returns its stage record (with the weights path)."""
    from trainer.build import student_config
    from trainer.export import export_run

    overrides = stage_overrides(name, opts, shards)
    cfg = stage_config(name, opts, shards)  # fails here, before any launch
    stage_dir = opts.out / name
    weights = weights_path(opts, name)
    teacher = teacher_stage(name, opts)
    teacher_digest = None if teacher is None else weights_digest(weights_path(opts, teacher))
    key = _stage_key(cfg, teacher_digest)
    stamp_path = stage_dir / "stage.json"
    stamp = _read_json(stamp_path)
    if stamp is not None and stamp["key"] != key:
        raise QuickstartError(
            f"{stage_dir} was made with other settings (stage key {stamp['key']}, now {key}: a different "
            f"--quick/--data/override or teacher); use another --out, or delete {stage_dir} to redo it"
        )
    if stamp is not None and stamp.get("status") == "done" and weights.exists():
        _log(f"{name}: reusing {weights} (trained {stamp['steps']} steps in {stamp['train_s']:.0f}s)")
        return {**stamp, "reused": True}

    _log(f"{name}: training {cfg.student.model} {dict(cfg.student.args)} for {cfg.train.steps} steps "
         f"(batch {cfg.train.global_batch}, {opts.nproc} process(es)) → {stage_dir}")
    _write_json(stamp_path, {"key": key, "status": "training"})
    parent_gb = resident_gb()  # this process while the ranks train (it waits for them)
    t0 = time.perf_counter()
    if opts.nproc == 1:  # in this process: no second start-up of torch
        from trainer.checkpoint import CheckpointError
        from trainer.loop import NonFiniteError, train

        try:
            code = train(cfg).exit_code
        except (CheckpointError, NonFiniteError) as e:  # as launch.train reports them, then the stage error
            _log(f"{name}: error: {e}")
            code = 1
    else:
        code = launch_train(name, opts, overrides)
    if code != 0:
        raise QuickstartError(f"training stage {name!r} failed (exit code {code}); run the same command again to "
                              f"resume it from its last checkpoint in {stage_dir / 'checkpoints'}")
    train_s = time.perf_counter() - t0
    # plain LoRA is folded into the weights (deployed so, it samples as fast as the full fine-tune);
    # TD-LoRA's timestep-dependent update stays a runtime module
    paths = export_run(stage_dir, stage_dir / "export", merge_lora=cfg.peft.method == "lora")
    last = _last_metrics(stage_dir / "metrics.jsonl")
    stamp = {
        "key": key, "status": "done", "steps": int(last.get("step", cfg.train.steps)), "train_s": train_s,
        "weights": str(paths["ema"]), "model": cfg.student.model, "args": dict(cfg.student.args),
        "flops_target": cfg.dynamic.flops_target if student_config(cfg).dynamic else None,
        "peft": cfg.peft.method, "trainable_params": trainable_params(stage_dir, cfg),
        "nproc": opts.nproc, "peak_gb": last.get("memory/peak_gb"), "parent_gb": parent_gb, "final_metrics": {k: v for k, v in last.items() if k.startswith(("loss", "flops/"))},
    }
    _write_json(stamp_path, stamp)
    _log(f"{name}: {stamp['steps']} steps in {train_s:.0f}s; exported EMA to {paths['ema']}")
    return {**stamp, "reused": False}


def resident_gb() -> float:
    """This process's resident memory now (GiB), from /proc (0 where there is none)."""
    import os

    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**30
    except (OSError, ValueError, IndexError):
        return 0.0


def trainable_params(stage_dir: Path, cfg: RunConfig) -> int:
    """Parameters the stage trained: a PEFT run's manifest counts them; otherwise the whole student."""
    from trainer.export import checkpoint_dir
    from trainer.manifest import read_manifest

    peft = (read_manifest(checkpoint_dir(stage_dir)) or {}).get("peft")
    if peft:
        return int(peft["trainable_params"])
    from models import build_model
    from trainer.build import student_config

    with torch.device("meta"):
        return sum(p.numel() for p in build_model(student_config(cfg)).parameters())


def _last_metrics(path: Path) -> dict:
    lines = [line for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
    return json.loads(lines[-1]) if lines else {}


# --- stage 4: classifier ----------------------------------------------------------------------------

def classifier_stage(opts: Options):
    from trainer.digits_eval import load_classifier, save_classifier, train_classifier

    path = opts.out / "classifier.pt"
    if path.exists():
        model, info = load_classifier(path)
        _log(f"classifier: reusing {path} (held-out accuracy {info['held_out_accuracy']:.3f})")
        return model, info
    t0 = time.perf_counter()
    model, info = train_classifier(epochs=4 if opts.quick else 30)
    info["train_s"] = time.perf_counter() - t0
    save_classifier(model, info, path)
    _log(f"classifier: held-out accuracy {info['held_out_accuracy']:.3f} on {info['test_size']} real digits "
         f"({info['train_s']:.0f}s)")
    return model, info


# --- stage 5: sampling and scoring ------------------------------------------------------------------

def fixed_batch(model, n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise and labels every model is sampled from: classes 0..9 in turn."""
    from models import family_of

    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(n, *family_of(model).latent_shape(model.config), generator=g)
    return noise, torch.arange(n) % model.config.num_classes


def generate(model, objective, noise: torch.Tensor, labels: torch.Tensor, ev: EvalSettings,
             on_aux: Callable[[dict], None] | None = None, steps: int | None = None) -> torch.Tensor:
    """Guided class-conditional samples in [-1, 1] (see `sample_model`)."""
    return sample_model(model, objective, noise, {"y": labels}, ev.cfg_scale, steps or ev.steps, ev.method, on_aux)


def sample_model(model, objective, noise: torch.Tensor, cond: dict, cfg_scale: float, steps: int, method: str,
                 on_aux: Callable[[dict], None] | None = None) -> torch.Tensor:
    """Samples in [-1, 1] from `model` in eval mode (a dynamic model runs its sliced path), with
    classifier-free guidance against the family's null condition when `cfg_scale` != 1."""
    from models import family_of
    from models.diffusion.samplers import sample

    model.eval()

    def fn(x, t, **c):
        if on_aux is None:
            return model(x, t, **c)
        out, aux = model(x, t, **c, return_aux=True)
        on_aux(aux)
        return out

    null = model.null_condition(cond) if cfg_scale != 1.0 else None  # guidance needs the null condition
    x = sample(fn, objective, noise, cond, null_cond=null, cfg_scale=cfg_scale, steps=steps, method=method,
               seq_len=family_of(model).image_tokens(model.config, tuple(noise.shape[-2:])))
    return x.float().clamp(-1, 1)


def save_grid(images: torch.Tensor, path: Path, per_class: int = 10, classes: int = 10, scale: int = 4) -> None:
    """Rows of classes 0..9 (samples are in class order), each digit upscaled for viewing."""
    import torch.nn.functional as F
    from torchvision.utils import make_grid, save_image

    n = min(len(images), per_class * classes)
    x = F.interpolate(images[:n] * 0.5 + 0.5, scale_factor=scale, mode="nearest")
    save_image(make_grid(x, nrow=classes, padding=2, pad_value=1.0), path)


def flops_of(model, aux_records: list[dict]) -> dict:
    """GFLOPs per forward per sample: static for a static model; for a dynamic one what the routers
    actually switched on while sampling (whole model), and the DyDiT ratio (attention + MLP only)."""
    from models import family_of

    cfg, family = model.config, family_of(model)
    latent_hw = family.latent_shape(cfg)[1:]
    rec = {"gflops_static": family.flops(cfg, latent_hw)["total"] / 1e9}
    if not cfg.dynamic:
        rec["gflops"] = rec["gflops_static"]
        return rec
    flops = torch.cat([family.realised_flops(cfg, a, latent_hw) for a in aux_records])
    ratio = torch.cat([a["flops_ratio"] for a in aux_records])
    rec["gflops"] = float(flops.mean()) / 1e9
    rec["flops_ratio"] = float(ratio.mean())  # per forward, averaged over every sample and step
    rec["flops_ratio_min"] = float(ratio.min())
    rec["flops_ratio_max"] = float(ratio.max())
    return rec


def eval_stage(name: str, weights: Path, opts: Options, classifier, reference) -> dict:
    from models import load_pretrained
    from trainer.build import build_objective
    from trainer.digits_eval import score
    from trainer.export import read_run_config

    ev = opts.eval
    sha = weights_digest(weights)
    path = opts.out / "eval" / f"{name}.json"
    png = opts.out / f"samples_{name}.png"
    key = {"weights_digest": sha, "settings": asdict(ev)}
    saved = _read_json(path)
    if saved is not None and saved.get("key") == key and png.exists() and samples_path(opts, name).exists():
        _log(f"{name}: reusing samples and scores ({path})")
        return {**saved, "reused": True}

    model = load_pretrained(weights)
    objective = build_objective(read_run_config(opts.out / name))
    noise, labels = fixed_batch(model, ev.samples, ev.seed)
    records: list[dict] = []
    t0 = time.perf_counter()
    images = generate(model, objective, noise, labels, ev, on_aux=records.append if model.config.dynamic else None)
    sample_s = time.perf_counter() - t0
    scores = score(classifier, images, labels, reference)
    save_grid(images, png)
    samples_path(opts, name).parent.mkdir(parents=True, exist_ok=True)
    torch.save(images, samples_path(opts, name))  # the teacher-relative error pairs them sample by sample
    rec = {
        "key": key, "model": name, "params_m": sum(p.numel() for p in model.parameters()) / 1e6,
        **scores, **flops_of(model, records), "sample_s": sample_s, "grid": str(png),
    }
    _write_json(path, rec)
    extra = f", realised FLOPs ratio {rec['flops_ratio']:.3f}" if "flops_ratio" in rec else ""
    _log(f"{name}: accuracy {rec['accuracy']:.3f}, FD {rec['fd']:.2f} on {rec['n']} samples{extra} ({sample_s:.0f}s)")
    return {**rec, "reused": False}


def samples_path(opts: Options, name: str) -> Path:
    return opts.out / "eval" / f"{name}.samples.pt"


def teacher_relative(opts: Options) -> dict[str, dict[str, float]]:
    """Each model's samples against the teacher's from the same noise and labels (sample i ↔ sample i):
    MSE of the images in [-1, 1] ("teacher_mse_latents": pixel space is the model's space here), and of
    their uint8 renderings scaled to [0, 1] with the PSNR (`trainer.evaluate.PairedError`, the measure
    `launch.evaluate --metrics teacher_mse` and `sample.eval_every` log)."""
    from trainer.evaluate import PairedError
    from trainer.sampling import to_uint8

    teacher = torch.load(samples_path(opts, "teacher"), weights_only=True)
    out = {}
    for name in opts.models()[1:]:
        student = torch.load(samples_path(opts, name), weights_only=True)
        err = PairedError()
        err.add(student, teacher, to_uint8(student), to_uint8(teacher))
        out[name] = err.values()
    return out


def evaluate_all(weights: dict[str, Path], opts: Options, classifier, reference) -> dict[str, dict]:
    """`eval_stage` of every model, `opts.nproc` at a time: each sampling loop is one thread of this
    process running single-threaded kernels (torch releases the GIL inside them), so two models
    sample side by side on two cores. Results do not depend on the interleaving (fixed noise, no
    global RNG)."""
    from concurrent.futures import ThreadPoolExecutor

    def task(name: str) -> dict:
        torch.set_num_threads(opts.threads)  # OpenMP's thread count is per calling thread
        return eval_stage(name, weights[name], opts, classifier, reference)

    with ThreadPoolExecutor(max_workers=max(1, opts.nproc)) as pool:
        futures = {n: pool.submit(task, n) for n in opts.models()}
        return {n: f.result() for n, f in futures.items()}


# --- stage 6: timing --------------------------------------------------------------------------------

def timing_stage(weights: dict[str, Path], opts: Options, runs: Callable[[], dict[str, Callable]] | None = None,
                 names: tuple[str, ...] = MODELS, reference: str = "teacher") -> dict:
    """Median wall time of one sampling run per model: same sampler, steps, batch, noise and labels.

    One warm-up run each, then the repeats go round-robin over the models, so a slow spell of the
    machine hits every model alike. `runs()` builds {name: fn(steps) → samples} (default: the DiT
    models on class labels); `weights` maps each name to the file it samples.
    """
    ev = opts.eval
    path = opts.out / "eval" / "timing.json"
    key = {"weights_digest": {n: weights_digest(weights[n]) for n in names}, "settings": asdict(ev),
           "threads": torch.get_num_threads()}
    saved = _read_json(path)
    if saved is not None and saved.get("key") == key:
        _log(f"timing: reusing {path}")
        return {**saved, "reused": True}
    fns = runs() if runs is not None else _class_runs(weights, opts)
    for fn in fns.values():
        fn(min(ev.steps, 3))  # warm-up: same shapes
    times: dict[str, list[float]] = {n: [] for n in fns}
    with torch.inference_mode():
        for _ in range(ev.timing_repeats):
            for n, fn in fns.items():
                t0 = time.perf_counter()
                fn(None)
                times[n].append(time.perf_counter() - t0)
    median = {n: statistics.median(v) for n, v in times.items()}
    rec = {
        "key": key, "batch": ev.timing_batch, "steps": ev.steps, "method": ev.method, "cfg_scale": ev.cfg_scale,
        "threads": torch.get_num_threads(), "repeats": times, "median_s": median, "reference": reference,
        "relative": {n: median[n] / median[reference] for n in median},
    }
    _write_json(path, rec)
    _log("timing: " + ", ".join(f"{n} {median[n]:.2f}s ({rec['relative'][n]:.2f}x)" for n in median))
    return {**rec, "reused": False}


def _class_runs(weights: dict[str, Path], opts: Options) -> dict[str, Callable]:
    """The DiT models' timed runs: class-conditional batches (PEFT variants are scored, not timed)."""
    from models import load_pretrained
    from trainer.build import build_objective
    from trainer.export import read_run_config

    ev = opts.eval
    objective = build_objective(read_run_config(opts.out / "teacher"))
    models = {n: load_pretrained(weights[n]) for n in MODELS}
    noise, labels = fixed_batch(models["teacher"], ev.timing_batch, ev.seed + 1)
    return {n: (lambda steps, m=m: generate(m, objective, noise, labels, ev, steps=steps)) for n, m in models.items()}


# --- the pipeline -----------------------------------------------------------------------------------

def run(opts: Options) -> dict:
    """Every stage in order, reusing what exists; returns the report (also written to `opts.out`)."""
    if opts.suite.t2i:
        from trainer.quickstart_t2i import run_t2i

        return run_t2i(opts)
    from trainer.digits_eval import real_floor, real_stats

    t0 = time.perf_counter()
    torch.set_num_threads(opts.threads)
    opts.out.mkdir(parents=True, exist_ok=True)
    shards = write_shards(opts)
    stages = train_all(opts, shards)
    classifier, classifier_info = classifier_stage(opts)
    reference = real_stats(classifier)
    weights = {n: weights_path(opts, n) for n in opts.models()}
    evals = evaluate_all(weights, opts, classifier, reference)
    timing = timing_stage(weights, opts)
    floor = real_floor(classifier, opts.eval.samples, reference, seed=opts.eval.seed)
    relative = teacher_relative(opts)
    report = build_report(opts, stages, evals, timing, classifier_info, floor, time.perf_counter() - t0, relative)
    write_report(report, opts.out)
    return report


def train_all(opts: Options, shards: Path | None) -> dict[str, dict]:
    """Every training stage in order (a stage's teacher always comes before it)."""
    return {name: train_stage(name, opts, shards) for name in opts.models()}
