"""`python -m launch.benchmark teacher_load [--json] [--model dit-xl/2 --dtype bf16 --nproc 2 ...]`

Peak anonymous memory per rank while a teacher is loaded alone, sharded against replicated, side by
side. A teacher file of a registry DiT config (default `dit-xl/2`, 675 M parameters, stored in bf16:
1.35 GB) with random weights is written to a temporary directory, tensor by tensor; then `--nproc`
ranks (torchrun, gloo on the CPU) each read it with the trainer's own code
(`read_checkpoint(lazy=True)` + `trainer.engines.placement.place_teacher`), once with
`teacher.shard: true` and once replicated. Each rank polls its RssAnon (/proc/self/status, every
millisecond, in a thread) from a baseline taken after start-up (imports, process group) until the
teacher is placed: pages of the memory-mapped weights file are page cache, not the model's memory,
and do not count. Bar (issue 9): sharded peak above baseline <= 0.6 x the teacher's size per rank;
replicated >= 1.0 x. The file is removed afterwards.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

SHARDED_BAR, REPLICATED_BAR = 0.6, 1.0


def rss_anon() -> int:
    """Resident anonymous memory of this process, in bytes."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("RssAnon:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no RssAnon in /proc/self/status (Linux only)")


class PeakPoller:
    """The highest RssAnon seen while running, sampled every `every_s` in a daemon thread."""

    def __init__(self, every_s: float = 0.001) -> None:
        self.every_s, self.peak, self._stop = every_s, rss_anon(), threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_anon())
            time.sleep(self.every_s)

    def __enter__(self) -> "PeakPoller":
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_anon())


def write_teacher(model: str, dtype: str, path: Path, seed: int = 0) -> int:
    """A safetensors file of registry model `model` with random weights (N(0, 0.02²); the fixed position
    embedding as the model computes it) in `dtype`, written one tensor at a time (never the whole model
    in memory). Returns the bytes of its tensors."""
    import torch

    from models import family_of, model_config
    from models.convert import CONFIG_METADATA_KEY, FAMILY_METADATA_KEY
    from models.lazy import SAFETENSORS_DTYPES
    from models.sharded_load import build_meta, state_tensors

    cfg = model_config(model)
    family = family_of(cfg)
    meta = build_meta(lambda: family.build(cfg))
    tensors = state_tensors(meta)
    torch_dtype = {"bf16": torch.bfloat16, "fp32": torch.float32}[dtype]
    code = next(k for k, v in SAFETENSORS_DTYPES.items() if v == torch_dtype)
    header: dict[str, Any] = {"__metadata__": {"format": "pt", CONFIG_METADATA_KEY: json.dumps(cfg.to_dict(), sort_keys=True),
                                               FAMILY_METADATA_KEY: family.name}}
    at = 0
    for name, t in tensors.items():
        n = t.numel() * torch_dtype.itemsize
        header[name] = {"dtype": code, "shape": list(t.shape), "data_offsets": [at, at + n]}
        at += n
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    g = torch.Generator().manual_seed(seed)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for name, t in tensors.items():
            value = t if not t.is_meta else torch.randn(t.shape, generator=g) * 0.02
            f.write(value.to(torch_dtype).contiguous().view(torch.uint8).numpy().tobytes())
    return at


