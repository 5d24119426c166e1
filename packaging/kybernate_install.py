#!/usr/bin/env python3
"""Kybernate node installer: the shim in its own virtual environment, linked where containerd finds
it, and the `kybernate` runtime merged into containerd's config.toml.

    kybernate_install.py [--prefix /opt/kybernate] [--config /etc/containerd/config.toml]
                         [--bin-dir /usr/local/bin] [--source PATH|WHEEL] [--wheelhouse DIR]
                         [--containerd-version auto|1.7|2.1] [--restart-containerd] [--dry-run]
    kybernate_install.py --uninstall [...same paths...]

What it does, each step only when its result is not already in place (a second run changes nothing):
  1. PREFIX/venv: a virtual environment with this package (and its dependencies) pip-installed from a
     source directory or a wheel; PREFIX/install.json records what was installed and where.
  2. BIN_DIR/containerd-shim-kybernate-v1 and BIN_DIR/kybernate: symlinks into the venv. containerd
     looks shims up on its PATH (runtime_type io.containerd.kybernate.v1 -> that binary name).
  3. config.toml: our runtime merged in as one marked block (containerd_toml.py says how, and why
     nothing else in the file can change); the original is kept as config.toml.kybernate-backup.
  4. the node's seal key (--seal-key, default /etc/kybernate/seal.key): 32 random bytes in hex, owned by
     root, mode 0600, made once and never replaced. The shim seals every checkpoint with it and
     verifies the seal before it restores one (docs/security.md); nodes that restore each other's
     checkpoints need the same key: copy one over it on each of them. --seal-key '' makes none.
  5. with --restart-containerd, and only when config.toml changed: `systemctl restart containerd`.
`--uninstall` reverses 1-3 and removes the backup when the file is back to what it was, so nothing is
left behind but the seal key (checkpoints sealed with it need it to be restored).

Standard library only (Python >= 3.11 for tomllib, or `tomli` installed), so it runs before anything
of Kybernate is installed: from a checkout, or from the installer image, which keeps the checkout's
layout. Beside it, packaging/containerd_toml.py (imported as this script's sibling); above it,
fsutil/atomic.py, the project's one atomic file writer, loaded by path (`_load_atomic_writer`).
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import importlib.util
import json
import os
import re
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

from containerd_toml import (ConfigError, RuntimeSettings, find_block, merge_config, parse_toml,
                             runtime_table, unmerge_config)

SHIM_BINARY = "containerd-shim-kybernate-v1"
OPERATOR_BINARY = "kybernate"
PACKAGE = "kybernate"

DEFAULT_PREFIX = "/opt/kybernate"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_BIN_DIR = "/usr/local/bin"
DEFAULT_SEAL_KEY = "/etc/kybernate/seal.key"  # shim.policy.node's default seal_key_file
DEFAULT_RESTART = "systemctl restart containerd"
STATE_FILE = "install.json"
BACKUP_SUFFIX = ".kybernate-backup"


class InstallError(Exception):
    """Something the operator must fix; the message says what. Exit status 1 (as for a ConfigError)."""


def _load_atomic_writer() -> Callable[..., None]:
    """`fsutil.atomic.atomic_write` of the tree this script is part of (packaging/../fsutil/atomic.py).

    Loaded by path, not imported: on a node nothing of Kybernate is installed yet, and an installed
    copy elsewhere must not stand in for the one this installer ships with."""
    path = Path(__file__).resolve().parent.parent / "fsutil" / "atomic.py"
    spec = importlib.util.spec_from_file_location("_kybernate_install_fsutil_atomic", path)
    if not path.is_file() or spec is None or spec.loader is None:
        sys.exit(f"kybernate-install: {path} is missing: run the installer from a Kybernate checkout or "
                 "the installer image (they keep packaging/ beside fsutil/)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.atomic_write


atomic_write = _load_atomic_writer()


# ---- containerd version -------------------------------------------------------------------------
def parse_containerd_version(text: str) -> tuple[int, int, int]:
    """`containerd --version` -> (major, minor, patch).

    'containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3' -> (1, 6, 20);
    'containerd github.com/containerd/containerd/v2 2.1.9+unknown' -> (2, 1, 9); 'v1.7.2' works too.
    """
    for token in text.split()[1:]:
        m = re.match(r"v?(\d+)\.(\d+)(?:\.(\d+))?", token)
        if m:
            return int(m.group(1)), int(m.group(2)), int(m.group(3) or 0)
    raise InstallError(f"cannot read a containerd version from {text.strip()!r}")


def detect_containerd_version(binary: str = "containerd") -> tuple[int, int, int]:
    path = shutil.which(binary)
    if not path:
        raise InstallError(f"containerd binary {binary!r} not found in PATH: pass --containerd-version "
                           "(e.g. 1.7 or 2.1) or --containerd-binary")
    try:
        out = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InstallError(f"{path} --version failed: {exc}") from exc
    if out.returncode != 0:
        raise InstallError(f"{path} --version exited {out.returncode}: {out.stderr.strip()}")
    return parse_containerd_version(out.stdout)


def parse_version_arg(value: str) -> tuple[int, int, int]:
    m = re.fullmatch(r"v?(\d+)(?:\.(\d+))?(?:\.(\d+))?", value.strip())
    if not m:
        raise InstallError(f"--containerd-version {value!r}: expected auto or a version like 1.7 or 2.1")
    return int(m.group(1)), int(m.group(2) or 0), int(m.group(3) or 0)


# ---- files ----------------------------------------------------------------------------------------
def write_file(path: Path, text: str, like: Optional[os.stat_result] = None) -> None:
    """Replace `path` atomically (fsutil.atomic), creating its directory; keep the mode and owner of
    `like` (the file it replaces), else 0644."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if like is None:
        atomic_write(path, text)
    else:
        atomic_write(path, text, mode=like.st_mode & 0o7777, owner=(like.st_uid, like.st_gid))


