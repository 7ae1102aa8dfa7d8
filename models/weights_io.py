"""Reading weight files of any family's formats into state dicts, safely, whole or lazily.

Family-agnostic: which file of a directory holds the weights, safetensors (single or sharded with an
index), pickles read with `torch.load(weights_only=True)` (nothing but tensors, containers and
`argparse.Namespace` — DiT's training checkpoints store their args that way — is ever unpickled),
training-checkpoint wrappers (`ema`/`model`, `state_dict`, `module`) and DDP/compile prefixes. A
family's converter then maps the names onto its own.

`lazy=True` reads no tensor data: safetensors tensors become `models.lazy.SafetensorsTensor` (slice
reads of the mapped file), pickles are loaded with `torch.load(weights_only=True, mmap=True)` (their storages map the
file: pages are read when touched and belong to the page cache, not to the process's anonymous
memory), so a rank reads only the rows it keeps.

Content digests (`weights_digest`, `file_digest`) are cached per file, keyed on its path, size, mtime
and inode, under `$DITILL_CACHE_DIR` (default `$XDG_CACHE_HOME/ditill`, else `~/.cache/ditill`):
hashing a 24 GB teacher once is enough.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import pickle
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import torch

from models.lazy import HeldTensor, SafetensorsFile

log = logging.getLogger("models.convert")

CONFIG_METADATA_KEY = "ditill.config"  # safetensors metadata: the model config as JSON
FAMILY_METADATA_KEY = "ditill.family"  # safetensors metadata: the family's name (absent in first-wave files: dit)
WRAPPER_KEYS = ("state_dict", "module")  # other trainers' wrappers (PixArt, DeepSpeed/DyDiT)
STRIP_PREFIXES = ("module.", "_orig_mod.", "model.diffusion_model.")  # DDP, torch.compile, ComfyUI-style FLUX files
DIFFUSERS_WEIGHTS = (
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "diffusion_pytorch_model.bin.index.json",
)


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or does not fit the model; the message names the path."""


def is_diffusers_state_dict(sd: Mapping[str, Any]) -> bool:
    """diffusers' transformers name their blocks `transformer_blocks.i` (all of DiT, PixArt, FLUX)."""
    return any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in sd) or "proj_out_2.weight" in sd


def weights_digest(path: str | os.PathLike, *, cache: bool = True) -> str:
    """sha256 of a safetensors file's tensors (name, dtype, shape, bytes) and metadata, in sorted order.

    Not the file's own hash: safetensors writes its metadata map in a per-process random order, so
    exporting the same checkpoint twice gives different bytes for the same weights. Cached (see the
    module docstring) unless `cache=False`.
    """
    return file_digest(path, "content", cache=cache)


def file_digest(path: str | os.PathLike, kind: str = "bytes", *, cache: bool = True) -> str:
    """sha256 of a file: "bytes" (its bytes) or "content" (a safetensors file's tensors and metadata),
    read from the digest cache when path, size, mtime and inode still match, else computed and stored."""
    if kind not in ("bytes", "content"):
        raise ValueError(f"kind={kind!r}; use 'bytes' or 'content'")
    p = Path(path).resolve()
    compute = (lambda: _content_digest(p)) if kind == "content" else (lambda: _bytes_digest(p))
    return cached_digest(str(p), kind, [p], compute, cache=cache)


def cached_digest(key: str, kind: str, files: list[Path], compute: Callable[[], str], *, cache: bool = True) -> str:
    """`compute()` once per state of `files`: the result is stored under (key, kind) with each file's
    path, size, mtime and inode, and read back while they all match (a rewrite, even of the same size,
    gets a new inode or mtime and is recomputed)."""
    stamps = [_stamp(f) for f in files]
    entry = _cache_entry(key, kind) if cache else None
    if entry is not None:
        try:
            saved = json.loads(entry.read_text())
            if saved.get("key") == key and saved.get("files") == stamps and isinstance(saved.get("digest"), str):
                return saved["digest"]
        except (OSError, ValueError):
            pass  # missing or unreadable: recompute
    digest = compute()
    if entry is not None:
        _write_entry(entry, {"key": key, "kind": kind, "files": stamps, "digest": digest})
    return digest


