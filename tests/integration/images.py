"""OCI image archives built from the host's busybox-static, for `ctr image import` (no registry here).

The archive is an OCI image layout in a tar (oci-layout, index.json, blobs/sha256/...): one config,
one manifest and one gzip layer holding /bin/busybox, a symlink per applet (sh, echo, sleep, cat, seq,
date, ls, ...), the usual empty directories and a minimal /etc/passwd and /etc/group, plus optional
extra files. Timestamps and gzip headers are fixed, so the same inputs give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import subprocess
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence, Union

BUSYBOX_REF = "docker.io/kybernate/busybox:test"
# A CRI sandbox ("pause") image: busybox sleeping forever. The harness names it in containerd's config.
PAUSE_REF = "docker.io/kybernate/pause:test"

BUSYBOX_BINARY = Path("/bin/busybox")  # busybox-static
IMAGE_PATH_ENV = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
_EPOCH = 1_700_000_000  # fixed mtime of every entry, for reproducible digests

# Applets linked when `busybox --list` cannot be asked (e.g. a dynamically linked busybox elsewhere).
_FALLBACK_APPLETS = ("sh", "ash", "echo", "sleep", "cat", "seq", "date", "ls", "true", "false", "env",
                     "ps", "kill", "mkdir", "rm", "cp", "mv", "touch", "head", "tail", "wc", "grep",
                     "sed", "awk", "dd", "id", "hostname", "uname", "mount", "printf", "test", "yes",
                     "sync", "stat", "find", "xargs", "tee", "top", "nc", "wget", "vi")

# One extra file: its content (bytes/str), a host file to copy (Path), or (content, mode).
ExtraFile = Union[bytes, str, Path, "tuple[bytes | str, int]"]

MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"


@dataclass(frozen=True)
class ImageArchive:
    path: Path
    ref: str
    manifest_digest: str
    layer_diff_id: str


def oci_arch(machine: str | None = None) -> str:
    machine = machine or platform.machine()
    return {"x86_64": "amd64", "aarch64": "arm64", "armv7l": "arm", "ppc64le": "ppc64le",
            "s390x": "s390x"}.get(machine, machine)


def busybox_applets(busybox: Path = BUSYBOX_BINARY) -> list[str]:
    try:
        out = subprocess.run([str(busybox), "--list"], capture_output=True, text=True, check=True,
                             timeout=10).stdout
    except (OSError, subprocess.SubprocessError):
        return list(_FALLBACK_APPLETS)
    applets = sorted({a.strip() for a in out.split() if a.strip() and "/" not in a})
    return [a for a in applets if a != "busybox"]


def _info(name: str, kind: bytes = tarfile.REGTYPE, mode: int = 0o644, size: int = 0,
          linkname: str = "") -> tarfile.TarInfo:
    ti = tarfile.TarInfo(name)
    ti.type = kind
    ti.mode = mode
    ti.size = size
    ti.linkname = linkname
    ti.mtime = _EPOCH
    ti.uid = ti.gid = 0
    ti.uname = ti.gname = "root"
    return ti


def _extra_entry(path: str, spec: ExtraFile) -> tuple[bytes, int]:
    mode = None
    if isinstance(spec, tuple):
        spec, mode = spec
    if isinstance(spec, Path):
        data = spec.read_bytes()
        if mode is None:
            mode = spec.stat().st_mode & 0o7777
    elif isinstance(spec, str):
        data = spec.encode()
    elif isinstance(spec, (bytes, bytearray)):
        data = bytes(spec)
    else:
        raise TypeError(f"extra file {path}: expected bytes, str, Path or (content, mode), got {type(spec)}")
    if mode is None:
        mode = 0o755 if data.startswith(b"#!") else 0o644
    return data, mode


def build_layer(extra_files: Mapping[str, ExtraFile] | None = None,
                busybox: Path = BUSYBOX_BINARY) -> bytes:
    """The uncompressed layer tar: busybox, its applet links, base dirs and files, extra files."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        dirs = {"bin": 0o755, "dev": 0o755, "etc": 0o755, "proc": 0o755, "sys": 0o755, "root": 0o700,
                "tmp": 0o1777, "var": 0o755, "var/tmp": 0o1777, "run": 0o755, "usr": 0o755,
                "usr/bin": 0o755, "sbin": 0o755, "home": 0o755}
        files: dict[str, tuple[bytes, int]] = {
            "bin/busybox": (busybox.read_bytes(), 0o755),
            "etc/passwd": (b"root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/home:/bin/false\n",
                           0o644),
            "etc/group": (b"root:x:0:\nnogroup:x:65534:\n", 0o644),
            "etc/hostname": (b"busybox\n", 0o644),
        }
        for path, spec in (extra_files or {}).items():
            rel = path.lstrip("/")
            if not rel or rel.endswith("/"):
                raise ValueError(f"extra file path {path!r} must name a file")
            files[rel] = _extra_entry(path, spec)
            parent = os.path.dirname(rel)
            while parent:
                dirs.setdefault(parent, 0o755)
                parent = os.path.dirname(parent)
        for d in sorted(dirs):
            tar.addfile(_info(d, tarfile.DIRTYPE, dirs[d]))
        links = {f"bin/{a}" for a in busybox_applets(busybox)} - set(files)
        for name in sorted(links):
            tar.addfile(_info(name, tarfile.SYMTYPE, 0o777, linkname="busybox"))
        for name in sorted(files):
            data, mode = files[name]
            tar.addfile(_info(name, mode=mode, size=len(data)), io.BytesIO(data))
    return buf.getvalue()


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _json(obj) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def build_image(dest: Path, ref: str = BUSYBOX_REF,
                extra_files: Mapping[str, ExtraFile] | None = None,
                cmd: Sequence[str] | None = ("sh",), entrypoint: Sequence[str] | None = None,
                env: Sequence[str] = (IMAGE_PATH_ENV,), busybox: Path = BUSYBOX_BINARY) -> ImageArchive:
    """Write an OCI image layout tar to `dest` (a file path) and describe it."""
    layer = build_layer(extra_files, busybox)
    diff_id = _digest(layer)
    layer_gz = gzip.compress(layer, compresslevel=6, mtime=0)
    arch = oci_arch()
    image_config: dict = {"Env": list(env), "WorkingDir": "/"}
    if cmd is not None:
        image_config["Cmd"] = list(cmd)
    if entrypoint is not None:
        image_config["Entrypoint"] = list(entrypoint)
    config = _json({
        "architecture": arch,
        "os": "linux",
        "created": "2023-11-14T22:13:20Z",
        "config": image_config,
        "rootfs": {"type": "layers", "diff_ids": [diff_id]},
        "history": [{"created": "2023-11-14T22:13:20Z", "created_by": "kybernate tests/integration/images.py"}],
    })
    manifest = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": {"mediaType": MEDIA_CONFIG, "digest": _digest(config), "size": len(config)},
        "layers": [{"mediaType": MEDIA_LAYER_GZIP, "digest": _digest(layer_gz), "size": len(layer_gz)}],
    })
    tag = ref.rsplit(":", 1)[1] if ":" in ref.rsplit("/", 1)[-1] else "latest"
    index = _json({
        "schemaVersion": 2,
        "mediaType": MEDIA_INDEX,
        "manifests": [{
            "mediaType": MEDIA_MANIFEST,
            "digest": _digest(manifest),
            "size": len(manifest),
            "platform": {"architecture": arch, "os": "linux"},
            "annotations": {"io.containerd.image.name": ref, "org.opencontainers.image.ref.name": tag},
        }],
    })
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, "w", format=tarfile.PAX_FORMAT) as tar:
        entries = [("oci-layout", _json({"imageLayoutVersion": "1.0.0"})), ("index.json", index)]
        entries += [(f"blobs/sha256/{_digest(b)[7:]}", b) for b in (config, manifest, layer_gz)]
        for d in ("blobs", "blobs/sha256"):
            tar.addfile(_info(d, tarfile.DIRTYPE, 0o755))
        for name, data in entries:
            tar.addfile(_info(name, size=len(data)), io.BytesIO(data))
    os.replace(tmp, dest)
    return ImageArchive(path=dest, ref=ref, manifest_digest=_digest(manifest), layer_diff_id=diff_id)