def source_fingerprint(source: Path) -> str:
    """sha256 of a wheel, or of a source tree's package files (what a reinstall would change)."""
    h = hashlib.sha256()
    if source.is_file():
        with open(source, "rb") as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        return "sha256:" + h.hexdigest()
    for path in sorted(_source_files(source)):
        rel = path.relative_to(source).as_posix()
        h.update(rel.encode() + b"\0")
        h.update(path.read_bytes())
        h.update(b"\0")
    return "tree-sha256:" + h.hexdigest()


_SKIP_DIRS = {".git", ".venv", "venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis",
              "tests", "bench", "docs", ".whl", ".gl", ".gpu-bundle", "node_modules", "tmp"}


def _skip_dir(name: str) -> bool:
    return name in _SKIP_DIRS or name.endswith(".egg-info") or name.startswith(".")


def _source_files(source: Path):
    for root, dirs, files in os.walk(source):
        dirs[:] = sorted(d for d in dirs if not _skip_dir(d))
        for name in files:
            if name.endswith((".pyc", ".pyo")):
                continue
            yield Path(root) / name


def copy_source(source: Path, dest: Path) -> Path:
    """A clean copy of a source tree to build from (pip builds in-tree; the source may be read-only)."""
    def ignore(_dir, names):
        return [n for n in names if (Path(_dir, n).is_dir() and _skip_dir(n)) or n.endswith((".pyc", ".pyo"))]
    shutil.copytree(source, dest, ignore=ignore, symlinks=True)
    return dest


# ---- the installation ----------------------------------------------------------------------------
@dataclasses.dataclass
class Options:
    prefix: Path
    config: Path
    bin_dir: Path
    source: Optional[Path]
    wheelhouse: Optional[Path]
    python: str
    containerd_binary: str
    containerd_version: str
    settings: RuntimeSettings
    systemd_auto: bool
    restart: bool
    restart_command: str
    dry_run: bool
    force_reinstall: bool
    skip_config: bool
    pip_args: tuple[str, ...] = ()
    seal_key: Optional[Path] = None  # None: no seal key step


