"""How the Triton kernels are launched: autotuned on a GPU, one fixed small config in the interpreter.

Triton decides between compiling and interpreting when a `@triton.jit` function is *defined*, so
`INTERPRET` is read once here, at import, exactly as Triton reads it. Under the interpreter every
config would be benchmarked at ~250× torch's cost, so a `TunedKernel` then launches the plain
kernel with `interpret_meta`, a dict the tests may edit to exercise other block sizes.

Under `torch.compile` the launchers run inside `torch.library` custom ops (one per forward and
per backward, with fake implementations and registered autograd; see adaln.py, linear_attention.py,
token_routing.py): the compiler keeps each op as one opaque call in its graph, never
tracing the launcher's Python (autotuning with config pruning, split heuristics, the interpreter).
`custom_op` rather than `triton_op`: each launcher already is one or a few full passes over
memory with nothing for inductor to fuse into, and the launch decisions (autotuner, SM-count
splits, the interpreter's fixed configs) stay in plain Python outside the graph.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Sequence

import torch
import triton

INTERPRET: bool = bool(triton.knobs.runtime.interpret)

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)

# Under the interpreter, rows per split of the split-N reductions; 0 = the GPU heuristic. The tests
# set it small so that the partial-sum path runs on their small N.
INTERPRET_SPLIT_ROWS: int = 0


class TunedKernel:
    """A `@triton.jit` kernel with its GPU autotuning configs and its interpreter meta-parameters."""

    def __init__(
        self,
        fn: Any,
        configs: Sequence[triton.Config],
        key: Sequence[str],
        interpret_meta: dict[str, int],
        prune: Callable[..., list[triton.Config]] | None = None,
    ) -> None:
        self.fn = fn
        self.configs = list(configs)
        self.key = list(key)
        self.prune = prune
        self.interpret_meta = dict(interpret_meta)
        self.tuned = None if INTERPRET else self.autotuner()

    def autotuner(
        self, do_bench: Callable[..., Any] | None = None, configs: Sequence[triton.Config] | None = None
    ) -> Any:
        """`triton.autotune` over the GPU configs, or over `configs` (the GPU check runs each alone).

        The tests pass a stand-in `do_bench` to run the autotuning path interpreted.
        """
        configs = list(configs) if configs is not None else self.configs
        prune_by = {"early_config_prune": self.prune} if self.prune is not None and len(configs) > 1 else None
        return triton.autotune(configs=configs, key=self.key, prune_configs_by=prune_by, do_bench=do_bench)(self.fn)

    def __getitem__(self, grid: Callable[[dict], tuple[int, ...]]) -> Callable[..., Any]:
        if self.tuned is not None:
            return self.tuned[grid]
        return functools.partial(self.fn[grid], **self.interpret_meta)


def prune_blocks(limits: dict[str, str]) -> Callable[..., list[triton.Config]]:
    """Drop configs whose block along a dimension is over twice that dimension (all padding, no work).

    `limits` maps a meta-parameter (e.g. "BLOCK_C") to the kernel argument bounding it (e.g. "E").
    Keeps at least one config (the smallest blocks) so tiny shapes still launch.
    """

    def prune(configs: list[triton.Config], named_args: dict, **kwargs: Any) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        kept = [
            c for c in configs
            if all(c.kwargs[m] <= max(16, 2 * int(args[a])) for m, a in limits.items() if m in c.kwargs)
        ]
        if kept:
            return kept
        return [min(configs, key=lambda c: sum(c.kwargs[m] for m in limits if m in c.kwargs))]

    return prune


def precision(dtype: torch.dtype) -> str:
    """Input precision of the dots whose operands are fp32 (the fp32 states and scaled operands).

    fp32 inputs keep full fp32 ("ieee") to match the reference; 16-bit inputs use tf32, whose
    10-bit mantissa is finer than their own and whose range is fp32's (fp16 would overflow).
    """
    return "ieee" if dtype == torch.float32 else "tf32"


def check_device(*tensors: torch.Tensor) -> None:
    """Fail clearly where a Triton kernel cannot run, instead of deep inside the launcher."""
    for t in tensors:
        if t.device.type != "cuda" and not INTERPRET:
            raise RuntimeError(
                f"Triton kernels need CUDA tensors (got {t.device}); on the CPU set TRITON_INTERPRET=1 "
                "before anything imports triton, or use kernels=reference"
            )


@functools.lru_cache(maxsize=None)
def _sm_count(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors on `device` (a nominal 8 for the interpreter, which has none)."""
    if device.type != "cuda":
        return 8
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


def rows_per_program(n: int, programs_per_row_block: int, device: torch.device, minimum: int = 64) -> int:
    """Rows each program of a split-N reduction covers, so the grid gives every SM ~2 programs.

    Fewer, longer programs write fewer fp32 partials; more programs fill the GPU when B·H is small.
    Rounded to a multiple of 128 so any BLOCK_N ≤ 128 tiles a split exactly.
    """
    if INTERPRET and INTERPRET_SPLIT_ROWS:
        return INTERPRET_SPLIT_ROWS
    want = max(1, -(-2 * sm_count(device) // max(1, programs_per_row_block)))
    splits = max(1, min(want, n // max(1, minimum)))
    rows = -(-n // splits)
    return max(128, -(-rows // 128) * 128)
