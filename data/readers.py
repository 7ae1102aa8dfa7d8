"""Random access to one shard's samples: webdataset tar, MDS, or the in-memory digits.

The loader plans an epoch as positions, so it reads samples by index, not by streaming a tar front
to back. A tar is indexed by scanning its headers once on open (no payload is read); a sample is
a view of its members. An MDS shard has an offset table in its header. Shards are memory-mapped
(private, copy-on-write, so arrays are writable and nothing is copied unless written) and reads
return views (`memoryview`, `np.frombuffer`): a large latent or embedding is copied once, from the
page cache straight into the batch. A map cannot fault past the end of a file that shrinks while
mapped, because every read first checks the file's current size.

Damage is reported, not raised through: a shard that cannot be opened raises `ShardError` (the
loader skips its samples); a sample that is truncated, incomplete or unparsable raises
`SampleError` with its reason.
"""
from __future__ import annotations

import json
import mmap
import os
import tarfile
from typing import Any, Callable, Optional, Protocol

import numpy as np

from data.schema import ARRAY_FIELDS, WDS_FIELD, SampleError, mds_decode_column, npy_array


class ShardError(Exception):
    """A shard that cannot be opened or indexed at all."""


class _MappedFile:
    """A read-only file mapped privately; `view` checks the size first (a shrunk file is truncation)."""

    def __init__(self, path: str):
        try:
            self.fd = os.open(path, os.O_RDONLY)
        except OSError as e:
            raise ShardError(f"cannot open {path}: {e.strerror or e}") from e
        self.size = os.fstat(self.fd).st_size
        try:
            self._map = mmap.mmap(self.fd, 0, access=mmap.ACCESS_COPY) if self.size else None
        except (OSError, ValueError) as e:
            os.close(self.fd)
            raise ShardError(f"cannot map {path}: {e}") from e
        self._view = memoryview(self._map) if self._map is not None else memoryview(b"")

    def view(self, begin: int, end: int) -> memoryview:
        if end > os.fstat(self.fd).st_size:
            raise SampleError("truncated", f"bytes [{begin}, {end}) lie beyond the end of the file: it is truncated or shrank")
        return self._view[begin:end]

    def close(self) -> None:
        os.close(self.fd)
        try:
            self._view.release()
            if self._map is not None:
                self._map.close()
        except BufferError:
            pass  # a caller still holds a view: the map closes when that view is gone


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
    """A webdataset tar indexed by its headers; `expected` is the manifest's (or a stats file's)
    sample count, None when nothing counted it; `ext_field` maps member extensions to fields."""

    def __init__(self, path: str, expected: Optional[int], ext_field: Optional[dict[str, str]] = None):
        self.path = path
        self.expected = expected
        ext_field = WDS_FIELD if ext_field is None else ext_field
        self.file = _MappedFile(path)
        size = self.file.size
        self.keys: list[str] = []
        self.members: list[dict[str, tuple[int, int]]] = []  # field → (offset, size)
        try:
            with open(path, "rb") as f, tarfile.open(fileobj=f, mode="r:") as tf:
                while True:
                    try:
                        m = tf.next()
                    except (tarfile.ReadError, EOFError, OSError):
                        break  # a cut header: what came before stands
                    if m is None:
                        break
                    if not m.isfile():
                        continue
                    if m.offset_data + m.size > size:  # a cut member: its sample is incomplete
                        if self.keys and _split_member(m.name)[0] == self.keys[-1]:
                            self.keys.pop()
                            self.members.pop()
                        break
                    key, ext = _split_member(m.name)
                    if not self.keys or self.keys[-1] != key:
                        self.keys.append(key)
                        self.members.append({})
                    field = ext_field.get(ext) or ext_field.get(ext.lower())
                    if field is not None and field not in self.members[-1]:  # first of the alternatives present wins
                        self.members[-1][field] = (m.offset_data, m.size)
        except (tarfile.TarError, OSError) as e:
            self.file.close()
            raise ShardError(f"cannot index {path} as a tar file: {type(e).__name__}: {e}") from e

    def read(self, index: int, fields: frozenset[str]) -> dict[str, Any]:
        if index >= len(self.keys):
            counted = "" if self.expected is None else f", its manifest counts {self.expected}"
            raise SampleError("truncated", f"the tar ends after {len(self.keys)} complete samples{counted}: the file is truncated")
        members = self.members[index]
        wanted = [(f, members[f]) for f in fields if f in members]
        out: dict[str, Any] = {"key": self.keys[index]}
        if not wanted:
            return out
        lo = min(off for _, (off, _) in wanted)
        hi = max(off + n for _, (off, n) in wanted)
        buf = self.file.view(lo, hi)
        for f, (off, n) in wanted:
            out[f] = _parse_wds(f, buf[off - lo:off - lo + n])
        return out

    def close(self) -> None:
        self.file.close()


