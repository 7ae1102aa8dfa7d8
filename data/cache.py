"""A bounded local cache of whole shards, shared by every process on a node.

Remote shards are downloaded here, and compressed MDS shards are decompressed here (the dataset
itself is never written to). An entry is named by a digest of its location, written under a
temporary name and renamed when complete and verified, so a reader never sees half a shard; an
`flock` per entry makes the workers and ranks of a node download each shard once. When the cache
grows past its bound the least recently used entries go; a process that still has one mapped keeps
reading it (POSIX keeps an unlinked file alive while it is open), and one that needs it again
downloads it again — so a bound that is too small costs bandwidth, never correctness.
"""
from __future__ import annotations

import fcntl
import hashlib
import logging
import os
import tempfile
from contextlib import contextmanager
from typing import Callable, Iterator, Optional

from data.stores import Store

log = logging.getLogger("ditill.data")

PART = ".part-"


def default_cache_dir() -> str:
    return os.path.join(tempfile.gettempdir(), f"ditill-shards-{os.getuid()}")


@contextmanager
def _locked(path: str) -> Iterator[None]:
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


class ShardCache:
    """`fetch(location, store, ...)` → a local path holding the shard's (finished) bytes."""

    def __init__(self, root: Optional[str], limit_bytes: int):
        self.root = root or default_cache_dir()
        self.limit = int(limit_bytes)
        os.makedirs(self.root, exist_ok=True)

    def entry(self, location: str, suffix: str = "") -> str:
        digest = hashlib.sha1(location.encode("utf-8")).hexdigest()[:24]
        return os.path.join(self.root, f"{digest}-{os.path.basename(location)[:80]}{suffix}")

    def fetch(self, location: str, store: Store, *, size: Optional[int] = None, suffix: str = "",
              finish: Optional[Callable[[str, str], None]] = None) -> str:
        """Download `location` once per node. `finish(downloaded, out)` may verify and transform
        (e.g. decompress) the download into `out`; it raises to reject it (nothing is kept then)."""
        path = self.entry(location, suffix)
        if self._touch(path):
            return path
        os.makedirs(self.root, exist_ok=True)  # again: something may have cleaned it away
        with _locked(path + ".lock"):
            if self._touch(path):
                return path
            tmp = f"{path}{PART}{os.getpid()}"
            done = tmp + ".done"
            try:
                store.get(location, tmp, size)
                if finish is None:
                    os.replace(tmp, path)
                else:
                    finish(tmp, done)
                    os.replace(done, path)
            finally:
                for p in (tmp, done):
                    if os.path.exists(p):
                        os.remove(p)
        self._evict(keep=path)
        return path

    def _touch(self, path: str) -> bool:
        try:
            os.utime(path)  # recency for the LRU order
            return True
        except FileNotFoundError:
            return False

    def _evict(self, keep: str) -> None:
        with _locked(os.path.join(self.root, ".evict.lock")):
            entries = []
            for name in os.listdir(self.root):
                p = os.path.join(self.root, name)
                if name.startswith(".") or name.endswith(".lock") or PART in name:
                    continue
                try:
                    st = os.stat(p)
                except FileNotFoundError:
                    continue
                entries.append((st.st_mtime, st.st_size, p))
            total = sum(e[1] for e in entries)
            if total <= self.limit:
                return
            for _, size, p in sorted(entries):
                if p == keep:
                    continue
                for q in (p, p + ".lock"):
                    try:
                        os.remove(q)
                    except FileNotFoundError:
                        pass
                total -= size
                if total <= self.limit:
                    break
            if total > self.limit:
                log.warning("shard cache %s holds %.1f GB, above its bound of %.1f GB, after evicting all it could; "
                            "raise data.cache_gb (a block of shards of every stream a rank reads must fit)",
                            self.root, total / 1e9, self.limit / 1e9)

