"""The registry tier's client: the distribution HTTP API (OCI distribution spec v1.0) over the
standard library's ``http.client``.

Why no library: the shim and the worker run as root on every node and load nothing they need not
(the shim's hot path imports builtins only); what the tier needs of the API is six requests (ping,
blob HEAD/GET, upload POST+PUT, manifest GET/PUT/DELETE) and two auth schemes (Basic, and the
Bearer token dance every hosted registry uses). ``http.client`` is maintained with CPython,
keeps one connection per thread alive, and streams; `oras` would bring its own dependency tree
(requests, jsonschema) into the root daemon for the same six requests.

Everything the registry answers is untrusted: a manifest is read up to `MAX_MANIFEST_BYTES`, a blob
is hashed while it streams and refused (`corrupt`) when its sha256 or size differs from the digest
it was asked for; nothing half-read is ever handed on. Errors are `tiers.TierError` with the
registry's status turned into a kind: 401/403 unauthorized, 404 not-found, 5xx server-error, no
connection unreachable.

Credentials (``[store] credentials_file``): a JSON file, root's and mode 0600 or stricter, holding
``{"username": "...", "password": "..."}`` (Basic, or exchanged for a Bearer token) or
``{"token": "..."}`` (a Bearer token as it is). They are sent only to the registry's own host (a
redirect to blob storage gets no Authorization header) and never appear in an error or a log line.
"""
from __future__ import annotations

import base64
import hashlib
import http.client
import json
import os
import re
import ssl
import stat
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Callable, Optional

from shim.policy.node import split_registry
from tiers import REGISTRY, TierError

MANIFEST_TYPE = "application/vnd.oci.image.manifest.v1+json"
MAX_MANIFEST_BYTES = 4 << 20
MAX_CREDENTIALS_BYTES = 64 << 10
READ_BYTES = 1 << 20
TIMEOUT_S = 60.0
MAX_REDIRECTS = 3


@dataclass(frozen=True)
class Credentials:
    username: str = ""
    password: str = ""
    token: str = ""

    def basic(self) -> Optional[str]:
        if not self.username:
            return None
        return "Basic " + base64.b64encode(f"{self.username}:{self.password}".encode()).decode()


