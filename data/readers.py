"""Random access to one shard's samples: webdataset tar, MDS, or the in-memory digits.

The loader plans an epoch as positions, so it reads samples by index, not by streaming a tar front
to back. A tar is indexed by scanning its headers once on open (no payload is read); a sample is
then one `preadv` of its members. An MDS shard has an offset table in its header. Each reader reads
into one reused buffer and returns zero-copy views of it (`memoryview`, `np.frombuffer`), so a
large latent or embedding is copied once, into the batch — the views are valid until the reader's
next read.

Damage is reported, not raised through: a shard that cannot be opened raises `ShardError` (the
loader skips its samples); a sample that is truncated, incomplete or unparsable raises
`SampleError` with its reason.
"""
from __future__ import annotations

import json
import os
import tarfile
from typing import Any, Protocol

import numpy as np

from data.schema import WDS_FIELD, SampleError, mds_decode_column, npy_array


class ShardError(Exception):
    """A shard that cannot be opened or indexed at all."""


class _Scratch:
    """One growing read buffer; a new one replaces it when too small (old views stay valid)."""

    def __init__(self) -> None:
        self.buf = bytearray()

    def pread(self, fd: int, size: int, offset: int) -> memoryview:
        if len(self.buf) < size:
            self.buf = bytearray(max(size, 2 * len(self.buf)))
        view = memoryview(self.buf)[:size]
        return view[: os.preadv(fd, [view], offset)]


class ShardReader(Protocol):
    path: str

    def read(self, index: int, fields: frozenset[str]) -> dict[str, Any]: ...

    def close(self) -> None: ...


def _split_member(name: str) -> tuple[str, str]:
    """webdataset's rule: the key is the path up to the first dot of the basename."""
    slash = name.rfind("/") + 1
    dot = name.find(".", slash)
    return (name, "") if dot < 0 else (name[:dot], name[dot + 1:])


class WdsShard:
    """A webdataset tar indexed by its headers; `expected` is the manifest's sample count."""

    def __init__(self, path: str, expected: int):
        self.path = path
        self.expected = expected
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"cannot open {path}: {e.strerror or e}") from e
        size = os.fstat(self._fd).st_size
        self.keys: list[str] = []
        self.members: list[dict[str, tuple[int, int]]] = []  # field → (offset, size)
        self.truncated_from = None  # first sample index lost to truncation
        self._scratch = _Scratch()
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                while True:
                    try:
                        m = tf.next()
                    except (tarfile.ReadError, EOFError, OSError):
                        self._truncate()
                        break
                    if m is None:
                        break
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:
                        self._truncate(partial=True)
                        break
                    key, ext = _split_member(m.name)
                    if not self.keys or self.keys[-1] != key:
                        self.keys.append(key)
                        self.members.append({})
                    if ext in WDS_FIELD:
                        self.members[-1][WDS_FIELD[ext]] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            os.close(self._fd)
            raise ShardError(f"cannot index {path} as a tar file: {type(e).__name__}: {e}") from e
        if len(self.keys) < expected and self.truncated_from is None:
            self.truncated_from = len(self.keys)

    def _truncate(self, partial: bool = False) -> None:
        # A sample whose members were cut off is incomplete even if some members survived.
        if partial and self.keys:
            self.keys.pop()
            self.members.pop()
        self.truncated_from = len(self.keys)

    def read(self, index: int, fields: frozenset[str]) -> dict[str, Any]:
        if index >= len(self.keys):
            raise SampleError("truncated", f"the tar ends after {len(self.keys)} complete samples, its manifest counts "
                                           f"{self.expected}: the file is truncated")
        members = self.members[index]
        wanted = [(f, members[f]) for f in fields if f in members]
        out: dict[str, Any] = {"key": self.keys[index]}
        if not wanted:
            return out
        lo = min(off for _, (off, _) in wanted)
        hi = max(off + n for _, (off, n) in wanted)
        buf = self._scratch.pread(self._fd, hi - lo, lo)
        if len(buf) < hi - lo:
            raise SampleError("truncated", f"read {len(buf)} of {hi - lo} bytes: the file shrank or is truncated")
        for f, (off, n) in wanted:
            out[f] = _parse_wds(f, buf[off - lo:off - lo + n])
        return out

    def close(self) -> None:
        os.close(self._fd)


