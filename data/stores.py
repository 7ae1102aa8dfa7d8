"""Where shard bytes live: a local path, `s3://`, `gs://` or `http(s)://`, behind one small interface.

Each backend maps its SDK's failures onto three outcomes, because they call for different actions:
- `Missing`: the object is not there (a shard that is gone is skipped and counted, like a damaged one);
- `StorageError`: nothing will work until a person acts (no such bucket, no credentials, access
  denied, retries exhausted) — raised through, so a run stops with the cause and the fix, never an
  empty epoch;
- anything transient (5xx, throttling, a connection reset or a body cut short) is retried here with
  exponential back-off, and a download resumes from the last piece it has (GCS: from the start of
  the ranged request, 8 MB).

SDKs, not fsspec: s3fs needs aiobotocore, whose newest release (3.10) pins botocore < 1.43.118
while the verified set pins 1.44.5; gcsfs ≥ 2026.1 needs google-cloud-storage ≥ 3.11 while
mosaicml-streaming pins < 3.3. boto3 and google-cloud-storage are already in that set, and
urllib is the standard library. S3-compatible servers are reached through boto3's own
`AWS_ENDPOINT_URL` (or `AWS_ENDPOINT_URL_S3`); a GCS emulator through `STORAGE_EMULATOR_HOST`.
"""
from __future__ import annotations

import logging
import os
import random
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Optional, TypeVar
from urllib.parse import urlparse

log = logging.getLogger("ditill.data")

CHUNK = 8 << 20  # bytes per ranged request of a download
PIECE = 256 << 10  # bytes per read of a response body: a dropped connection loses at most this much
T = TypeVar("T")


class StorageError(RuntimeError):
    """Storage that cannot be read until a person acts: the message names the cause and the fix."""


class Missing(FileNotFoundError):
    """The object does not exist (the bucket or server does)."""


class Transient(Exception):
    """A failure worth retrying (5xx, throttling, a dropped connection, a short body)."""


@dataclass(frozen=True)
class RetryPolicy:
    retries: int = 8
    first_wait_s: float = 0.5
    max_wait_s: float = 30.0

    def run(self, what: str, fn: Callable[[], T]) -> T:
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except Transient as e:
                if attempt == self.retries:
                    raise StorageError(f"{what} failed after {self.retries + 1} attempts; the last error: {e}. Check the "
                                       "network and the storage service, then relaunch (the run resumes), or raise "
                                       "data.retries") from e
                wait = min(self.max_wait_s, self.first_wait_s * 2 ** attempt) * (0.5 + random.random() / 2)
                log.warning("%s: %s; retry %d/%d in %.1f s", what, e, attempt + 1, self.retries, wait)
                time.sleep(wait)
        raise AssertionError("unreachable")


def is_remote(location: str) -> bool:
    return "://" in location and not location.startswith("file://")


def local_path(location: str) -> str:
    return location[len("file://"):] if location.startswith("file://") else location


def join(base: str, name: str) -> str:
    return f"{base.rstrip('/')}/{name}" if is_remote(base) else os.path.join(local_path(base), name)


def dirname(location: str) -> str:
    return location.rsplit("/", 1)[0] if is_remote(location) else os.path.dirname(local_path(location))


