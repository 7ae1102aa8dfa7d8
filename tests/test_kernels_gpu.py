"""On a GPU: the students run with `kernels: triton` and agree with `kernels: reference` on the CPU.

Skipped without CUDA (CI) and under TRITON_INTERPRET (the interpreter tests cover correctness
there). Run alone on a GPU machine: `pytest tests/test_kernels_gpu.py -m "gpu or not gpu"`.
"""
import os

import pytest
import torch

from models import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="Triton is interpreted in this process"),
]


def _pair(name: str, **kw):
    torch.manual_seed(0)
    ref = build_model(name, kernels="reference", **kw)
    with torch.no_grad():  # non-zero adaLN and output layers so every op contributes
        for n, p in ref.named_parameters():
            if "rate.router" not in n and "token_selection" not in n:
                p.add_(torch.randn_like(p) * 0.02)
    tri = build_model(name, kernels="triton", **kw)
    tri.load_state_dict(ref.state_dict())
    return ref, tri.cuda()


def _inputs(batch=4, size=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(batch, 4, size, size, generator=g), torch.randint(0, 1000, (batch,), generator=g).float(),
            torch.randint(0, 1000, (batch,), generator=g))


@pytest.mark.parametrize("name", ["lit-s/2", "lit-xl/2", "dylit-s/2", "dydit-s/2"])
def test_student_triton_on_gpu_matches_reference_on_cpu_fp32(name):
    ref, tri = _pair(name, depth=2)
    x, t, y = _inputs()
    ref.train(), tri.train()
    torch.manual_seed(1)
    out_ref = ref(x, t, y)
    out_ref.square().mean().backward()
    torch.manual_seed(1)
    torch.cuda.manual_seed(1)
    out_tri = tri(x.cuda(), t.cuda(), y.cuda())
    out_tri.square().mean().backward()
    if not name.startswith("dy"):  # routers draw Gumbel noise from different CPU/GPU streams
        torch.testing.assert_close(out_tri.cpu(), out_ref, rtol=2e-4, atol=2e-4)
        for (n, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
            torch.testing.assert_close(p_tri.grad.cpu(), p_ref.grad, rtol=2e-3, atol=2e-4, msg=n)
    ref.eval(), tri.eval()
    with torch.no_grad():
        torch.testing.assert_close(tri(x.cuda(), t.cuda(), y.cuda()).cpu(), ref(x, t, y), rtol=2e-4, atol=2e-4)


@pytest.mark.parametrize("name", ["lit-s/2", "dylit-s/2"])
def test_student_triton_bf16_autocast_close_to_fp32_reference(name):
    ref, tri = _pair(name, depth=2)
    ref.eval(), tri.eval()
    x, t, y = _inputs()
    with torch.no_grad():
        truth = ref(x, t, y)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            out = tri(x.cuda(), t.cuda(), y.cuda()).float().cpu()
    rel = (out - truth).norm() / truth.norm()
    assert rel < 3e-2, rel
