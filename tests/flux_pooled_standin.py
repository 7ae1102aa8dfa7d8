"""`python -m tests.flux_pooled_standin CONFIG [overrides]`: `launch.train` with a stand-in CLIP pooled vector.

TEMPORARY, test-only. FLUX conditions on `text_pooled`, which the shard schema on this branch does not
carry yet (the text-data branch adds it). Until it lands, the FLUX training tests run the real trainer
through this wrapper, which adds `text_pooled` to every batch as a fixed function of `text_emb` (the
first POOLED_DIM channels of its token mean). Remove this file, and run `launch.train` directly with
shards that hold `text_pooled`, once the field exists.
"""
from __future__ import annotations

import sys
from typing import Any, Iterator

POOLED_DIM = 24  # the tiny FLUX test configs' vec_in_dim


class PooledStandIn:
    """A loader whose batches also hold `text_pooled`; everything else is the wrapped loader's."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)

    def __iter__(self) -> Iterator[dict]:
        for batch in self._loader:
            yield {**batch, "text_pooled": batch["text_emb"].float().mean(dim=1)[:, :POOLED_DIM].contiguous()}


def main(argv: list[str] | None = None) -> int:
    import trainer.loop as loop
    from launch import train

    build = loop.build_loader
    loop.build_loader = lambda cfg, rank, world: PooledStandIn(build(cfg, rank, world))
    return train.main(argv)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