class Reporter:
    def __init__(self, stream=None, dry_run: bool = False):
        self.stream = stream or sys.stdout
        self.dry_run = dry_run
        self.changes: list[str] = []

    def say(self, msg: str) -> None:
        print(msg, file=self.stream, flush=True)

    def change(self, msg: str) -> None:
        self.changes.append(msg)
        self.say(("would: " if self.dry_run else "") + msg)

    def same(self, msg: str) -> None:
        self.say("unchanged: " + msg)

    def note(self, msg: str) -> None:
        self.say("note: " + msg)


def _venv_dir(prefix: Path) -> Path:
    return prefix / "venv"


def _read_state(prefix: Path) -> dict:
    try:
        return json.loads((prefix / STATE_FILE).read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _run(argv: Sequence[str], what: str, timeout: float = 900, env: Optional[dict] = None) -> str:
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError) as exc:
        raise InstallError(f"{what}: {shlex.join(argv)} failed: {exc}") from exc
    if proc.returncode != 0:
        tail = "\n".join((proc.stdout + proc.stderr).strip().splitlines()[-25:])
        raise InstallError(f"{what}: {shlex.join(argv)} exited {proc.returncode}:\n{tail}")
    return proc.stdout


def default_source() -> Optional[Path]:
    """The repository this script lives in (packaging/..), when it is one."""
    repo = Path(__file__).resolve().parent.parent
    return repo if (repo / "setup.cfg").is_file() or (repo / "pyproject.toml").is_file() else None


def wheel_in(wheelhouse: Path) -> Optional[Path]:
    """The newest kybernate-*.whl in a wheelhouse (the DaemonSet image ships one there)."""
    wheels = sorted(wheelhouse.glob(f"{PACKAGE}-*.whl"), key=lambda p: p.stat().st_mtime)
    return wheels[-1] if wheels else None


def install_venv(opts: Options, rep: Reporter) -> None:
    venv = _venv_dir(opts.prefix)
    source = opts.source
    if source is None:
        raise InstallError("no package source: pass --source DIR|WHEEL (a checkout of kybernate or a "
                           "kybernate-*.whl)")
    source = source.resolve()
    if not source.exists():
        raise InstallError(f"package source {source} does not exist")
    fingerprint = source_fingerprint(source)
    state = _read_state(opts.prefix)
    vpython = venv / "bin" / "python"
    healthy = vpython.exists() and (venv / "bin" / SHIM_BINARY).exists() and subprocess.run(
        [str(vpython), "-c", "import shim.binary.cli"], capture_output=True).returncode == 0
    if healthy and state.get("fingerprint") == fingerprint and not opts.force_reinstall:
        rep.same(f"venv {venv} has {PACKAGE} {state.get('version', '?')} from {source}")
        return
    rep.change(f"install {PACKAGE} from {source} into the virtual environment {venv}")
    if opts.dry_run:
        return
    opts.prefix.mkdir(parents=True, exist_ok=True)
    if not vpython.exists() or not healthy:
        args = [opts.python, "-m", "venv"]
        if venv.exists():
            args.append("--clear")
        _run(args + [str(venv)], "creating the virtual environment", timeout=300)
    pip = [str(vpython), "-m", "pip", "--disable-pip-version-check", "--no-input"]
    if subprocess.run(pip + ["show", "-q", PACKAGE], capture_output=True).returncode == 0:
        _run(pip + ["uninstall", "-y", PACKAGE], f"removing the previous {PACKAGE}")
    install = pip + ["install", "--quiet"]
    if opts.wheelhouse:
        install += ["--no-index", "--find-links", str(opts.wheelhouse)]
    install += list(opts.pip_args)
    with tempfile.TemporaryDirectory(prefix="kybernate-src-") as tmp:
        target = source if source.is_file() else copy_source(source, Path(tmp) / "src")
        _run(install + [str(target)], f"pip install of {PACKAGE}")
    if not (venv / "bin" / SHIM_BINARY).exists():
        raise InstallError(f"{venv}/bin/{SHIM_BINARY} is missing after pip install: is {source} Kybernate?")
    version = _run([str(venv / "bin" / SHIM_BINARY), "-v"], "checking the installed shim", timeout=60)
    m = re.search(r"Version:\s*(\S+)", version)
    state.update({"package": PACKAGE, "version": m.group(1) if m else "?", "source": str(source),
                  "fingerprint": fingerprint})
    _write_state(opts.prefix, state)


