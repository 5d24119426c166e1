"""Sealed checkpoint images: a manifest of every file, authenticated with the node's (or cluster's) key.

Why: a checkpoint image is untrusted once it has been written. It travels through shared storage and
containerd's content store, and CRIU (root, in the host's namespaces) parses every file of it; the GPU
record (``kybernate-gpu.json``) steers where CUDA processes go. A seal lets restore refuse an image that
anyone but a node holding the key changed after the checkpoint, before CRIU or the driver reads it:

- at checkpoint, after the dump, the completion marker and containerd's note, `seal` writes
  ``kybernate-seal.json``: every file's size and the SHA-256 of each 64 MiB piece of it, the container's
  identity (containerd namespace; for CRI also the pod's namespace, name and container name), the CUDA
  driver version of a GPU image, and an HMAC-SHA256 of all that under the key;
- at restore (Create), `verify` checks the MAC first (another key, or an edited manifest: refused), then
  the scope (another containerd namespace or Kubernetes namespace: refused), then the directory against
  the manifest (a file missing, added, turned into a link or something else than a regular file, or of
  another size: refused without reading it), then every byte (a flipped byte, a file copied in from
  another checkpoint: refused). Each refusal names the first bad file.

Why HMAC and not signatures: the standard library has HMAC and no public-key signatures, and the party
that seals (a node's shim, root) is the party that verifies, so a shared secret says all we need ("a
node holding the key wrote this"). The price: every node that can verify can also seal, so a node's
root that leaks a cluster key lets its holder forge images for every node sharing it; per-node keys
limit that to one node (and to restores on it). Signatures (Ed25519) would let restore-only nodes hold
a public key only; they need a crypto library in the shim, and can come later under a new ``format``.

Why SHA-256 in pieces: with SHA-NI (AMD EPYC, Intel Xeon), OpenSSL's SHA-256 runs at about 1.4 GB/s
per core, twice hashlib's BLAKE2b (CPython's BLAKE2 has no SIMD); verification costs about 0.87
CPU-seconds per GiB with the reads (bench/results/seal_bench.md). hashlib releases the GIL on large
updates, so threads hash in parallel; a CRIU image is mostly one large ``pages-*.img`` per process, so
digests of 64 MiB pieces let that one file be hashed by every core, and name the bad byte range.

Time-of-check: the seal is verified at Create; CRIU opens the files again by name at Start. Files in
the node's root-owned checkpoint store cannot change in between unless root changes them; an image on
storage that others can write while it is restored (a shared filesystem under restore_roots) should
be copied into the store first (verify the copy).

The core (`seal`, `verify`, `load_key`) uses the standard library only (hashlib, hmac, json, os,
concurrent.futures); the shim's policy around it (which key, whether unsealed images are accepted,
the TTRPCError and audit line) is `checkpoint_key`, `seal_checkpoint` and `check_restore` at the end.
`kybernate` knows only the manifest's name (kybernate.SEAL_MANIFEST): it imports nothing of the shim.
"""
from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import stat
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Mapping, Optional

if TYPE_CHECKING:
    from shim.checkpoint.witness import WitnessDir

log = logging.getLogger("kybernate.shim")

MANIFEST_NAME = "kybernate-seal.json"
MANIFEST_FORMAT = 1
MAC_ALGORITHM = "hmac-sha256"
DIGEST_ALGORITHM = "sha256"
PIECE_BYTES = 64 << 20        # one digest per 64 MiB of a file: the unit of parallel hashing
READ_BYTES = 1 << 20          # one read (and one hashlib update, without the GIL) at a time
#: Below this much to hash, the calling thread hashes it alone: starting a pool and handing each
#: file to it costs a few ms (thread starts, GIL hand-overs), more than hashing a CPU container's
#: image takes (32 files, 155 KiB: 4.3 ms with the pool, 1.0 ms without).
PARALLEL_MIN_BYTES = 16 << 20
MAX_MANIFEST_BYTES = 16 << 20
MAX_FILES = 100_000
MIN_KEY_BYTES = 32
MAX_KEY_BYTES = 4096
MAX_RECORD_BYTES = 1 << 20
GPU_RECORD = "kybernate-gpu.json"  # shim.gpu.records.RECORD_NAME: its driver_version goes into the seal
#: The container's identity fields that must match at restore: the tenant's scope. The others
#: (pod, container name, id) are recorded for people: restoring into a new container is the point.
SCOPE_FIELDS = ("namespace", "pod_namespace")
_KEY_ID_LABEL = b"kybernate seal key id"


