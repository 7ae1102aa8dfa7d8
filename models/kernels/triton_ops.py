"""The Triton op set the dispatcher hands out for `kernels: triton` (and `auto` on CUDA).

Importing this compiles nothing; kernels are compiled (or interpreted, under TRITON_INTERPRET=1)
on first call and autotuned per shape on a GPU.

`gather_tokens` stays on the PyTorch reference: a gather moves the same bytes however it is
written (see token_routing's docstring), and `python -m launch.benchmark kernels` prints the
Triton gather against index_select so the choice can be revisited with a measurement.
"""
from __future__ import annotations

from models.kernels import adaln, linear_attention, reference, token_routing
from models.kernels.dispatch import KernelOps

TRITON_OPS = KernelOps(
    name="triton",
    linear_attention=linear_attention.linear_attention,
    modulate_layernorm=adaln.modulate_layernorm,
    gated_residual=adaln.gated_residual,
    gather_tokens=reference.gather_tokens,
    scatter_add_tokens=token_routing.scatter_add_tokens,
)
