"""DiTill's data layer: shard writers and readers, precompute, and the resumable loader.

`build_loader(cfg, rank, world_size)` is the entry point the trainer uses; `DataConfig` is its
configuration (embedded as `cfg.data`); `digits_arrays()` gives the bundled digits as arrays.
"""
from data.config import DataConfig
from data.loader import DataError, Loader, build_loader
from data.sources import digits_arrays

__all__ = ["DataConfig", "DataError", "Loader", "build_loader", "digits_arrays"]