class SealError(Exception):
    """An image that does not match its seal. `file` is the first bad file (a name in the image dir,
    or the manifest itself for a foreign or edited seal); `why` says what is wrong with it."""

    def __init__(self, image_dir: str, file: str, why: str, reason: str = "mismatch"):
        self.image_dir = image_dir
        self.file = file
        self.why = why
        self.reason = reason  # unsealed, foreign-key, altered, foreign-scope, malformed, added, missing, ...
        super().__init__(f"{file}: {why}")


class SealKeyError(Exception):
    """The seal key file is missing (`missing`) or cannot be trusted to be a secret of root's."""

    def __init__(self, path: str, why: str, missing: bool = False):
        self.path = path
        self.missing = missing
        super().__init__(f"seal key {path}: {why}")


@dataclass(frozen=True)
class Verified:
    """What a verified seal says: for the log, and for callers that want the sealed identity."""

    identity: Mapping[str, str]
    files: int
    bytes: int
    seconds: float
    driver_version: Optional[int]
    witnessed: bool = False  # the content hashing was replaced by this node's witness (shim.checkpoint.witness)


# ---- the key ---------------------------------------------------------------------------------------
def load_key(path: str) -> bytes:
    """The key: the file's content without surrounding whitespace (so a key copied with or without a
    newline is the same key), at least 32 bytes. The file must be a regular file owned by root and
    readable by no one else (mode 0600 or stricter): a key others can read lets them forge seals.
    A link is followed (a key mounted from a Secret is one); the file it reaches is what is checked."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK)
    except FileNotFoundError:
        raise SealKeyError(path, "does not exist", missing=True) from None
    except OSError as exc:
        raise SealKeyError(path, exc.strerror or str(exc)) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise SealKeyError(path, "is not a regular file")
        if st.st_uid != 0 or st.st_mode & 0o077:
            raise SealKeyError(path, f"must be owned by root with mode 0600 or stricter "
                                     f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})")
        data = os.read(fd, MAX_KEY_BYTES + 1)
    finally:
        os.close(fd)
    key = data.strip()
    if len(data) > MAX_KEY_BYTES:
        raise SealKeyError(path, f"is larger than {MAX_KEY_BYTES} bytes")
    if len(key) < MIN_KEY_BYTES:
        raise SealKeyError(path, f"holds {len(key)} bytes: a key needs at least {MIN_KEY_BYTES} "
                                 "(e.g. `head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n'`)")
    return key


def new_key_text() -> str:
    """A fresh key as the file holds it: 32 random bytes, hex (copyable to other nodes of a cluster)."""
    return os.urandom(32).hex() + "\n"


def key_id(key: bytes) -> str:
    """A name for a key that reveals nothing of it: says "sealed with another key" apart from
    "manifest edited" (both fail the MAC)."""
    return hmac.new(key, _KEY_ID_LABEL, hashlib.sha256).hexdigest()[:16]


# ---- identity --------------------------------------------------------------------------------------
def identity_of(namespace: str, spec: Mapping, container_id: str) -> dict[str, str]:
    """The container's identity as the seal records it: its scope in the checkpoint store
    (`shim.policy.store.scope_of`: the containerd namespace and, for a CRI container, the pod's
    namespace, name and container name from the CRI plugin's own annotations), so that a seal's scope
    and the store's are one rule. ValueError for names that cannot be a scope (containerd's never)."""
    from shim.policy.store import scope_of

    ann = spec.get("annotations") if isinstance(spec, Mapping) else None
    scope = scope_of(namespace, container_id, ann if isinstance(ann, Mapping) else {})
    pod, name = scope.name if scope.pod_namespace else ("", "")
    return {"namespace": scope.containerd_namespace, "container_id": container_id or "",
            "pod_namespace": scope.pod_namespace, "pod": pod, "container": name}


def describe_scope(identity: Mapping[str, str]) -> str:
    ns = f"namespace {identity.get('namespace', '')!r}"
    pod_ns = identity.get("pod_namespace", "")
    return f"{ns}, Kubernetes namespace {pod_ns!r}" if pod_ns else ns


# ---- hashing ---------------------------------------------------------------------------------------
_buffers = threading.local()


def _buffer(size: int) -> memoryview:
    """This thread's read buffer, at least `size` bytes (at most READ_BYTES): grown to what the files
    need, since a fresh bytearray is zero-filled, and a MiB of it is 256 page faults in a daemon that
    verifies a few hundred KiB."""
    buf = getattr(_buffers, "buf", None)
    size = max(4096, min(READ_BYTES, size))
    if buf is None or len(buf) < size:
        buf = _buffers.buf = memoryview(bytearray(size))
    return buf


def _workers(threads: Optional[int]) -> int:
    if threads:
        return max(1, threads)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(2, min(16, cpus))


@dataclass(frozen=True)
class _Entry:
    name: str
    size: int
    dev: int
    ino: int


class _Stop(Exception):
    """A file earlier in name order already failed: this piece is not needed."""


def _hash_piece(dir_fd: int, entry: _Entry, index: int, needed: Callable[[], bool]) -> bytes:
    """SHA-256 of one piece of one file, read through its own descriptor (no link followed; the same
    inode as the listing saw, so a file swapped during verification is noticed)."""
    if not needed():
        raise _Stop()
    offset = index * PIECE_BYTES
    length = min(PIECE_BYTES, entry.size - offset)
    fd = os.open(entry.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    try:
        st = os.fstat(fd)
        if (st.st_dev, st.st_ino) != (entry.dev, entry.ino) or not stat.S_ISREG(st.st_mode):
            raise OSError("replaced while it was read")
        if index == 0 and entry.size > PIECE_BYTES:
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_SEQUENTIAL)
            except OSError:
                pass
        h = hashlib.sha256()
        buf = _buffer(length)
        done = 0
        while done < length:
            if not needed():
                raise _Stop()
            n = os.preadv(fd, [buf[:min(READ_BYTES, length - done)]], offset + done)
            if n == 0:
                raise OSError(f"ends at {offset + done} bytes, before its {entry.size}")
            h.update(buf[:n])
            done += n
        return h.digest()
    finally:
        os.close(fd)


def _pieces(size: int) -> int:
    return (size + PIECE_BYTES - 1) // PIECE_BYTES


def _hash_all(dir_fd: int, entries: list[_Entry], threads: Optional[int],
              expected: Optional[Mapping[str, list[str]]] = None,
              known: Optional[Mapping[tuple, str]] = None) -> tuple[dict[str, list[str]], list[tuple]]:
    """Every piece of every file, hashed by a pool of threads (by the calling thread alone when there
    is less than `PARALLEL_MIN_BYTES` to hash and `threads` is not given); returns (digests by name, [(name,
    offset, why)] of the files that differ from `expected` or cannot be read). Once a file fails,
    files after it in name order are left unread, files before it are still checked: the first of
    the list is the first bad file in name order, whichever thread found what first. `known`:
    digests already taken of whole pieces ((name, dev, ino, index) -> hex, `PieceHasher`), used
    for the same inode's same piece instead of reading it again (sealing only)."""
    known = known or {}
    digests: dict[str, list[Optional[str]]] = {e.name: [None] * _pieces(e.size) for e in entries}
    jobs = []
    for e in entries:
        for i in range(_pieces(e.size)):
            early = known.get((e.name, e.dev, e.ino, i)) if expected is None else None
            if early is not None and (i + 1) * PIECE_BYTES <= e.size:
                digests[e.name][i] = early
            else:
                jobs.append((e, i))
    bad: list[tuple] = []
    lock = threading.Lock()
    first_bad: list[Optional[str]] = [None]

    def failed(name: str, offset: int, why: str) -> None:
        with lock:
            bad.append((name, offset, why))
            if first_bad[0] is None or name < first_bad[0]:
                first_bad[0] = name

    def one(job):
        entry, index = job
        try:
            got = _hash_piece(dir_fd, entry, index, lambda: first_bad[0] is None or entry.name < first_bad[0]).hex()
        except _Stop:
            return
        except OSError as exc:
            failed(entry.name, index * PIECE_BYTES, f"cannot be read: {exc.strerror or exc}")
            return
        digests[entry.name][index] = got
        if expected is not None and not hmac.compare_digest(got, expected[entry.name][index]):
            start = index * PIECE_BYTES
            end = min(entry.size, start + PIECE_BYTES) - 1
            failed(entry.name, start, f"its content differs from the seal (bytes {start}-{end})")

    workers = min(_workers(threads), max(1, len(jobs)))
    if threads is None and sum(min(PIECE_BYTES, e.size - i * PIECE_BYTES) for e, i in jobs) < PARALLEL_MIN_BYTES:
        workers = 1  # a CPU container's few hundred KiB: the pool would cost more than the hashing
    if workers == 1:
        for job in jobs:
            one(job)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="kybernate-seal") as pool:
            list(pool.map(one, jobs))
    return digests, sorted(bad)  # type: ignore[return-value]