def worker(mode: str, path: str, out: str) -> None:
    """One rank (under torchrun): baseline, then the teacher loaded as the trainer does, peak recorded."""
    import gc

    import torch

    from models.convert import read_checkpoint
    from models.sharded_load import local_numel
    from trainer.config import RunConfig
    from trainer.distributed import destroy_distributed, init_distributed
    from trainer.engines.placement import place_teacher

    torch.set_num_threads(1)
    env = init_distributed(600)
    cfg = RunConfig()
    cfg.teacher.path, cfg.teacher.shard = path, mode == "sharded"  # teacher.dtype: stored (the default)
    torch.distributed.barrier()
    gc.collect()
    baseline = rss_anon()
    t0 = time.perf_counter()
    with PeakPoller() as poll:
        teacher = place_teacher(read_checkpoint(path, lazy=True), cfg, env, shard=cfg.teacher.shard)
    seconds = time.perf_counter() - t0
    held = list(local_numel(teacher))
    record = {"mode": mode, "rank": env.rank, "baseline": baseline, "peak": poll.peak, "after": rss_anon(),
              "seconds": seconds, "share": sum(n for _, n, _ in held) / sum(f for _, _, f in held),
              "dtypes": sorted({str(p.dtype) for p in teacher.parameters()})}
    Path(out, f"{mode}-rank{env.rank}.json").write_text(json.dumps(record))
    torch.distributed.barrier()
    destroy_distributed()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def measure(args: argparse.Namespace) -> dict[str, Any]:
    root = Path(tempfile.mkdtemp(prefix="teacher_load-", dir=args.dir))
    try:
        path = root / "teacher.safetensors"
        t0 = time.perf_counter()
        nbytes = write_teacher(args.model, args.dtype, path)
        written = time.perf_counter() - t0
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
        ranks = []
        for mode in ("sharded", "replicated"):
            cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={args.nproc}",
                   f"--master_port={_free_port()}", "-m", "launch.benchmarks.teacher_load", "--worker", mode,
                   str(path), str(root)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise RuntimeError(f"{mode} ranks failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
            ranks += [json.loads((root / f"{mode}-rank{r}.json").read_text()) for r in range(args.nproc)]
    finally:
        for f in root.iterdir():
            f.unlink()
        root.rmdir()
    for r in ranks:
        r["ratio"] = (r["peak"] - r["baseline"]) / nbytes
    worst = {m: max(r["ratio"] for r in ranks if r["mode"] == m) for m in ("sharded", "replicated")}
    least = min(r["ratio"] for r in ranks if r["mode"] == "replicated")
    return {"model": args.model, "dtype": args.dtype, "teacher_bytes": nbytes, "nproc": args.nproc,
            "write_s": written, "ranks": ranks, "sharded_worst": worst["sharded"], "replicated_least": least,
            "sharded_ok": worst["sharded"] <= SHARDED_BAR, "replicated_ok": least >= REPLICATED_BAR}


def table(r: dict[str, Any]) -> str:
    mb = 1 << 20
    lines = [f"teacher_load: {r['model']} in {r['dtype']}, {r['teacher_bytes'] / 1e9:.2f} GB of tensors, "
             f"{r['nproc']} ranks (gloo, CPU); peak RssAnon above each rank's baseline while loading",
             f"{'mode':<11}{'rank':>5}{'baseline MB':>13}{'peak +MB':>10}{'after +MB':>11}{'x teacher':>11}"
             f"{'held':>7}{'load s':>8}"]
    for x in sorted(r["ranks"], key=lambda x: (x["mode"] != "sharded", x["rank"])):
        lines.append(f"{x['mode']:<11}{x['rank']:>5}{x['baseline'] / mb:>13.0f}{(x['peak'] - x['baseline']) / mb:>10.0f}"
                     f"{(x['after'] - x['baseline']) / mb:>11.0f}{x['ratio']:>11.3f}{x['share']:>7.1%}{x['seconds']:>8.1f}")
    lines.append(f"bar: sharded <= {SHARDED_BAR} x per rank: {r['sharded_worst']:.3f} "
                 f"{'PASS' if r['sharded_ok'] else 'FAIL'}; replicated >= {REPLICATED_BAR} x: "
                 f"{r['replicated_least']:.3f} {'PASS' if r['replicated_ok'] else 'FAIL'}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--worker"]:
        worker(*argv[1:])
        return 0
    p = argparse.ArgumentParser(prog="python -m launch.benchmark teacher_load", description=__doc__.split("\n\n")[0])
    p.add_argument("--json", action="store_true")
    p.add_argument("--model", default="dit-xl/2", help="registry name of the teacher (dit-xl/2 in bf16: 1.35 GB)")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp32"), help="dtype the file stores")
    p.add_argument("--nproc", type=int, default=2)
    p.add_argument("--dir", default=None, help="where to write the teacher file (default: the system temp dir)")
    args = p.parse_args(argv)
    r = measure(args)
    print(json.dumps({"suite": "teacher_load", **r}, indent=1) if args.json else table(r))
    return 0 if r["sharded_ok"] and r["replicated_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
