"""`engine.compile: true` compiles each student block with torch.compile; outputs and gradients
match eager execution (a few float32 ulps: inductor fuses and reorders elementwise work)."""
import copy

import torch

from tests.helpers import randomize_, tiny, tiny_inputs
from trainer.config import EngineConfig
from trainer.parallelize import apply_compile


def test_compiled_blocks_match_eager_forward_and_backward(tmp_path, monkeypatch):
    import torch._inductor.config as inductor_config

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))
    monkeypatch.setattr(inductor_config, "fallback_random", True)  # the routers' Gumbel noise as in eager
    eager = randomize_(tiny("dylit-s/2", depth=1), seed=1).train()
    compiled = copy.deepcopy(eager)
    apply_compile(compiled, EngineConfig(compile=True))
    assert list(dict(compiled.named_parameters())) == list(dict(eager.named_parameters()))  # names unchanged
    x, t, y = tiny_inputs()
    outs = []
    for model in (eager, compiled):
        torch.manual_seed(0)  # same router noise
        out = model(x, t, y)
        out.square().mean().backward()
        outs.append(out)
    torch.testing.assert_close(outs[1], outs[0], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(eager.named_parameters(), compiled.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-5, msg=lambda m: f"{name}: {m}")