# ---- the image directory ---------------------------------------------------------------------------
def _open_dir(image_dir: str) -> int:
    try:
        return os.open(image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    except OSError as exc:
        raise SealError(image_dir, ".", f"cannot open the image dir: {exc.strerror}", "unreadable") from None


def _kind(mode: int) -> str:
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    return "not a regular file"


def _listing(image_dir: str, dir_fd: int) -> dict[str, os.stat_result]:
    """Every entry of the image dir but the manifest, lstat'ed (links are not followed)."""
    out: dict[str, os.stat_result] = {}
    with os.scandir(dir_fd) as it:
        for entry in it:
            if entry.name == MANIFEST_NAME:
                continue
            if len(out) >= MAX_FILES:
                raise SealError(image_dir, entry.name, f"the image holds more than {MAX_FILES} files", "too-many")
            out[entry.name] = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
    return out


def _canonical(body: Mapping) -> bytes:
    return json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=True).encode()


def _mac(key: bytes, body: Mapping) -> str:
    return hmac.new(key, _canonical(body), hashlib.sha256).hexdigest()


def _read_small(dir_fd: int, name: str, limit: int) -> Optional[bytes]:
    """A small file of the image, as a regular file only (None when absent)."""
    try:
        fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, dir_fd=dir_fd)
    except FileNotFoundError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise OSError(0, _kind(st.st_mode))
        if st.st_size > limit:
            raise OSError(0, f"{st.st_size} bytes, more than {limit}")
        return os.read(fd, limit + 1)
    finally:
        os.close(fd)


