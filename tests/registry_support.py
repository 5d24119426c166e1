"""A real OCI registry for tests: CNCF distribution 2.8 (Debian's docker-registry, installed by
scripts/setup.sh), started on 127.0.0.1 with its filesystem driver in a temp dir, with htpasswd
(Basic) auth, deletes enabled; and a fault proxy in front of it for the answers a healthy registry
does not give (500s, a connection cut mid-blob).

    reg = LocalRegistry(tmp_path).start()      # reg.reference("kyb/ckpt") -> "127.0.0.1:PORT/kyb/ckpt"
    reg.credentials_file                       # JSON for [store] credentials_file (0600)
    reg.blob_data(digest)                      # the file the registry serves a blob from
    reg.stop()
    proxy = FaultProxy(reg).start()            # proxy.reference(...); proxy.fault = lambda m, p: 500 or None
"""
from __future__ import annotations

import base64
import http.client
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
import warnings
from pathlib import Path
from typing import Callable, Optional

REGISTRY_BINARY = (os.environ.get("KYB_REGISTRY_BINARY") or shutil.which("docker-registry")
                   or "/usr/bin/docker-registry")   # KYB_REGISTRY_BINARY: a copy carried to a machine without apt
USER, PASSWORD = "kyb", "kyb-test-password"


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _crypt():
    """The deprecated crypt module (gone in Python 3.13): bcrypt for htpasswd, which distribution
    requires; None where this Python has none."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            import crypt
        except ImportError:
            return None
    return crypt if getattr(crypt, "METHOD_BLOWFISH", None) in getattr(crypt, "methods", ()) else None


def has_basic_auth() -> bool:
    """Whether LocalRegistry(auth=True) can run here (bcrypt for its htpasswd file)."""
    return _crypt() is not None


def unavailable_reason() -> Optional[str]:
    if not os.access(REGISTRY_BINARY, os.X_OK):
        return f"{REGISTRY_BINARY} is missing: scripts/setup.sh installs Debian's docker-registry"
    return None


class LocalRegistry:
    def __init__(self, workdir: Path, auth: bool = True, host: str = "127.0.0.1"):
        """host: the address it listens on (127.0.0.1, or the host side of a test's own veth pair)."""
        self.host = host
        self.workdir = Path(workdir) / "registry"
        self.data = self.workdir / "data"
        self.auth = auth
        self.port = 0
        self.proc: Optional[subprocess.Popen] = None
        self.log_path = self.workdir / "registry.log"
        self.credentials_file = self.workdir / "credentials.json"

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    def reference(self, repository: str = "kyb/checkpoints") -> str:
        return f"{self.address}/{repository}"

    def start(self, port: int = 0) -> "LocalRegistry":
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.data.mkdir(exist_ok=True)
        self.port = port or self.port or free_port(self.host)
        auth = ""
        if self.auth:
            htpasswd = self.workdir / "htpasswd"
            crypt = _crypt()
            if crypt is None:
                raise RuntimeError("no bcrypt in this Python (crypt): start LocalRegistry(auth=False)")
            salt = crypt.mksalt(crypt.METHOD_BLOWFISH, rounds=1 << 4)
            htpasswd.write_text(f"{USER}:{crypt.crypt(PASSWORD, salt)}\n")
            auth = f"auth:\n  htpasswd:\n    realm: kybernate-test\n    path: {htpasswd}\n"
            fd = os.open(self.credentials_file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            os.write(fd, json.dumps({"username": USER, "password": PASSWORD}).encode())
            os.close(fd)
        config = self.workdir / "config.yml"
        config.write_text(f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {self.data}\n"
                          f"  delete:\n    enabled: true\nhttp:\n  addr: {self.address}\n{auth}")
        log = open(self.log_path, "ab")
        self.proc = subprocess.Popen([REGISTRY_BINARY, "serve", str(config)], stdout=log, stderr=log,
                                     start_new_session=True)
        log.close()
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"docker-registry exited {self.proc.returncode}: {self.log_path.read_text()[-2000:]}")
            try:
                conn = http.client.HTTPConnection(self.address, timeout=2)
                conn.request("GET", "/v2/")
                conn.getresponse().read()
                conn.close()
                return self
            except OSError:
                time.sleep(0.05)
        self.stop()
        raise RuntimeError("docker-registry did not answer within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc = None

    def blob_data(self, digest: str) -> Path:
        hexd = digest.split(":", 1)[1]
        return self.data / "docker/registry/v2/blobs/sha256" / hexd[:2] / hexd / "data"

    def layer_link(self, repository: str, digest: str) -> Path:
        return self.data / "docker/registry/v2/repositories" / repository / "_layers/sha256" / digest.split(":", 1)[1]

    def blobs(self) -> list[str]:
        root = self.data / "docker/registry/v2/blobs/sha256"
        return sorted("sha256:" + p.parent.name for p in root.glob("*/*/data")) if root.exists() else []


class _ProxyHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def _forward(self) -> None:
        proxy: FaultProxy = self.server.proxy  # type: ignore[attr-defined]
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        proxy.seen.append((self.command, self.path))
        if proxy.bearer and self._bearer(proxy):
            return
        status = proxy.fault(self.command, self.path) if proxy.fault else None
        if status:
            payload = json.dumps({"errors": [{"code": "INJECTED", "message": f"fault proxy answers {status}"}]}).encode()
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)
            return
        conn = http.client.HTTPConnection(proxy.registry.address, timeout=60)
        headers = {k: v for k, v in self.headers.items() if k.lower() not in ("host", "connection")}
        if proxy.bearer:   # the registry behind takes the proxy's own Basic credentials
            headers["Authorization"] = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        conn.request(self.command, self.path, body=body, headers=headers)
        resp = conn.getresponse()
        data = resp.read()
        self.send_response(resp.status, resp.reason)
        for k, v in resp.getheaders():
            if k.lower() in ("transfer-encoding", "connection", "content-length"):
                continue
            if k.lower() == "location":
                v = v.replace(proxy.registry.address, proxy.address)
            self.send_header(k, v)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)
        conn.close()

    def _reply(self, status: int, payload: bytes, headers: Optional[dict] = None) -> None:
        self.send_response(status)
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _bearer(self, proxy: "FaultProxy") -> bool:
        """The token dance of hosted registries: /token trades Basic credentials for a token, /v2/
        wants it as Bearer. True when answered here."""
        auth = self.headers.get("Authorization") or ""
        if self.path.startswith("/token"):
            proxy.token_requests.append(self.path)
            good = "Basic " + base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
            if auth != good:
                self._reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}')
            else:
                self._reply(200, json.dumps({"token": proxy.token}).encode())
            return True
        if auth != f"Bearer {proxy.token}":
            realm = f"http://{proxy.address}/token"
            self._reply(401, b'{"errors": [{"code": "UNAUTHORIZED"}]}',
                        {"WWW-Authenticate": f'Bearer realm="{realm}",service="kyb-test"'})
            return True
        return False

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = do_PATCH = _forward


class FaultProxy:
    """Forwards to a LocalRegistry; ``fault(method, path)`` returning a status answers that instead."""

    def __init__(self, registry: LocalRegistry, bearer: bool = False):
        self.registry = registry
        self.bearer = bearer              # Bearer token auth in front (a token service at /token)
        self.token = "tok-" + os.urandom(8).hex()
        self.token_requests: list[str] = []
        self.fault: Optional[Callable[[str, str], Optional[int]]] = None
        self.seen: list[tuple[str, str]] = []
        self.server: Optional[http.server.ThreadingHTTPServer] = None

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.server.server_address[1]}"

    def reference(self, repository: str = "kyb/checkpoints") -> str:
        return f"{self.address}/{repository}"

    def start(self) -> "FaultProxy":
        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _ProxyHandler)
        self.server.daemon_threads = True
        self.server.proxy = self  # type: ignore[attr-defined]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()
            self.server = None