class Store:
    """Read access to one kind of location. `get` downloads to a file, resuming after a drop."""

    scheme = ""

    def __init__(self, policy: RetryPolicy):
        self.policy = policy

    # backends implement these four; each raises Missing, StorageError or Transient
    def _list(self, prefix: str) -> list[tuple[str, int]]:
        raise NotImplementedError

    def _size(self, url: str) -> int:
        raise NotImplementedError

    def _chunks(self, url: str, start: int, end: int) -> Iterator[bytes]:
        raise NotImplementedError

    def list(self, prefix: str) -> list[tuple[str, int]]:
        """(full location, size) of every object directly under `prefix` (a "directory"), sorted."""
        return self.policy.run(f"listing {prefix}", lambda: sorted(self._list(prefix)))

    def size(self, url: str) -> int:
        return self.policy.run(f"reading the size of {url}", lambda: self._size(url))

    def read(self, url: str) -> bytes:
        """A small object whole (stats files, index.json)."""
        size = self.size(url)
        parts: list[bytes] = []
        self._fill(url, 0, size, parts.append)
        return b"".join(parts)

    def get(self, url: str, dst: str, size: Optional[int] = None) -> int:
        """Download `url` to `dst` in ranged chunks; a chunk cut short resumes where it stopped."""
        size = self.size(url) if size is None else size
        with open(dst, "wb") as f:
            for start in range(0, size, CHUNK):
                self._fill(url, start, min(size, start + CHUNK), f.write)
        return size

    def _fill(self, url: str, start: int, end: int, sink: Callable[[bytes], Any]) -> None:
        pos = [start]

        def attempt() -> None:
            for piece in self._chunks(url, pos[0], end):
                sink(piece)
                pos[0] += len(piece)
            if pos[0] != end:
                raise Transient(f"the body ended at byte {pos[0]} of [{start}, {end})")

        self.policy.run(f"reading {url}", attempt)


class LocalStore(Store):
    scheme = "file"

    def _list(self, prefix: str) -> list[tuple[str, int]]:
        root = local_path(prefix)
        if not os.path.isdir(root):
            raise StorageError(f"{root!r} does not exist or is not a directory; fix data.path")
        return [(os.path.join(root, n), os.path.getsize(os.path.join(root, n))) for n in os.listdir(root)
                if os.path.isfile(os.path.join(root, n))]

    def _size(self, url: str) -> int:
        try:
            return os.path.getsize(local_path(url))
        except FileNotFoundError as e:
            raise Missing(f"{url} does not exist") from e

    def _chunks(self, url: str, start: int, end: int) -> Iterator[bytes]:
        with open(local_path(url), "rb") as f:
            f.seek(start)
            while start < end:
                piece = f.read(min(PIECE, end - start))
                if not piece:
                    return
                start += len(piece)
                yield piece


def _bucket_key(url: str) -> tuple[str, str]:
    u = urlparse(url)
    return u.netloc, u.path.lstrip("/")


