"""Storage servers on the loopback address for the remote-data tests: moto's S3 server behind a proxy
that injects faults, an HTTPS file server with byte ranges, and a GCS emulator."""
from __future__ import annotations

import datetime
import http.server
import ipaddress
import os
import socket
import socketserver
import ssl
import threading
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator, Optional


@contextmanager
def moto_s3() -> Iterator[str]:
    """moto in server mode on 127.0.0.1; yields its endpoint URL."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@dataclass
class Rule:
    """For the next `times` requests whose method and path match: cut the response after `drop`
    bytes, or answer `status` with `body` (an S3 error document) instead of forwarding."""

    method: str
    path_part: str
    times: int
    drop: Optional[int] = None
    status: Optional[int] = None
    body: bytes = b""
    hits: int = 0


@dataclass
class FaultProxy:
    """A one-request-per-connection HTTP proxy in front of `upstream` (host, port)."""

    upstream: tuple[str, int]
    rules: list[Rule] = field(default_factory=list)
    log: list[tuple[str, str, str, str]] = field(default_factory=list)  # (method, path, range, what happened)

    def start(self) -> str:
        proxy = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                proxy._serve(self.request)

        self._server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def _serve(self, client: socket.socket) -> None:
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = client.recv(65536)
            if not chunk:
                return
            head += chunk
        head, body = head.split(b"\r\n\r\n", 1)
        lines = head.decode("latin1").split("\r\n")
        method, path, _ = lines[0].split(" ", 2)
        headers = [h for h in lines[1:] if not h.lower().startswith("connection:")]
        length = next((int(h.split(":", 1)[1]) for h in headers if h.lower().startswith("content-length:")), 0)
        while len(body) < length:
            body += client.recv(65536)
        rng = next((h.split(":", 1)[1].strip() for h in headers if h.lower().startswith("range:")), "")
        rule = next((r for r in self.rules if r.method == method and r.path_part in path and r.hits < r.times), None)
        if rule is not None:
            rule.hits += 1
        if rule is not None and rule.status is not None:
            self.log.append((method, path, rng, f"status {rule.status}"))
            client.sendall(f"HTTP/1.1 {rule.status} Injected\r\nContent-Type: application/xml\r\nContent-Length: "
                           f"{len(rule.body)}\r\nConnection: close\r\n\r\n".encode() + rule.body)
            client.close()
            return
        up = socket.create_connection(self.upstream)
        up.sendall("\r\n".join([lines[0], *headers, "Connection: close", "", ""]).encode("latin1") + body)
        sent, limit, what = 0, rule.drop if rule is not None else None, "ok"
        while True:
            data = up.recv(65536)
            if not data:
                break
            if limit is not None and sent + len(data) >= limit:
                client.sendall(data[: limit - sent])
                what = f"dropped after {limit} bytes"
                # a reset, as a dropped connection looks to the client
                client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
                break
            client.sendall(data)
            sent += len(data)
        self.log.append((method, path, rng, what))
        up.close()
        client.close()


def s3_error(code: str, message: str) -> bytes:
    return (f'<?xml version="1.0" encoding="UTF-8"?><Error><Code>{code}</Code><Message>{message}</Message>'
            f"<RequestId>1</RequestId></Error>").encode()


def upload_dir(endpoint: str, local: str, bucket: str, prefix: str) -> None:
    import boto3

    s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="test", aws_secret_access_key="test",
                      region_name="us-east-1")
    s3.create_bucket(Bucket=bucket)
    for name in sorted(os.listdir(local)):
        s3.upload_file(os.path.join(local, name), bucket, f"{prefix}/{name}")


def s3_env(endpoint: str) -> dict[str, str]:
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
            "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}


# --- HTTPS -----------------------------------------------------------------------------------------

def self_signed(directory: str) -> tuple[str, str]:
    """A certificate for 127.0.0.1 and its key (PEM files); clients trust it through SSL_CERT_FILE."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=2))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = os.path.join(directory, "cert.pem"), os.path.join(directory, "key.pem")
    with open(cert_path, "wb") as f:
        f.write(cert.public_bytes(serialization.Encoding.PEM))
    with open(key_path, "wb") as f:
        f.write(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return cert_path, key_path


@contextmanager
def https_files(root: str, cert: str, key: str, drop_first: Optional[dict[str, int]] = None) -> Iterator[tuple[str, list]]:
    """Serve `root` over HTTPS with byte ranges; the first GET of each name in `drop_first` is cut
    after that many body bytes. Yields (base URL, log of (path, range, what happened))."""
    drops = dict(drop_first or {})
    log: list[tuple[str, str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            path = os.path.join(root, self.path.lstrip("/"))
            if not os.path.isfile(path):
                self.send_error(404)
                log.append((self.path, "", "404"))
                return
            data = open(path, "rb").read()
            lo, hi = 0, len(data) - 1
            rng = self.headers.get("Range")
            if rng:
                a, b = rng.split("=")[1].split("-")
                lo, hi = int(a), min(int(b), len(data) - 1)
                self.send_response(206)
                self.send_header("Content-Range", f"bytes {lo}-{hi}/{len(data)}")
            else:
                self.send_response(200)
            self.send_header("Content-Length", str(hi - lo + 1))
            self.end_headers()
            name = os.path.basename(path)
            if name in drops and hi - lo > 16:
                cut = drops.pop(name)
                self.wfile.write(data[lo:lo + cut])
                self.wfile.flush()
                log.append((self.path, rng or "", f"dropped after {cut} bytes"))
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data[lo:hi + 1])
            log.append((self.path, rng or "", "ok"))

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", log
    finally:
        server.shutdown()
        server.server_close()


# --- GCS -------------------------------------------------------------------------------------------

@contextmanager
def gcs_emulator() -> Iterator[str]:
    """gcp-storage-emulator in memory on 127.0.0.1; yields its URL (for STORAGE_EMULATOR_HOST)."""
    from gcp_storage_emulator.server import create_server

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = create_server("127.0.0.1", port, in_memory=True)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()