def load_credentials(path: str) -> Credentials:
    """The registry credentials file; ValueError naming the file (never its content)."""
    if not path:
        return Credentials()
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except OSError as exc:
        raise ValueError(f"registry credentials {path}: {exc.strerror}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > MAX_CREDENTIALS_BYTES:
            raise ValueError(f"registry credentials {path}: not a regular file of at most {MAX_CREDENTIALS_BYTES} bytes")
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise ValueError(f"registry credentials {path}: must be owned by root with mode 0600 or stricter "
                             f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        data = os.read(fd, MAX_CREDENTIALS_BYTES + 1)
    finally:
        os.close(fd)
    try:
        doc = json.loads(data)
    except ValueError:
        raise ValueError(f"registry credentials {path}: not JSON") from None
    if not isinstance(doc, dict) or not all(isinstance(doc.get(k, ""), str) for k in ("username", "password", "token")):
        raise ValueError(f"registry credentials {path}: expected {{\"username\": .., \"password\": ..}} "
                         "or {\"token\": ..}")
    return Credentials(doc.get("username", ""), doc.get("password", ""), doc.get("token", ""))


_CHALLENGE = re.compile(r'(\w+)="([^"]*)"')


class Registry:
    """One repository of one registry. Thread-safe: each thread keeps its own connection."""

    def __init__(self, reference: str, plain_http: bool = False, credentials: Credentials = Credentials(),
                 timeout: float = TIMEOUT_S):
        self.reference = reference
        self.host, self.repository = split_registry(reference)
        self.scheme = "http" if plain_http else "https"
        self.credentials = credentials
        self.timeout = timeout
        self._local = threading.local()
        self._auth_lock = threading.Lock()
        self._authorization: Optional[str] = (f"Bearer {credentials.token}" if credentials.token else None)

    def __str__(self) -> str:
        return f"{self.scheme}://{self.host}/{self.repository}"

    # ---- transport ----------------------------------------------------------------------------
    def _connection(self, scheme: str, host: str) -> http.client.HTTPConnection:
        conns = getattr(self._local, "conns", None)
        if conns is None:
            conns = self._local.conns = {}
        conn = conns.get((scheme, host))
        if conn is None:
            if scheme == "https":
                conn = http.client.HTTPSConnection(host, timeout=self.timeout, context=ssl.create_default_context())
            else:
                conn = http.client.HTTPConnection(host, timeout=self.timeout)
            conns[(scheme, host)] = conn
        return conn

    def close(self) -> None:
        for conn in (getattr(self._local, "conns", None) or {}).values():
            conn.close()
        self._local.conns = {}

    def _send(self, method: str, url: str, body=None, headers: Optional[dict] = None,
              own_host: bool = True) -> http.client.HTTPResponse:
        parts = urllib.parse.urlsplit(url)
        scheme, host = parts.scheme or self.scheme, parts.netloc or self.host
        target = urllib.parse.urlunsplit(("", "", parts.path, parts.query, ""))
        headers = dict(headers or {})
        if own_host and host == self.host and self._authorization:
            headers["Authorization"] = self._authorization
        for attempt in (1, 2):  # a kept-alive connection the server closed meanwhile: once more, anew
            conn = self._connection(scheme, host)
            try:
                conn.request(method, target, body=body, headers=headers)
                resp = conn.getresponse()
                resp.sent_authorization = headers.get("Authorization")  # what _authenticate compares with
                return resp
            except (http.client.RemoteDisconnected, BrokenPipeError, ConnectionResetError,
                    http.client.CannotSendRequest, http.client.ResponseNotReady):
                conn.close()
                if attempt == 2:
                    raise
        raise AssertionError("unreachable")

    def request(self, method: str, path_or_url: str, checkpoint_id: str, what: str, body=None,
                headers: Optional[dict] = None, ok=(200,)) -> http.client.HTTPResponse:
        """One request, authenticated on the registry's challenge, redirects followed (without our
        Authorization to other hosts); TierError unless the status is in ``ok``. The caller reads
        the body of what is returned."""
        url = path_or_url if "://" in path_or_url else f"{self.scheme}://{self.host}{path_or_url}"
        own = True
        try:
            for _ in range(MAX_REDIRECTS + 2):
                resp = self._send(method, url, body, headers, own_host=own)
                if resp.status == 401 and own and self._authenticate(resp, checkpoint_id, what):
                    resp = self._send(method, url, body, headers, own_host=own)
                if resp.status in (301, 302, 303, 307, 308) and method in ("GET", "HEAD"):
                    location = resp.getheader("Location") or ""
                    resp.read()
                    url = urllib.parse.urljoin(url, location)
                    own = urllib.parse.urlsplit(url).netloc == self.host
                    continue
                if resp.status not in ok:
                    raise self._error(resp, checkpoint_id, what)
                return resp
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TierError(checkpoint_id, REGISTRY, "unreachable",
                            f"{what}: registry {self} unreachable: {exc}") from None
        raise TierError(checkpoint_id, REGISTRY, "server-error", f"{what}: registry {self} redirects too often")

    def _error(self, resp: http.client.HTTPResponse, checkpoint_id: str, what: str) -> TierError:
        detail = ""
        try:
            doc = json.loads(resp.read(64 << 10) or b"{}")
            errors = doc.get("errors") if isinstance(doc, dict) else None
            if isinstance(errors, list) and errors and isinstance(errors[0], dict):
                detail = f": {str(errors[0].get('code', ''))[:64]} {str(errors[0].get('message', ''))[:200]}"
        except (ValueError, OSError, http.client.HTTPException):
            pass
        kind = ("unauthorized" if resp.status in (401, 403) else "not-found" if resp.status == 404
                else "server-error" if resp.status >= 500 else "refused")
        return TierError(checkpoint_id, REGISTRY, kind,
                         f"{what}: registry {self} answered {resp.status} {resp.reason}{detail}")

    def _authenticate(self, resp: http.client.HTTPResponse, checkpoint_id: str, what: str) -> bool:
        """On a 401: Basic with our credentials, or a Bearer token from the challenge's realm. True
        when there is something new to try."""
        challenge = resp.getheader("WWW-Authenticate") or ""
        sent = getattr(resp, "sent_authorization", None)
        resp.read()
        scheme = challenge.split(" ", 1)[0].lower()
        with self._auth_lock:
            if self._authorization and sent != self._authorization:
                return True  # another thread authenticated meanwhile: try with what it got
            if scheme == "basic":
                basic = self.credentials.basic()
                if basic is None or sent == basic:
                    return False
                self._authorization = basic
                return True
            if scheme != "bearer" or self.credentials.token:
                return False
            params = dict(_CHALLENGE.findall(challenge))
            realm = params.get("realm", "")
            if not realm.startswith(("https://", "http://")):
                return False
            query = {k: v for k, v in (("service", params.get("service", "")),
                                       ("scope", params.get("scope") or f"repository:{self.repository}:pull,push"))
                     if v}
            url = realm + ("&" if "?" in realm else "?") + urllib.parse.urlencode(query)
            headers = {}
            if self.credentials.basic():
                headers["Authorization"] = self.credentials.basic()
            parts = urllib.parse.urlsplit(url)
            conn = (http.client.HTTPSConnection(parts.netloc, timeout=self.timeout,
                                                context=ssl.create_default_context())
                    if parts.scheme == "https" else http.client.HTTPConnection(parts.netloc, timeout=self.timeout))
            try:
                conn.request("GET", urllib.parse.urlunsplit(("", "", parts.path, parts.query, "")), headers=headers)
                token_resp = conn.getresponse()
                body = token_resp.read(64 << 10)
                if token_resp.status != 200:
                    raise TierError(checkpoint_id, REGISTRY, "unauthorized",
                                    f"{what}: the token service of registry {self} answered {token_resp.status}")
                doc = json.loads(body)
                token = doc.get("token") or doc.get("access_token") if isinstance(doc, dict) else None
            except (OSError, ValueError, http.client.HTTPException) as exc:
                raise TierError(checkpoint_id, REGISTRY, "unauthorized",
                                f"{what}: no token from registry {self}'s token service: {exc}") from None
            finally:
                conn.close()
            if not isinstance(token, str) or not token:
                return False
            self._authorization = f"Bearer {token}"
            return True

    # ---- the API ------------------------------------------------------------------------------
    def ping(self, checkpoint_id: str = "-") -> None:
        """GET /v2/: reachable, speaks the API, our credentials are taken."""
        self.request("GET", "/v2/", checkpoint_id, "ping").read()

    def has_blob(self, digest: str, checkpoint_id: str) -> bool:
        resp = self.request("HEAD", f"/v2/{self.repository}/blobs/{digest}", checkpoint_id,
                            f"look up blob {digest[:19]}", ok=(200, 404))
        resp.read()
        return resp.status == 200

    def push_blob(self, digest: str, data: bytes, checkpoint_id: str) -> None:
        """A monolithic upload (POST, then PUT with the digest): the registry checks the digest too."""
        what = f"upload blob {digest[:19]}"
        resp = self.request("POST", f"/v2/{self.repository}/blobs/uploads/", checkpoint_id, what, body=b"",
                            headers={"Content-Length": "0"}, ok=(202,))
        resp.read()
        location = resp.getheader("Location") or ""
        if not location:
            raise TierError(checkpoint_id, REGISTRY, "server-error", f"{what}: registry {self} gave no upload location")
        url = urllib.parse.urljoin(f"{self.scheme}://{self.host}/", location)
        url += ("&" if "?" in url else "?") + urllib.parse.urlencode({"digest": digest})
        resp = self.request("PUT", url, checkpoint_id, what, body=data,
                            headers={"Content-Type": "application/octet-stream",
                                     "Content-Length": str(len(data))}, ok=(201, 204))
        resp.read()

    def get_blob(self, digest: str, size: int, sink: Callable[[int, bytes], None], checkpoint_id: str,
                 limit: Optional[int] = None) -> None:
        """Stream one blob into ``sink(offset, data)``; TierError ``corrupt`` when its bytes do not
        hash to ``digest`` or are not ``size`` long (what the sink got must then be thrown away)."""
        what = f"blob {digest}"
        algorithm, _, expected = digest.partition(":")
        if algorithm != "sha256" or not re.fullmatch(r"[0-9a-f]{64}", expected):
            raise TierError(checkpoint_id, REGISTRY, "malformed", f"{what}: not a sha256 digest")
        resp = self.request("GET", f"/v2/{self.repository}/blobs/{digest}", checkpoint_id, f"pull {what}")
        h = hashlib.sha256()
        got = 0
        try:
            while True:
                data = resp.read(READ_BYTES)
                if not data:
                    break
                got += len(data)
                if got > size:
                    raise TierError(checkpoint_id, REGISTRY, "corrupt",
                                    f"{what}: the registry sent more than the {size} bytes the manifest names")
                h.update(data)
                sink(got - len(data), data)
        except (OSError, http.client.HTTPException) as exc:
            self.close()
            raise TierError(checkpoint_id, REGISTRY, "unreachable", f"{what}: transfer broke off: {exc}") from None
        if got != size or h.hexdigest() != expected:
            raise TierError(checkpoint_id, REGISTRY, "corrupt",
                            f"{what}: the registry's bytes do not match their digest ({got} bytes, sha256 "
                            f"{h.hexdigest()[:12]}...): refused, nothing of it is used")

    def get_manifest(self, tag: str, checkpoint_id: str) -> tuple[dict, str]:
        """(the manifest, its digest); not-found when the tag is not there."""
        resp = self.request("GET", f"/v2/{self.repository}/manifests/{tag}", checkpoint_id, "manifest",
                            headers={"Accept": MANIFEST_TYPE})
        body = resp.read(MAX_MANIFEST_BYTES + 1)
        if len(body) > MAX_MANIFEST_BYTES:
            raise TierError(checkpoint_id, REGISTRY, "malformed", f"manifest larger than {MAX_MANIFEST_BYTES} bytes")
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        said = resp.getheader("Docker-Content-Digest")
        if said and said != digest:
            raise TierError(checkpoint_id, REGISTRY, "corrupt", f"manifest bytes hash to {digest}, the registry "
                                                                f"says {said}")
        try:
            doc = json.loads(body)
        except ValueError:
            raise TierError(checkpoint_id, REGISTRY, "malformed", "manifest is not JSON") from None
        if not isinstance(doc, dict):
            raise TierError(checkpoint_id, REGISTRY, "malformed", "manifest is not a JSON object")
        return doc, digest

    def put_manifest(self, tag: str, manifest: bytes, checkpoint_id: str) -> str:
        resp = self.request("PUT", f"/v2/{self.repository}/manifests/{tag}", checkpoint_id, "put manifest",
                            body=manifest, headers={"Content-Type": MANIFEST_TYPE,
                                                    "Content-Length": str(len(manifest))}, ok=(201, 200))
        resp.read()
        return "sha256:" + hashlib.sha256(manifest).hexdigest()

    def delete_manifest(self, digest: str, checkpoint_id: str) -> None:
        resp = self.request("DELETE", f"/v2/{self.repository}/manifests/{digest}", checkpoint_id,
                            "delete manifest", ok=(200, 202, 404))
        resp.read()


def from_node(node) -> Optional[Registry]:
    """The node's registry tier (None when it has none); ValueError for unusable credentials."""
    if not node.store_registry:
        return None
    return Registry(node.store_registry, node.store_registry_plain_http,
                    load_credentials(node.store_credentials_file))