def _driver_version(dir_fd: int) -> Optional[int]:
    """The CUDA driver version in the image's GPU record (None for a CPU image)."""
    try:
        data = _read_small(dir_fd, GPU_RECORD, MAX_RECORD_BYTES)
        doc = json.loads(data) if data is not None else None
    except (OSError, ValueError):
        return None
    version = doc.get("driver_version") if isinstance(doc, dict) else None
    return version if isinstance(version, int) and not isinstance(version, bool) else None


# ---- seal ------------------------------------------------------------------------------------------
def seal(image_dir: str, key: bytes, identity: Mapping[str, str], *, threads: Optional[int] = None,
         witness: Optional["WitnessDir"] = None, known: Optional[Mapping[tuple, str]] = None) -> str:
    """Write the image's manifest (atomically, mode 0600); returns its path. Every entry of the dir
    must be a regular file (a CRIU dump has nothing else); an old manifest is replaced. With a
    `witness` dir, the files just hashed are noted there (shim.checkpoint.witness)."""
    started = time.monotonic()
    dir_fd = _open_dir(image_dir)
    try:
        listing = _listing(image_dir, dir_fd)
        entries = []
        for name in sorted(listing):
            st = listing[name]
            if not stat.S_ISREG(st.st_mode):
                raise SealError(image_dir, name, f"is {_kind(st.st_mode)}: an image to seal holds regular "
                                                 "files only", "not-regular")
            entries.append(_Entry(name, st.st_size, st.st_dev, st.st_ino))
        digests, bad = _hash_all(dir_fd, entries, threads, known=known)
        if bad:
            name, _offset, why = bad[0]
            raise SealError(image_dir, name, why, "unreadable")
        body = {"format": MANIFEST_FORMAT, "digest": DIGEST_ALGORITHM, "piece_bytes": PIECE_BYTES,
                "identity": {k: str(v) for k, v in identity.items()},
                "driver_version": _driver_version(dir_fd),
                "sealed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                "files": {e.name: {"size": e.size, DIGEST_ALGORITHM: digests[e.name]} for e in entries}}
        doc = {"format": MANIFEST_FORMAT, "mac": f"{MAC_ALGORITHM}:{_mac(key, body)}", "key_id": key_id(key),
               "body": body}
        _write_atomic(dir_fd, MANIFEST_NAME, json.dumps(doc, sort_keys=True, indent=1).encode() + b"\n")
        if witness is not None:
            witness.record(doc["mac"], dir_fd, listing)
    finally:
        os.close(dir_fd)
    log.debug("sealed %s: %d files in %.3fs", image_dir, len(entries), time.monotonic() - started)
    return os.path.join(image_dir, MANIFEST_NAME)


class PieceHasher:
    """Hashes the whole 64 MiB pieces of the page images (``pages-*.img``) while CRIU is still
    writing them, so that the seal after the dump reads only what came last (on the H200 the seal
    was 0.26 s of a 2 GiB GPU checkpoint and 0.65-1.03 s of an 8 GiB one).

    Why that is sound: CRIU writes a page image once, front to back (splice at the file position;
    no parent images, no rewrite), so a piece that lies wholly below the file's size does not change
    afterwards; and `seal` takes a digest from here only for the same name, device, inode and piece
    of a file whose final size covers the piece. Anything else (the other image files, the last
    piece) is hashed by `seal` as before. A failure here only means the seal reads more."""

    PATTERN = ("pages-", ".img")

    def __init__(self, image_dir: str, threads: int = 4, interval_s: float = 0.02):
        self.image_dir = image_dir
        self.threads = threads
        self.interval_s = interval_s
        self.digests: dict[tuple, str] = {}
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None

    def start(self) -> "PieceHasher":
        self._thread = threading.Thread(target=self._run, name="kybernate-seal-early", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> dict[tuple, str]:
        """Stop looking (pieces being hashed finish); the digests taken so far."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        return dict(self.digests)

    def _run(self) -> None:
        try:
            dir_fd = os.open(self.image_dir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            return
        taken: set[tuple] = set()
        try:
            with ThreadPoolExecutor(max_workers=self.threads, thread_name_prefix="kybernate-seal-early") as pool:
                while not self._stop.is_set():  # after the stop, `seal` hashes what is left
                    for name, st in self._page_images(dir_fd):
                        entry = _Entry(name, st.st_size, st.st_dev, st.st_ino)
                        for index in range(st.st_size // PIECE_BYTES):
                            key = (name, st.st_dev, st.st_ino, index)
                            if key not in taken:
                                taken.add(key)
                                pool.submit(self._hash_one, dir_fd, entry, index, key)
                    self._stop.wait(self.interval_s)
        finally:
            os.close(dir_fd)

    def _page_images(self, dir_fd: int) -> list[tuple[str, os.stat_result]]:
        out = []
        try:
            with os.scandir(dir_fd) as it:
                for entry in it:
                    if entry.name.startswith(self.PATTERN[0]) and entry.name.endswith(self.PATTERN[1]):
                        st = os.stat(entry.name, dir_fd=dir_fd, follow_symlinks=False)
                        if stat.S_ISREG(st.st_mode):
                            out.append((entry.name, st))
        except OSError:
            return out
        return out

    def _hash_one(self, dir_fd: int, entry: _Entry, index: int, key: tuple) -> None:
        try:
            self.digests[key] = _hash_piece(dir_fd, entry, index, lambda: True).hex()
        except (OSError, _Stop):
            pass


def _write_atomic(dir_fd: int, name: str, data: bytes) -> None:
    tmp = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600, dir_fd=dir_fd)
    try:
        try:
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        try:
            os.unlink(tmp, dir_fd=dir_fd)
        except OSError:
            pass
        raise


# ---- verify ----------------------------------------------------------------------------------------
def is_sealed(image_dir: str) -> bool:
    """Whether the image has a manifest at all (a link counts: verify refuses it)."""
    return os.path.lexists(os.path.join(image_dir, MANIFEST_NAME))


def read_manifest(image_dir: str, dir_fd: Optional[int] = None) -> dict:
    """The manifest as written (not yet authenticated); SealError(reason 'unsealed') when absent."""
    own = dir_fd is None
    fd = _open_dir(image_dir) if own else dir_fd
    try:
        try:
            data = _read_small(fd, MANIFEST_NAME, MAX_MANIFEST_BYTES)
        except OSError as exc:
            raise SealError(image_dir, MANIFEST_NAME, f"cannot be read as the seal: {exc.strerror or exc}",
                            "malformed") from None
    finally:
        if own:
            os.close(fd)
    if data is None:
        raise SealError(image_dir, MANIFEST_NAME, "is missing: the image is not sealed", "unsealed")
    try:
        doc = json.loads(data)
    except ValueError as exc:
        raise SealError(image_dir, MANIFEST_NAME, f"is not JSON: {exc}", "malformed") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("body"), dict) or not isinstance(doc.get("mac"), str):
        raise SealError(image_dir, MANIFEST_NAME, "is not a seal (no body and mac)", "malformed")
    return doc


def _checked_body(image_dir: str, body: Mapping) -> tuple[dict, dict]:
    """(identity, files) of an authenticated body, shape-checked (a body we wrote always passes)."""
    identity, files = body.get("identity"), body.get("files")
    ok = (body.get("format") == MANIFEST_FORMAT and body.get("digest") == DIGEST_ALGORITHM
          and body.get("piece_bytes") == PIECE_BYTES and isinstance(identity, dict) and isinstance(files, dict)
          and all(isinstance(n, str) and n and "/" not in n and n not in (".", "..", MANIFEST_NAME)
                  and isinstance(f, dict) and isinstance(f.get("size"), int) and f["size"] >= 0
                  and isinstance(f.get(DIGEST_ALGORITHM), list) and len(f[DIGEST_ALGORITHM]) == _pieces(f["size"])
                  and all(isinstance(d, str) for d in f[DIGEST_ALGORITHM]) for n, f in files.items()))
    if not ok:
        raise SealError(image_dir, MANIFEST_NAME, f"has a format this shim does not read "
                                                  f"(format {body.get('format')!r})", "malformed")
    return identity, files


def verify(image_dir: str, key: bytes, expected_identity: Mapping[str, str], *,
           threads: Optional[int] = None, witness: Optional["WitnessDir"] = None) -> Verified:
    """Check the image against its seal; returns what it says, or raises SealError naming the first
    bad file. Order: the MAC, the scope, the directory (nothing added, missing, linked or resized:
    no file content read), then every piece of every file in parallel, unless this node's `witness`
    vouches that every file is the inode it hashed before, unchanged since (shim.checkpoint.witness);
    a full verification leaves such a witness for the next restore."""
    started = time.monotonic()
    dir_fd = _open_dir(image_dir)
    try:
        doc = read_manifest(image_dir, dir_fd)
        body = doc["body"]
        mac = doc["mac"]
        if not mac.startswith(MAC_ALGORITHM + ":"):
            raise SealError(image_dir, MANIFEST_NAME, f"is authenticated with {mac.split(':')[0]!r}, "
                                                      f"not {MAC_ALGORITHM}", "malformed")
        given = mac[len(MAC_ALGORITHM) + 1:].encode("utf-8", "surrogatepass")
        if not hmac.compare_digest(given, _mac(key, body).encode()):
            theirs, ours = str(doc.get("key_id", "?")), key_id(key)
            if theirs != ours:
                raise SealError(image_dir, MANIFEST_NAME, f"was sealed with another key (key id {theirs[:16]}; "
                                                          f"this node's is {ours})", "foreign-key")
            raise SealError(image_dir, MANIFEST_NAME, "was altered after sealing: its MAC does not match",
                            "altered")
        identity, files = _checked_body(image_dir, body)
        for field in SCOPE_FIELDS:
            if str(identity.get(field, "")) != str(expected_identity.get(field, "")):
                raise SealError(image_dir, MANIFEST_NAME, f"seals a checkpoint of {describe_scope(identity)}, "
                                                          f"not of {describe_scope(expected_identity)}",
                                "foreign-scope")
        listing = _listing(image_dir, dir_fd)
        entries = []
        for name in sorted(set(listing) | set(files)):
            st = listing.get(name)
            sealed = files.get(name)
            if st is None:
                raise SealError(image_dir, name, "is missing: the seal lists it", "missing")
            if sealed is None:  # a restore adds none: runc points CRIU's logs and stats at the work dir
                raise SealError(image_dir, name, f"is not in the seal: added after the checkpoint", "added")
            if not stat.S_ISREG(st.st_mode):
                raise SealError(image_dir, name, f"is {_kind(st.st_mode)}, sealed as a regular file", "not-regular")
            if st.st_size != sealed["size"]:
                how = "truncated" if st.st_size < sealed["size"] else "grown"
                raise SealError(image_dir, name, f"is {st.st_size} bytes, sealed with {sealed['size']} ({how})",
                                how)
            entries.append(_Entry(name, st.st_size, st.st_dev, st.st_ino))
        witnessed = witness is not None and witness.vouches(mac, dir_fd, listing)
        if not witnessed:
            _, bad = _hash_all(dir_fd, entries, threads, {n: files[n][DIGEST_ALGORITHM] for n in files})
            if bad:
                name, _offset, why = bad[0]
                raise SealError(image_dir, name, why, "content")
            if witness is not None:
                witness.record(mac, dir_fd, listing)
    finally:
        os.close(dir_fd)
    driver = body.get("driver_version")
    return Verified(identity={k: str(v) for k, v in identity.items()}, files=len(entries),
                    bytes=sum(e.size for e in entries), seconds=time.monotonic() - started,
                    driver_version=driver if isinstance(driver, int) and not isinstance(driver, bool) else None,
                    witnessed=witnessed)


# ---- the shim's policy -----------------------------------------------------------------------------
def _node(action: str, container_id: str):
    from ttrpc.codes import Code
    from ttrpc.errors import TTRPCError
    from shim.policy.node import NodeConfig, NodeConfigError

    try:
        return NodeConfig.load()
    except NodeConfigError as exc:
        raise TTRPCError(Code.FAILED_PRECONDITION, f"{action} container {container_id}: {exc}") from exc


def _key(path: str, action: str, container_id: str) -> Optional[bytes]:
    """The node's key; None when the file does not exist; a key file that is there but unfit (not
    root's, readable by others, too short) is an error: the operator meant to seal."""
    from ttrpc.codes import Code
    from ttrpc.errors import TTRPCError

    try:
        return load_key(path)
    except SealKeyError as exc:
        if exc.missing:
            return None
        log.error("%s container %s: %s", action, container_id, exc)
        raise TTRPCError(Code.FAILED_PRECONDITION, f"{action} container {container_id}: {exc} "
                                                   "(node config checkpoint.seal_key_file)") from exc


def checkpoint_key(container_id: str) -> Optional[bytes]:
    """Before the dump: the key to seal with (None: the node has none, the image stays unsealed). A
    broken node config or key file fails the checkpoint here, before CRIU freezes anything."""
    node = _node("checkpoint", container_id)
    key = _key(node.seal_key_file, "checkpoint", container_id)
    if key is None:
        log.warning("container %s: no seal key at %s (node config checkpoint.seal_key_file): its checkpoint "
                    "is not sealed%s", container_id, node.seal_key_file,
                    ", and this node (require_seal) will refuse to restore it" if node.require_seal else "")
    return key


def seal_checkpoint(task: Any, image_dir: str, key: Optional[bytes],
                    known: Optional[Mapping[tuple, str]] = None) -> str:
    """After the dump, the completion marker and containerd's note (the in-progress marker is gone by
    then, so it is never sealed): the manifest, or "" unsealed."""
    if key is None:
        return ""
    from ttrpc.codes import Code
    from ttrpc.errors import TTRPCError

    from shim.checkpoint.witness import WitnessDir

    started = time.monotonic()
    node = _node("checkpoint", task.id)
    try:
        path = seal(image_dir, key, identity_of(task.namespace, task.spec, task.id), known=known,
                    witness=WitnessDir(node.seal_witness_dir) if node.seal_witness_dir else None)
    except (SealError, OSError, ValueError) as exc:
        raise TTRPCError(Code.INTERNAL, f"checkpoint container {task.id}: the image in {image_dir} is complete "
                                        f"but cannot be sealed: {exc}") from exc
    log.info("container %s: sealed %s in %.3fs", task.id, image_dir, time.monotonic() - started)
    return path


def check_restore(image_dir: str, shown: str, key: str, value: str, *, node: Any, container_id: str,
                  namespace: str, spec: Mapping) -> None:
    """At Create, once the store's resolution (`shim.policy.untrusted`, `shim.checkpoint.settings.
    containerd_checkpoint_source`) has found the image and before anything in it is read (our own
    checks, its records, the layer stack, CRIU, the driver): the image must carry a seal this node's
    key verifies, for this container's scope. ``image_dir`` is what is read (the fd that found it,
    as /proc/self/fd/N), ``shown`` its real path for the log; ``key``/``value`` is what named it.
    Every source is checked alike, containerd's own checkpoint too: on containerd 2.x the CRI plugin
    hands a checkpoint image pulled from a registry to Create the same way. With require_seal = false
    an unsealed image (or a sealed one on a node without a key) is restored, with a warning; a seal
    that is there and does not verify is refused either way. Raises TTRPCError: PermissionDenied with
    an audit line naming the first bad file, FailedPrecondition for the node's own key.

    A directory without a CRIU inventory (by name: nothing is read) is no image at all: it is left to
    the image check that follows (`criu.images.validate_image_dir` refuses it reading nothing of it),
    so that a pod gets the store's one sentence for it, as for a name that is missing or not allowed."""
    from ttrpc.codes import Code

    from criu.images import INVENTORY
    from shim.policy.audit import refuse

    if not os.path.lexists(os.path.join(image_dir, INVENTORY)):
        return

    secret = _key(node.seal_key_file, "restore", container_id)
    expected = identity_of(namespace, spec, container_id)
    sealed = is_sealed(image_dir)
    if not sealed or secret is None:
        why = (f"the image is not sealed (no {MANIFEST_NAME})" if not sealed else
               f"this node has no seal key ({node.seal_key_file}) to verify its seal with")
        if node.require_seal:
            raise refuse(Code.PERMISSION_DENIED if not sealed else Code.FAILED_PRECONDITION, container_id, key,
                         value, f"{why}, and this node requires sealed checkpoint images (node config "
                                "checkpoint.require_seal)", action="restore", namespace=namespace,
                         detail=f"image {shown}")
        log.warning("container %s: restore from %s unverified: %s (require_seal = false)", container_id,
                    shown, why)
        return
    from shim.checkpoint.witness import WitnessDir

    try:
        verified = verify(image_dir, secret, expected,
                          witness=WitnessDir(node.seal_witness_dir) if node.seal_witness_dir else None)
    except SealError as exc:
        raise refuse(Code.PERMISSION_DENIED, container_id, key, value,
                     f"{exc.file}: {exc.why.replace(image_dir, shown)}; refused before CRIU reads the image",
                     action="restore", namespace=namespace, detail=f"image {shown}") from exc
    log.info("container %s: seal of %s verified (%d files, %d bytes, sealed for %s%s) in %.3fs", container_id,
             shown, verified.files, verified.bytes, describe_scope(verified.identity),
             "; content unchanged since this node hashed it (seal witness)" if verified.witnessed else "",
             verified.seconds)