def _parse_wds(field: str, data: memoryview) -> Any:
    try:
        if field == "image":
            return data
        if field in ARRAY_FIELDS:
            return npy_array(data)
        if field == "caption":
            return bytes(data).decode("utf-8")
        if field == "cls":
            return int(bytes(data).decode("ascii").strip())
        if field == "json":
            return json.loads(bytes(data).decode("utf-8"))
    except (ValueError, UnicodeDecodeError, SyntaxError, KeyError, TypeError) as e:
        raise SampleError("decode_error", f"field {field!r} cannot be parsed: {type(e).__name__}: {e}") from e
    raise KeyError(field)


class MdsShard:
    """An MDS shard: [n: u32][offsets: u32 × (n+1)][samples], columns as its index.json entry says.

    `rename` maps column names to DiTill fields (third-party sets); `decode` decodes one column.
    A shard without a `key` column keys its samples `<shard file>:<index>`.
    """

    def __init__(self, path: str, entry: dict[str, Any], rename: Optional[dict[str, str]] = None,
                 decode: Callable[[str, memoryview], Any] = mds_decode_column):
        self.path = path
        self.rename = rename or {}
        self.decode = decode
        self.names: list[str] = entry["column_names"]
        self.encodings: list[str] = entry["column_encodings"]
        self.sizes: list[int | None] = entry["column_sizes"]
        self.expected = int(entry["samples"])
        if entry.get("compression"):
            raise ShardError(f"{path}: compressed MDS shards ({entry['compression']}) are not supported; write them uncompressed")
        self.file = _MappedFile(path)
        size = self.file.size
        n = int(np.frombuffer(self.file.view(0, 4), np.uint32)[0]) if size >= 4 else -1
        if n != self.expected or size < 4 * (n + 2):
            self.file.close()
            raise ShardError(f"{path}: the MDS header is unreadable or counts {n} samples where index.json says "
                             f"{self.expected}; the shard is damaged, rewrite it")
        self._offsets = np.frombuffer(self.file.view(4, 4 * (n + 2)), np.uint32).astype(np.int64)

    def read(self, index: int, fields: frozenset[str]) -> dict[str, Any]:
        begin, end = int(self._offsets[index]), int(self._offsets[index + 1])
        if end < begin:
            raise SampleError("decode_error", f"MDS sample {index} has a corrupt offset table entry [{begin}, {end})")
        data = self.file.view(begin, end)
        try:
            pos, sizes = 0, []
            for size in self.sizes:
                if size is None:
                    size = int(np.frombuffer(data[pos:pos + 4], np.uint32)[0])
                    pos += 4
                sizes.append(size)
            out: dict[str, Any] = {}
            for name, enc, size in zip(self.names, self.encodings, sizes):
                field = self.rename.get(name, name)
                if (field == "key" or field in fields) and field not in out:
                    out[field] = self.decode(enc, data[pos:pos + size])
                pos += size
        except (ValueError, IndexError, KeyError, UnicodeDecodeError) as e:
            raise SampleError("decode_error", f"MDS sample {index} cannot be parsed: {type(e).__name__}: {e}") from e
        if pos != len(data):
            raise SampleError("decode_error", f"MDS sample {index}: columns span {pos} bytes of {len(data)}")
        out.setdefault("key", f"{os.path.basename(self.path)}:{index}")
        return out

    def close(self) -> None:
        self.file.close()


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