def _parse_wds(field: str, data: memoryview) -> Any:
    try:
        if field == "image":
            return data
        if field in ("latent", "text_emb", "text_mask"):
            return npy_array(data)
        if field == "caption":
            return bytes(data).decode("utf-8")
        if field == "cls":
            return int(bytes(data).decode("ascii").strip())
        if field == "json":
            return json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, SyntaxError) as e:
        raise SampleError("decode_error", f"field {field!r} cannot be parsed: {e}") from e
    raise KeyError(field)


class MdsShard:
    """An MDS shard: [n: u32][offsets: u32 × (n+1)][samples], columns as its index.json entry says."""

    def __init__(self, path: str, entry: dict[str, Any]):
        self.path = path
        self.names: list[str] = entry["column_names"]
        self.encodings: list[str] = entry["column_encodings"]
        self.sizes: list[int | None] = entry["column_sizes"]
        self.expected = int(entry["samples"])
        if entry.get("compression"):
            raise ShardError(f"{path}: compressed MDS shards ({entry['compression']}) are not supported; write them uncompressed")
        try:
            self._fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"cannot open {path}: {e.strerror or e}") from e
        self._size = os.fstat(self._fd).st_size
        self._scratch = _Scratch()
        head = os.pread(self._fd, 4, 0)
        n = int(np.frombuffer(head, np.uint32)[0]) if len(head) == 4 else -1
        table = os.pread(self._fd, 4 * (n + 1), 4) if n >= 0 else b""
        if n != self.expected or len(table) != 4 * (n + 1):
            os.close(self._fd)
            raise ShardError(f"{path}: the MDS header is unreadable or counts {n} samples where index.json says "
                             f"{self.expected}; the shard is damaged, rewrite it")
        self._offsets = np.frombuffer(table, np.uint32).astype(np.int64)

    def read(self, index: int, fields: frozenset[str]) -> dict[str, Any]:
        begin, end = int(self._offsets[index]), int(self._offsets[index + 1])
        if end > self._size or end < begin:
            raise SampleError("truncated", f"sample bytes [{begin}, {end}) lie beyond the end of the {self._size}-byte "
                                           "file: the shard is truncated")
        data = self._scratch.pread(self._fd, end - begin, begin)
        if len(data) < end - begin:
            raise SampleError("truncated", f"read {len(data)} of {end - begin} bytes: the file shrank or is truncated")
        try:
            pos, sizes = 0, []
            for size in self.sizes:
                if size is None:
                    size = int(np.frombuffer(data[pos:pos + 4], np.uint32)[0])
                    pos += 4
                sizes.append(size)
            out: dict[str, Any] = {}
            for name, enc, size in zip(self.names, self.encodings, sizes):
                if name == "key" or name in fields:
                    out[name] = mds_decode_column(enc, data[pos:pos + size])
                pos += size
        except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise SampleError("decode_error", f"MDS sample {index} cannot be parsed: {type(e).__name__}: {e}") from e
        if pos != len(data):
            raise SampleError("decode_error", f"MDS sample {index}: columns span {pos} bytes of {len(data)}")
        return out

    def close(self) -> None:
        os.close(self._fd)


class MemoryShard:
    """The bundled digits as one in-memory 'shard' (8-bit pixels, labels, captions)."""

    path = "<digits in memory>"

    def __init__(self, pixels: np.ndarray, labels: np.ndarray):
        self.pixels, self.labels = pixels, labels

    def read(self, index: int, fields: frozenset[str]) -> dict[str, Any]:
        from data.sources import digit_caption

        label = int(self.labels[index])
        return {"key": f"{index:05d}", "image": self.pixels[index], "cls": label, "caption": digit_caption(label)}

    def close(self) -> None:
        pass
