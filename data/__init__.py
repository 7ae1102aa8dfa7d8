"""DiTill's data layer: shard writers and readers, precompute, and the resumable loader.

`build_loader(cfg, rank, world_size)` is the entry point the trainer uses; `DataConfig` is its
configuration (embedded as `cfg.data`); `merge_rank_states` joins every old rank's loader state for a
resume on another world size; `digits_arrays()` gives the bundled digits as arrays.
For text-conditioned shards, `load_null_text(dir)` gives the null caption the models' buffers take
(T5("") at full length, + CLIP's pooled vector) and `load_prompt_embeddings(dir)` the encoded
evaluation prompts (`prompts.jsonl` rows, held-out templates marked); both None when absent.
"""
from data.config import DataConfig
from data.loader import DataError, Loader, build_loader
from data.sources import digits_arrays
from data.stream_loader import StreamLoader, merge_rank_states
from data.stores import StorageError
from data.text_files import load_null_text, load_prompt_embeddings

__all__ = ["DataConfig", "DataError", "Loader", "StorageError", "StreamLoader", "build_loader", "digits_arrays",
           "load_null_text", "load_prompt_embeddings", "merge_rank_states"]