class S3Store(Store):
    scheme = "s3"
    _TRANSIENT = {"500", "502", "503", "504", "InternalError", "ServiceUnavailable", "SlowDown", "RequestTimeout",
                  "Throttling", "ThrottlingException", "RequestTimeTooSkewed"}
    _DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled",
               "ExpiredToken", "InvalidToken", "AccountProblem"}

    def __init__(self, policy: RetryPolicy):
        super().__init__(policy)
        self._client: Any = None
        self._key: Any = None

    @property
    def client(self) -> Any:
        key = (os.getpid(), *(os.environ.get(v) for v in ("AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID",
                                                          "AWS_PROFILE", "AWS_SHARED_CREDENTIALS_FILE")))
        if self._client is None or self._key != key:  # boto3 clients do not survive a fork
            import boto3
            from botocore.config import Config

            # Our own retries (with resume) replace botocore's, so every attempt is visible here.
            self._client = boto3.session.Session().client(
                "s3", config=Config(retries={"max_attempts": 1, "mode": "standard"}, connect_timeout=20, read_timeout=60))
            self._key = key
        return self._client

    def _call(self, url: str, fn: Callable[[], T]) -> T:
        from botocore.exceptions import (BotoCoreError, ClientError, NoCredentialsError, PartialCredentialsError)

        bucket = _bucket_key(url)[0]
        try:
            return fn()
        except (NoCredentialsError, PartialCredentialsError) as e:
            raise StorageError(f"no AWS credentials to read {url}: set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or "
                               "AWS_PROFILE, or run where an instance role provides them") from e
        except ClientError as e:
            err = e.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = str(e.response.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))
            if code == "NoSuchBucket":
                raise StorageError(f"bucket {bucket!r} does not exist (reading {url}); fix data.path, or set "
                                   "AWS_ENDPOINT_URL if it lives on an S3-compatible server") from e
            if code in self._DENIED or status == "403":
                raise StorageError(f"access denied to {url} ({code or status}): the credentials in use may not read "
                                   f"bucket {bucket!r}; grant s3:GetObject and s3:ListBucket, or use other credentials") from e
            if code in ("NoSuchKey", "404", "NotFound") or status == "404":
                raise Missing(f"{url} does not exist") from e
            if code in self._TRANSIENT or status.startswith("5") or status == "429":
                raise Transient(f"{code or status}: {err.get('Message', '')}") from e
            raise StorageError(f"reading {url} failed: {code or status}: {err.get('Message', e)}") from e
        except BotoCoreError as e:  # connection errors, timeouts, a body cut short
            raise Transient(f"{type(e).__name__}: {e}") from e
        except OSError as e:
            raise Transient(f"{type(e).__name__}: {e}") from e

    def _list(self, prefix: str) -> list[tuple[str, int]]:
        bucket, key = _bucket_key(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def pages() -> list[tuple[str, int]]:
            out = []
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key, Delimiter="/"):
                out += [(f"s3://{bucket}/{o['Key']}", int(o["Size"])) for o in page.get("Contents", [])]
            return out

        return self._call(prefix, pages)

    def _size(self, url: str) -> int:
        bucket, key = _bucket_key(url)
        return int(self._call(url, lambda: self.client.head_object(Bucket=bucket, Key=key))["ContentLength"])

    def _chunks(self, url: str, start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return
        bucket, key = _bucket_key(url)
        body = self._call(url, lambda: self.client.get_object(Bucket=bucket, Key=key, Range=f"bytes={start}-{end - 1}"))["Body"]
        try:
            while True:
                piece = self._call(url, lambda: body.read(PIECE))
                if not piece:
                    return
                yield piece
        finally:
            body.close()


class GcsStore(Store):
    scheme = "gs"

    def __init__(self, policy: RetryPolicy):
        super().__init__(policy)
        self._client: Any = None
        self._key: Any = None

    @property
    def client(self) -> Any:
        key = (os.getpid(), os.environ.get("STORAGE_EMULATOR_HOST"))
        if self._client is None or self._key != key:
            from google.cloud import storage

            if os.environ.get("STORAGE_EMULATOR_HOST"):
                from google.auth.credentials import AnonymousCredentials

                self._client = storage.Client(credentials=AnonymousCredentials(), project="ditill-emulator")
            else:
                self._client = storage.Client()
            self._key = key
        return self._client

    def _call(self, url: str, fn: Callable[[], T]) -> T:
        import requests
        from google.api_core import exceptions as gex
        from google.auth.exceptions import DefaultCredentialsError, TransportError

        bucket = _bucket_key(url)[0]
        try:
            return fn()
        except DefaultCredentialsError as e:
            raise StorageError(f"no Google Cloud credentials to read {url}: set GOOGLE_APPLICATION_CREDENTIALS to a key "
                               "file, or run `gcloud auth application-default login`") from e
        except (gex.Forbidden, gex.Unauthorized) as e:
            raise StorageError(f"access denied to {url}: the credentials in use may not read bucket {bucket!r}; grant "
                               "roles/storage.objectViewer, or use other credentials") from e
        except gex.NotFound as e:
            if "bucket" in str(e).lower() and "object" not in str(e).lower():
                raise StorageError(f"bucket {bucket!r} does not exist (reading {url}); fix data.path") from e
            raise Missing(f"{url} does not exist") from e
        except (gex.TooManyRequests, gex.ServerError, gex.RetryError, TransportError) as e:
            raise Transient(f"{type(e).__name__}: {e}") from e
        except (requests.exceptions.RequestException, OSError) as e:
            raise Transient(f"{type(e).__name__}: {e}") from e

    def _bucket(self, url: str) -> Any:
        return self.client.bucket(_bucket_key(url)[0])

    def _list(self, prefix: str) -> list[tuple[str, int]]:
        bucket, key = _bucket_key(prefix)
        key = key.rstrip("/") + "/" if key else ""

        def blobs() -> list[tuple[str, int]]:
            if not self.client.lookup_bucket(bucket):
                raise StorageError(f"bucket {bucket!r} does not exist (listing {prefix}); fix data.path")
            it = self.client.list_blobs(bucket, prefix=key, delimiter="/")
            return [(f"gs://{bucket}/{b.name}", int(b.size)) for b in it]

        return self._call(prefix, blobs)

    def _size(self, url: str) -> int:
        key = _bucket_key(url)[1]

        def size() -> int:
            blob = self._bucket(url).get_blob(key)
            if blob is None:
                if not self.client.lookup_bucket(_bucket_key(url)[0]):
                    raise StorageError(f"bucket {_bucket_key(url)[0]!r} does not exist (reading {url}); fix data.path")
                raise Missing(f"{url} does not exist")
            return int(blob.size)

        return self._call(url, size)

    def _chunks(self, url: str, start: int, end: int) -> Iterator[bytes]:
        if start >= end:
            return
        key = _bucket_key(url)[1]
        yield self._call(url, lambda: self._bucket(url).blob(key).download_as_bytes(start=start, end=end - 1, checksum=None))


class HttpStore(Store):
    scheme = "http"

    def _open(self, url: str, headers: dict[str, str]) -> Any:
        import http.client
        import urllib.error
        import urllib.request

        try:
            return urllib.request.urlopen(urllib.request.Request(url, headers=headers), timeout=60)
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise Missing(f"{url} does not exist (HTTP 404)") from e
            if e.code in (401, 403):
                raise StorageError(f"access denied to {url} (HTTP {e.code}): the server refuses this request; fix the "
                                   "URL or its access token") from e
            if e.code in (408, 425, 429) or e.code >= 500:
                raise Transient(f"HTTP {e.code} {e.reason}") from e
            raise StorageError(f"reading {url} failed: HTTP {e.code} {e.reason}") from e
        except urllib.error.URLError as e:
            if isinstance(e.reason, socket.gaierror):
                raise StorageError(f"the host of {url} cannot be resolved ({e.reason}); fix data.path") from e
            raise Transient(f"cannot reach {urlparse(url).netloc}: {e.reason}") from e
        except (http.client.HTTPException, OSError) as e:
            raise Transient(f"{type(e).__name__}: {e}") from e

    def _list(self, prefix: str) -> list[tuple[str, int]]:
        raise StorageError(f"{prefix} cannot be listed over HTTP: name the shards with a brace pattern "
                           "(e.g. https://host/data/{00000..00099}.tar) or point data.path at an MDS index.json's folder")

    def _size(self, url: str) -> int:
        with self._open(url, {"Range": "bytes=0-0"}) as r:
            if r.status == 206:
                return int(r.headers["Content-Range"].rsplit("/", 1)[1])
            return int(r.headers["Content-Length"])

    def _chunks(self, url: str, start: int, end: int) -> Iterator[bytes]:
        import http.client

        if start >= end:
            return
        r = self._open(url, {"Range": f"bytes={start}-{end - 1}"})
        with r:
            skip = start if r.status == 200 else 0  # a server without ranges sends it all
            left = end - start
            while left:
                try:
                    piece = r.read(min(PIECE, left + skip))
                except (http.client.HTTPException, OSError) as e:
                    raise Transient(f"{type(e).__name__}: {e}") from e
                if not piece:
                    return
                if skip:
                    cut = min(skip, len(piece))
                    piece, skip = piece[cut:], skip - cut
                piece = piece[:left]
                left -= len(piece)
                if piece:
                    yield piece


_STORES: dict[tuple[str, RetryPolicy], Store] = {}


def store_for(location: str, policy: RetryPolicy = RetryPolicy()) -> Store:
    """The store (one per scheme and policy in a process) that reads `location`."""
    scheme = urlparse(location).scheme if is_remote(location) else "file"
    kind = {"file": LocalStore, "s3": S3Store, "gs": GcsStore, "http": HttpStore, "https": HttpStore}.get(scheme)
    if kind is None:
        raise StorageError(f"{location!r}: the scheme {scheme!r}:// is not supported; use a local path, s3://, gs:// "
                           "or https://")
    key = (kind.scheme, policy)
    if key not in _STORES:
        _STORES[key] = kind(policy)
    return _STORES[key]