def _write_state(prefix: Path, state: dict) -> None:
    write_file(prefix / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


def _links(opts: Options) -> list[tuple[Path, Path]]:
    venv_bin = _venv_dir(opts.prefix) / "bin"
    return [(opts.bin_dir / name, venv_bin / name) for name in (SHIM_BINARY, OPERATOR_BINARY)]


def install_links(opts: Options, rep: Reporter) -> None:
    for link, target in _links(opts):
        if link.is_symlink() and os.readlink(link) == str(target):
            rep.same(f"{link} -> {target}")
            continue
        if link.is_symlink():
            old = os.readlink(link)
            if not old.endswith(f"/bin/{link.name}"):
                raise InstallError(f"{link} is a link to {old}, not to a Kybernate venv; remove it first")
            rep.change(f"relink {link} -> {target} (was -> {old})")
        elif link.exists():
            raise InstallError(f"{link} exists and is not a link made by this installer; remove it first")
        else:
            rep.change(f"link {link} -> {target}")
        if not opts.dry_run:
            link.parent.mkdir(parents=True, exist_ok=True)
            tmp = link.with_name(f".{link.name}.kybernate-tmp")
            if tmp.is_symlink() or tmp.exists():
                tmp.unlink()
            os.symlink(target, tmp)
            os.replace(tmp, link)


def _show_diff(rep: Reporter, path: Path, old: str, new: str) -> None:
    diff = difflib.unified_diff(old.splitlines(keepends=True), new.splitlines(keepends=True),
                                str(path), str(path) + " (new)")
    for line in diff:
        rep.say("    " + line.rstrip("\n"))


def install_config(opts: Options, containerd: tuple[int, int, int], rep: Reporter) -> bool:
    """Merge the runtime into config.toml; True when the file changed (or would)."""
    path = opts.config.resolve() if opts.config.exists() else opts.config
    text = path.read_text(encoding="utf-8") if path.exists() else None
    result = merge_config(text, containerd, opts.settings, str(path), opts.systemd_auto)
    for n in result.notes:
        rep.note(n)
    where = f"[{runtime_table(result.schema)}] (config version {result.schema})"
    if not result.changed:
        rep.same(f"{path} declares {where}")
        return False
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    if text is None:
        rep.change(f"create {path} with {where}")
    else:
        rep.change(f"{'update' if find_block(text) else 'add'} {where} in {path}"
                   + ("" if backup.exists() else f"; original kept as {backup}"))
    if opts.dry_run:
        _show_diff(rep, path, text or "", result.text)
        return True
    st = path.stat() if text is not None else None
    if text is not None and not backup.exists():
        shutil.copy2(path, backup)
    write_file(path, result.text, st)
    # Read back what is on disk: the check merge_config did must hold for the file itself.
    parse_toml(path.read_text(encoding="utf-8"), str(path))
    return True


def uninstall_config(opts: Options, rep: Reporter) -> bool:
    path = opts.config.resolve() if opts.config.exists() else opts.config
    backup = path.with_name(path.name + BACKUP_SUFFIX)
    original = backup.read_text(encoding="utf-8") if backup.exists() else None
    changed = False
    if not path.exists():
        rep.same(f"{path} does not exist")
        result: Optional[str] = None
    else:
        text = path.read_text(encoding="utf-8")
        result, changed = unmerge_config(text, str(path))
        if result is not None and original is not None and result.rstrip("\n") == original.rstrip("\n"):
            result = original      # byte for byte, trailing newlines included
        if not changed:
            rep.same(f"{path} has no kybernate block")
        elif result is None:
            rep.change(f"remove {path} (the installer created it and it holds nothing else)")
            if not opts.dry_run:
                path.unlink()
        else:
            rep.change(f"remove the kybernate block from {path}")
            if opts.dry_run:
                _show_diff(rep, path, text, result)
            else:
                write_file(path, result, path.stat())
    if original is not None:
        if result is not None and result == original:
            rep.change(f"remove {backup} ({path} is back to it)")
            if not opts.dry_run:
                backup.unlink()
        else:
            rep.note(f"keeping {backup}: {path} differs from it (changed since the installer first "
                     "edited it)")
    return changed


def uninstall_links(opts: Options, rep: Reporter) -> None:
    for link, target in _links(opts):
        if link.is_symlink():
            if os.readlink(link) == str(target):
                rep.change(f"remove {link}")
                if not opts.dry_run:
                    link.unlink()
            else:
                rep.note(f"leaving {link}: it points to {os.readlink(link)}, not into {opts.prefix}")
        elif link.exists():
            rep.note(f"leaving {link}: not a link made by this installer")


def uninstall_prefix(opts: Options, rep: Reporter) -> None:
    prefix = opts.prefix
    venv = _venv_dir(prefix)
    state = prefix / STATE_FILE
    if not prefix.exists():
        rep.same(f"{prefix} does not exist")
        return
    if venv.exists():
        if not (venv / "pyvenv.cfg").exists():
            raise InstallError(f"{venv} is not a virtual environment (no pyvenv.cfg); not removing it")
        rep.change(f"remove {venv}")
        if not opts.dry_run:
            shutil.rmtree(venv)
    if state.exists():
        rep.change(f"remove {state}")
        if not opts.dry_run:
            state.unlink()
    if not opts.dry_run:
        try:
            prefix.rmdir()
            rep.say(f"removed {prefix}")
        except OSError:
            rep.note(f"leaving {prefix}: it holds files the installer did not make: "
                     + ", ".join(sorted(p.name for p in prefix.iterdir())))


def restart_containerd(opts: Options, rep: Reporter, changed: bool) -> None:
    if not changed:
        if opts.restart:
            rep.same("containerd's config, so containerd is not restarted")
        return
    if not opts.restart:
        rep.note(f"restart containerd to load the change (e.g. `{opts.restart_command}`), or rerun with "
                 "--restart-containerd")
        return
    rep.change(f"restart containerd: {opts.restart_command}")
    if not opts.dry_run:
        _run(shlex.split(opts.restart_command), "restarting containerd", timeout=300)


def install_seal_key(opts: Options, rep: Reporter) -> None:
    """The node's seal key, made once: a key that sealed checkpoints must outlive a reinstall, and one
    the operator put there (a cluster's) is never replaced. One that is there but not root's only is
    left alone and reported: the shim refuses it."""
    path = opts.seal_key
    if path is None:
        return
    if os.path.lexists(path):
        try:
            st = path.stat()
        except OSError as exc:
            rep.note(f"seal key {path} cannot be read ({exc.strerror}): the shim will refuse it")
            return
        if not stat.S_ISREG(st.st_mode) or st.st_uid != 0 or st.st_mode & 0o077:
            rep.note(f"seal key {path} is not a root-only file (uid {st.st_uid}, mode "
                     f"{stat.S_IMODE(st.st_mode):04o}): the shim refuses it; chown root:root and chmod 600 it")
        else:
            rep.same(f"seal key {path}")
        return
    rep.change(f"create the seal key {path} (mode 0600; nodes that restore each other's checkpoints need the "
               "same key)")
    if opts.dry_run:
        return
    path.parent.mkdir(mode=0o755, parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    try:
        os.write(fd, os.urandom(32).hex().encode() + b"\n")
        os.fsync(fd)
    finally:
        os.close(fd)


def containerd_version(opts: Options) -> tuple[int, int, int]:
    if opts.containerd_version == "auto":
        return detect_containerd_version(opts.containerd_binary)
    return parse_version_arg(opts.containerd_version)


def install(opts: Options, rep: Reporter) -> int:
    containerd = containerd_version(opts)
    rep.say(f"containerd {'.'.join(map(str, containerd))}; prefix {opts.prefix}; config {opts.config}; "
            f"links in {opts.bin_dir}" + (" (dry run: nothing is changed)" if opts.dry_run else ""))
    # Check the config first: a malformed file stops the installation before anything is touched.
    if not opts.skip_config:
        path = opts.config
        if path.exists():
            text = path.read_text(encoding="utf-8")
            merge_config(text, containerd, opts.settings, str(path), opts.systemd_auto)
    install_venv(opts, rep)
    install_links(opts, rep)
    changed = False
    if not opts.skip_config:
        changed = install_config(opts, containerd, rep)
    install_seal_key(opts, rep)
    if not opts.dry_run:
        state = _read_state(opts.prefix)
        record = {"bin_dir": str(opts.bin_dir), "config": None if opts.skip_config else str(opts.config),
                  "links": [str(link) for link, _ in _links(opts)]}
        if any(state.get(k) != v for k, v in record.items()):
            state.update(record)
            _write_state(opts.prefix, state)
    restart_containerd(opts, rep, changed)
    rep.say(("dry run: planned " if opts.dry_run else "done: ")
            + (f"{len(rep.changes)} change(s)" if rep.changes else "nothing to change"))
    return 0


def uninstall(opts: Options, rep: Reporter) -> int:
    rep.say(f"uninstall: prefix {opts.prefix}; config {opts.config}; links in {opts.bin_dir}"
            + (" (dry run: nothing is changed)" if opts.dry_run else ""))
    changed = False
    if not opts.skip_config:
        changed = uninstall_config(opts, rep)
    uninstall_links(opts, rep)
    uninstall_prefix(opts, rep)
    if opts.seal_key is not None and os.path.lexists(opts.seal_key):
        rep.note(f"leaving the seal key {opts.seal_key}: checkpoints sealed with it need it to be restored")
    restart_containerd(opts, rep, changed)
    rep.say(("dry run: planned " if opts.dry_run else "done: ")
            + (f"{len(rep.changes)} change(s)" if rep.changes else "nothing to change"))
    return 0


# ---- command line --------------------------------------------------------------------------------
def _bool_arg(value: str) -> Optional[bool]:
    v = value.lower()
    if v == "auto":
        return None
    if v in ("true", "yes", "1", "on"):
        return True
    if v in ("false", "no", "0", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true, false or auto, not {value!r}")


def _extra_option(value: str) -> tuple[str, Any]:
    key, sep, raw = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, not {value!r}")
    if raw.lower() in ("true", "false"):
        return key, raw.lower() == "true"
    if re.fullmatch(r"-?\d+", raw):
        return key, int(raw)
    return key, raw


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kybernate-install",
        description="Install (or --uninstall) the Kybernate containerd runtime on this node.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Every step is idempotent; --dry-run prints the plan and the config.toml diff.")
    p.add_argument("--uninstall", action="store_true", help="remove the venv, the links and our config block")
    p.add_argument("--prefix", type=Path, default=Path(DEFAULT_PREFIX),
                   help=f"where the virtual environment goes (default {DEFAULT_PREFIX})")
    p.add_argument("--config", type=Path, default=Path(DEFAULT_CONFIG),
                   help=f"containerd's config.toml (default {DEFAULT_CONFIG})")
    p.add_argument("--bin-dir", type=Path, default=Path(DEFAULT_BIN_DIR),
                   help=f"a directory on containerd's PATH for the shim link (default {DEFAULT_BIN_DIR})")
    p.add_argument("--source", type=Path, default=None,
                   help="the package to install: a source directory or a wheel (default: the "
                        "kybernate-*.whl in --wheelhouse, else this checkout)")
    p.add_argument("--wheelhouse", type=Path, default=None,
                   help="install offline from the wheels in this directory (pip --no-index --find-links)")
    p.add_argument("--pip-arg", action="append", default=[], metavar="ARG",
                   help="extra argument for pip install (repeatable), e.g. --pip-arg=--index-url=...")
    p.add_argument("--python", default=sys.executable,
                   help="the Python that creates the venv (>= 3.10; default: the one running this)")
    p.add_argument("--containerd-binary", default="containerd",
                   help="containerd executable used to detect the version (default: containerd in PATH)")
    p.add_argument("--containerd-version", default="auto",
                   help="auto (from `containerd --version`), or e.g. 1.7 or 2.1")
    p.add_argument("--runtime-binary", default="",
                   help="BinaryName: the OCI runtime the shim runs (default empty: runc, or the "
                        "nvidia_runtime of /etc/kybernate/config.toml for GPUs that need injecting)")
    p.add_argument("--systemd-cgroup", type=_bool_arg, default=None, metavar="true|false|auto",
                   help="SystemdCgroup (default auto: as the config's runc runtime, else false)")
    p.add_argument("--runtime-option", type=_extra_option, action="append", default=[], metavar="KEY=VALUE",
                   help="another runtime option, e.g. CriuImagePath=/var/lib/kybernate/checkpoints")
    p.add_argument("--seal-key", default=DEFAULT_SEAL_KEY, metavar="PATH",
                   help=f"the node's checkpoint seal key, made when missing (default {DEFAULT_SEAL_KEY}; "
                        "'' for none)")
    p.add_argument("--skip-config", action="store_true", help="leave config.toml alone")
    p.add_argument("--restart-containerd", action="store_true",
                   help="restart containerd when config.toml changed")
    p.add_argument("--restart-command", default=DEFAULT_RESTART,
                   help=f"how to restart containerd (default: {DEFAULT_RESTART})")
    p.add_argument("--force-reinstall", action="store_true",
                   help="reinstall the package even when the same source is installed")
    p.add_argument("--dry-run", action="store_true", help="print what would change, change nothing")
    return p


def options_from_args(args: argparse.Namespace) -> Options:
    source = args.source
    if source is None and not args.uninstall:
        source = wheel_in(args.wheelhouse) if args.wheelhouse else default_source()
    settings = RuntimeSettings(binary_name=args.runtime_binary,
                               systemd_cgroup=bool(args.systemd_cgroup),
                               extra_options=tuple(args.runtime_option))
    return Options(prefix=args.prefix.absolute(), config=args.config.absolute(),
                   bin_dir=args.bin_dir.absolute(), source=source, wheelhouse=args.wheelhouse,
                   python=args.python, containerd_binary=args.containerd_binary,
                   containerd_version=args.containerd_version, settings=settings,
                   systemd_auto=args.systemd_cgroup is None, restart=args.restart_containerd,
                   restart_command=args.restart_command, dry_run=args.dry_run,
                   force_reinstall=args.force_reinstall, skip_config=args.skip_config,
                   pip_args=tuple(args.pip_arg),
                   seal_key=Path(args.seal_key).absolute() if args.seal_key else None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = options_from_args(args)
    rep = Reporter(dry_run=opts.dry_run)
    try:
        return uninstall(opts, rep) if args.uninstall else install(opts, rep)
    except (InstallError, ConfigError) as exc:
        print(f"kybernate-install: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
