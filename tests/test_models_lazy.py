"""Lazy tensors (models/lazy.py): compositions read exactly the rows of their eager counterparts and
ask their sources for nothing else, file-backed leaves touch only the pages of the rows read, and
torch operations a row-wise read cannot serve are refused with the fix."""
from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch

from models.lazy import (
    HeldTensor, LazyOpError, LazyTensor, cat_rows, read_flat, reshape_rows, slice_rows, split_rows, take_rows,
)
from tests.trainer_utils import REPO, base_env


class Counted(LazyTensor):
    """A leaf that records the row ranges asked of it (the test double for a file)."""

    def __init__(self, t: torch.Tensor, log: list) -> None:
        self.t, self.log, self.shape, self.dtype = t, log, t.shape, t.dtype

    def rows(self, start: int, stop: int) -> torch.Tensor:
        self._check_range(start, stop)
        self.log.append((id(self), start, stop))
        return self.t[start:stop].clone()


def _compositions(lazy: bool):
    """The same surgery eagerly (plain tensors) and lazily: FLUX-like [q; k; v; mlp] fused rows, a
    halves swap (final adaLN), a slice of a concatenation and a row-preserving reshape."""
    g = torch.Generator().manual_seed(0)
    q, k, v, mlp = (torch.randn(n, 3, generator=g) for n in (4, 4, 4, 7))
    conv = torch.randn(5, 2, 2, 2, generator=g)
    log: list = []
    wrap = (lambda t: Counted(t, log)) if lazy else (lambda t: t)
    q, k, v, mlp, conv = map(wrap, (q, k, v, mlp, conv))
    fused = cat_rows([q, k, v, mlp])
    swapped = take_rows(cat_rows([q, k]), list(range(4, 8)) + list(range(0, 4)))
    middle = slice_rows(fused, 3, 13)
    parts = split_rows(fused, [12, 7])
    return {"fused": fused, "swapped": swapped, "middle": middle, "qkv": parts[0], "mlp": parts[1],
            "nested": cat_rows([middle, swapped, parts[1]]), "conv": reshape_rows(conv, (5, 8))}, log


def test_compositions_read_the_rows_of_their_eager_counterparts():
    lazy, _ = _compositions(lazy=True)
    eager, _ = _compositions(lazy=False)
    for name, t in lazy.items():
        ref = eager[name]
        assert isinstance(t, LazyTensor) and t.shape == ref.shape and t.dtype == ref.dtype, name
        assert torch.equal(t.read(), ref), name
        n = ref.shape[0]
        for a in range(n + 1):
            for b in range(a, n + 1):
                assert torch.equal(t.rows(a, b), ref[a:b]), (name, a, b)
        flat = ref.reshape(-1)
        for a, b in ((0, flat.numel()), (1, 5), (4, 17), (flat.numel() - 3, flat.numel())):
            assert torch.equal(read_flat(t, a, b), flat[a:b]), (name, a, b)


def test_compositions_ask_their_sources_only_for_the_rows_they_return():
    lazy, log = _compositions(lazy=True)
    for name, t in lazy.items():
        n = t.shape[0]
        for a, b in ((0, n), (1, max(1, n - 1)), (n // 2, n // 2 + 1)):
            log.clear()
            out = t.rows(a, b)
            assert sum(stop - start for _, start, stop in log) == out.shape[0] == b - a, (name, a, b, log)
    log.clear()
    lazy["fused"].rows(5, 6)  # one row of k
    assert [(s, e) for _, s, e in log] == [(1, 2)]
    log.clear()
    lazy["swapped"].rows(3, 5)  # the last row of k, then the first of q: two reads of one row each
    assert [(s, e) for _, s, e in log] == [(3, 4), (0, 1)]


def test_torch_operations_on_lazy_tensors_are_refused_with_the_fix():
    t = HeldTensor(torch.ones(2, 3))
    with pytest.raises(LazyOpError, match="cat_rows"):
        torch.cat([t, t])
    with pytest.raises(LazyOpError, match="materialise"):
        torch.equal(t, t)
    with pytest.raises(ValueError, match="dim 0"):
        cat_rows([t, HeldTensor(torch.ones(2, 4))])
    with pytest.raises(ValueError, match="do not add up"):
        split_rows(t, [1, 2])


RSS_PROBE = textwrap.dedent("""
    import gc, sys, torch
    from pathlib import Path
    from safetensors.torch import save_file
    from models.weights_io import read_any

    def rss():  # kB of resident file-backed + anonymous pages of this process
        f = dict(l.split(":", 1) for l in open("/proc/self/status"))
        return sum(int(f[k].split()[0]) for k in ("RssFile", "RssAnon")) * 1024

    root = Path(sys.argv[1])
    w = torch.randn(16384, 1024)  # 64 MiB; written, then dropped
    save_file({"x_embedder.proj.weight": w}, str(root / "w.safetensors"))
    torch.save({"x_embedder.proj.weight": w}, root / "w.pt")
    del w
    out = []
    for name in ("w.safetensors", "w.pt"):
        dst = torch.zeros(256, 1024)
        before = rss()
        t = read_any(root / name, lazy=True).state_dict["x_embedder.proj.weight"]
        dst.copy_(t.rows(8000, 8256))  # 1 MiB of rows
        rows = rss() - before
        before = rss()
        float(t.read().sum())  # the control: the whole tensor
        whole = rss() - before
        out.append(f"{name} {rows} {whole}")
        del t, dst  # unmap the file before the next format is measured
        gc.collect()
    print("\\n".join(out))
""")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_file_backed_rows_touch_only_their_own_pages(tmp_path):
    """Reading 1 MiB of rows of a 64 MiB tensor raises the process's resident pages (file-backed and
    anonymous) by a few MiB, from safetensors (slice reads) and from a pickle (memory-mapped load);
    reading the whole tensor, the control, raises them by the whole 64 MiB. (The kernel maps file pages
    around a fault in units of its page-cache folios: measured 7-8 MiB for the 1 MiB read here.)"""
    proc = subprocess.run([sys.executable, "-c", RSS_PROBE, str(tmp_path)], cwd=REPO, env=base_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mib = 1 << 20
    for line in proc.stdout.strip().splitlines():
        name, rows, whole = line.split()
        assert int(rows) < 16 * mib, (name, int(rows) / mib)  # 1 MiB of rows + the kernel's fault-around
        assert int(whole) > 48 * mib, (name, int(whole) / mib)