def _stamp(f: Path) -> dict[str, Any]:
    st = f.stat()
    return {"path": str(f), "size": st.st_size, "mtime_ns": st.st_mtime_ns, "inode": st.st_ino}


def digest_cache_dir() -> Path:
    """Where digests are cached: $DITILL_CACHE_DIR, else $XDG_CACHE_HOME/ditill, else ~/.cache/ditill."""
    if os.environ.get("DITILL_CACHE_DIR"):
        return Path(os.environ["DITILL_CACHE_DIR"])
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "ditill"


def _cache_entry(key: str, kind: str) -> Path:
    name = hashlib.sha256(f"{key}\0{kind}".encode()).hexdigest()[:32]
    return digest_cache_dir() / "digests" / f"{name}.json"


def _write_entry(entry: Path, record: dict[str, Any]) -> None:
    """Atomically (temp file, then rename); a cache that cannot be written only costs a recomputation."""
    try:
        entry.parent.mkdir(parents=True, exist_ok=True)
        tmp = entry.with_name(f"{entry.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record, sort_keys=True))
        os.replace(tmp, entry)
    except OSError as e:
        log.warning("cannot write the digest cache %s (%s); set DITILL_CACHE_DIR to a writable directory", entry, e)


def _content_digest(p: Path) -> str:
    from safetensors import safe_open

    h = hashlib.sha256()
    with safe_open(str(p), framework="pt") as f:
        h.update(json.dumps(f.metadata() or {}, sort_keys=True).encode())
        for key in sorted(f.keys()):
            t = f.get_tensor(key).contiguous()
            h.update(f"{key}:{t.dtype}:{tuple(t.shape)}".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _bytes_digest(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as fh:
        while block := fh.read(1 << 22):
            h.update(block)
    return h.hexdigest()


@dataclass
class RawWeights:
    """A weights file as read, before any family maps its names (values: tensors, or lazy tensors of
    `models.lazy` when read with `lazy=True`; a converter handles both through the `models.lazy` helpers).

    `ours`: our config from the safetensors metadata (then the names are already ours) and `family`
    the family named there (first-wave files have a config but no family: DiT). `diffusers_config`:
    a diffusers `config.json` (in the directory, or beside a file of diffusers names).
    """

    state_dict: dict[str, torch.Tensor]
    format: str  # "safetensors" (ours) | "official" | "diffusers"
    source: str
    ours: dict | None = None
    family: str | None = None
    diffusers_config: dict | None = None


def read_any(path: str | os.PathLike, prefer: str = "ema", *, lazy: bool = False) -> RawWeights:
    """Read a file or diffusers directory of any supported format (see the module docstring).

    `lazy=True`: the state dict holds lazy tensors (`models.lazy`) and no tensor data is read."""
    if prefer not in ("ema", "model"):
        raise ValueError(f"prefer={prefer!r}; use 'ema' or 'model'")
    p = Path(path)
    source = str(p)
    if not p.exists():
        raise FileNotFoundError(
            f"checkpoint not found: {source} (pass a .pt/.pth/.bin/.safetensors file or a diffusers directory)"
        )
    if p.is_dir():
        sd, diff_cfg = read_diffusers_dir(p, lazy)
        return RawWeights(sd, "diffusers", source, diffusers_config=diff_cfg)
    if p.suffix == ".safetensors":
        sd, meta = read_safetensors(p, lazy)
        raw = meta.get(CONFIG_METADATA_KEY)
        if raw is not None:
            try:
                ours = json.loads(raw)
            except json.JSONDecodeError as e:
                raise CheckpointError(f"{p}: metadata {CONFIG_METADATA_KEY!r} is not valid JSON: {e}") from e
            return RawWeights(sd, "safetensors", source, ours=ours, family=meta.get(FAMILY_METADATA_KEY, "dit"))
        sd = strip_prefixes(sd)
    else:
        sd = read_pickle(p, prefer, lazy)
    fmt = "diffusers" if is_diffusers_state_dict(sd) else "official"
    return RawWeights(sd, fmt, source, diffusers_config=sibling_diffusers_config(p) if fmt == "diffusers" else None)


def read_diffusers_dir(d: Path, lazy: bool = False) -> tuple[dict[str, Any], dict]:
    """(state dict, config.json) of a diffusers model directory, or of a pipeline's `transformer/`."""
    if (d / "model_index.json").is_file() and (d / "transformer").is_dir():
        d = d / "transformer"  # a pipeline directory
    cfg_path = d / "config.json"
    weights = next((d / n for n in DIFFUSERS_WEIGHTS if (d / n).is_file()), None)
    if not cfg_path.is_file() or weights is None:
        found = sorted(x.name for x in d.iterdir())[:10]
        raise CheckpointError(
            f"{d}: not a diffusers model directory (needs config.json and one of {list(DIFFUSERS_WEIGHTS)}; "
            f"found {found}). Variant files (e.g. *.fp16.safetensors) must be renamed or converted first."
        )
    try:
        diff_cfg = json.loads(cfg_path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg_path}: unreadable config.json: {e}") from e
    if weights.name.endswith(".index.json"):
        sd = read_sharded(weights, lazy)
    elif weights.suffix == ".safetensors":
        sd = read_safetensors(weights, lazy)[0]
    else:
        sd = read_pickle(weights, "ema", lazy)
    return sd, diff_cfg


def read_sharded(index: Path, lazy: bool = False) -> dict[str, Any]:
    """Every shard an index lists (lazily: each tensor reads from its own shard file)."""
    try:
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise CheckpointError(f"{index}: unreadable shard index: {e}") from e
    sd: dict[str, Any] = {}
    for name in shards:
        shard = index.parent / name
        if not shard.is_file():
            raise FileNotFoundError(f"checkpoint shard not found: {shard} (listed in {index})")
        if shard.suffix == ".safetensors":
            sd.update(read_safetensors(shard, lazy)[0])
        else:
            sd.update(hold(torch_load(shard, mmap=lazy)) if lazy else torch_load(shard))
    return sd


def sibling_diffusers_config(p: Path) -> dict | None:
    cfg = p.parent / "config.json"
    if not cfg.is_file():
        return None
    try:
        return json.loads(cfg.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{cfg}: unreadable config.json beside {p.name}: {e}") from e


def read_safetensors(p: Path, lazy: bool = False) -> tuple[dict[str, Any], dict[str, str]]:
    """(tensors, metadata); lazily, slice-readable tensors of the mapped file and no data read."""
    from safetensors import safe_open

    try:
        if lazy:
            f = SafetensorsFile(str(p))
            return f.tensors(), f.metadata()
        with safe_open(str(p), framework="pt", device="cpu") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except Exception as e:  # safetensors raises its own error types for corrupt headers
        raise CheckpointError(f"{p}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def read_safetensors_metadata(p: Path) -> dict[str, str]:
    """The header's metadata only (no tensor read)."""
    try:
        return SafetensorsFile(str(p)).metadata()
    except Exception as e:
        raise CheckpointError(f"{p}: unreadable safetensors file ({type(e).__name__}: {e})") from e


def read_pickle(p: Path, prefer: str, lazy: bool) -> dict[str, Any]:
    """The state dict of a pickled checkpoint; lazily, tensors that map the file (`torch.load(weights_only=True, mmap=True)`)."""
    if not lazy:
        return unwrap(torch_load(p), prefer, str(p))
    return hold(unwrap(torch_load(p, mmap=True), prefer, str(p)))


def hold(sd: Mapping[str, torch.Tensor]) -> dict[str, HeldTensor]:
    return {k: HeldTensor(v) for k, v in sd.items()}


def torch_load(p: Path, mmap: bool = False) -> Any:
    """weights_only=True: tensors, containers and primitives only; code is never executed.

    `mmap=True` maps the file instead of reading it; a file in the legacy (pre-zip) format cannot be
    mapped and is read whole, with a warning."""
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            if mmap:
                try:
                    return torch.load(str(p), map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as e:
                    if "mmap" not in str(e):
                        raise
                    log.warning("%s: a legacy (non-zip) torch file cannot be memory-mapped; reading it whole "
                                "(convert it once with python -m launch.convert)", p)
            return torch.load(str(p), map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        msg = str(e)
        if "Unsupported global" in msg:  # a class or function the file would import and call
            m = re.search(r"GLOBAL (\S+)", msg)
            what = f" (it contains {m.group(1)})" if m else ""
            raise CheckpointError(
                f"{p}: refused to unpickle objects other than tensors{what}; weights are only read with "
                "torch.load(weights_only=True). Re-save a plain state dict (torch.save(model.state_dict())) "
                "or safetensors from a trusted environment."
            ) from e
        m = re.search(r"WeightsUnpickler error:\s*(.+)", msg, re.S)  # torch's wording for bad opcodes
        detail = m.group(1).strip().splitlines()[0] if m else msg.splitlines()[0]
        raise CheckpointError(f"{p}: unreadable checkpoint (corrupt pickle: {detail})") from e
    except Exception as e:  # truncated zip, wrong format, …
        first = str(e).splitlines()[0] if str(e) else ""
        raise CheckpointError(f"{p}: unreadable checkpoint ({type(e).__name__}: {first})") from e


def unwrap(obj: Any, prefer: str, source: str) -> dict[str, torch.Tensor]:
    """The state dict inside a training checkpoint: `{"model", "ema", ...}` or other wrappers."""
    for _ in range(3):
        if not isinstance(obj, Mapping):
            break
        if "ema" in obj or "model" in obj:
            key = prefer if prefer in obj else ("model" if "model" in obj else "ema")
            if key != prefer:
                log.warning("%s: no %r weights, using %r", source, prefer, key)
            obj = obj[key]
        elif any(k in obj for k in WRAPPER_KEYS) and not all(torch.is_tensor(v) for v in obj.values()):
            obj = obj[next(k for k in WRAPPER_KEYS if k in obj)]
        else:
            break
    if not isinstance(obj, Mapping) or not obj:
        raise CheckpointError(f"{source}: no state dict found (got {type(obj).__name__})")
    bad = [k for k, v in obj.items() if not torch.is_tensor(v)]
    if bad:
        raise CheckpointError(f"{source}: entries that are not tensors: {few(bad)}; not a state dict")
    return strip_prefixes(dict(obj))


def strip_prefixes(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    for prefix in STRIP_PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


def few(items: list[str], n: int = 5) -> str:
    return ", ".join(items[:n]) + (f" (+{len(items) - n} more)" if len(items) > n else "")


def config_fields(raw: RawWeights, sd: Mapping[str, torch.Tensor], overrides: Mapping[str, Any],
                  from_diffusers, infer) -> dict[str, Any]:
    """A family's config fields for a file: our metadata as saved, else inferred from the (renamed) tensor
    shapes by `infer(sd, known, source)`, where a diffusers config.json (`from_diffusers(cfg, source)`)
    and explicit overrides are known; overrides win everywhere."""
    if raw.ours is not None:
        return {**raw.ours, **overrides}
    base = from_diffusers(raw.diffusers_config, raw.source) if raw.diffusers_config is not None else {}
    return infer(sd, {**base, **overrides}, raw.source)


def key_problems(sd: Mapping[str, torch.Tensor], expected: Mapping[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(lines naming the missing, unexpected and mis-shaped keys of `sd` against `expected` shapes — empty
    when it fits —, the unexpected keys)."""
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    shapes = [f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
              for k in sorted(set(sd) & set(expected)) if tuple(sd[k].shape) != tuple(expected[k])]
    lines = [f"{name} ({len(keys)}): {few(keys)}" for name, keys in
             (("missing", missing), ("unexpected", unexpected), ("shape mismatch", shapes)) if keys]
    return lines, unexpected
