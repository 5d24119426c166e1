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
  3. config.toml: one block, between marker comments, declaring the runtime for the CRI plugin in the
     file's own schema (version 1 `plugins.cri`, 2 `plugins."io.containerd.grpc.v1.cri"`, 3
     `plugins."io.containerd.cri.v1.runtime"`); the rest of the file is never rewritten. The result is
     re-read with tomllib and compared with the original, so no other runtime or setting can be lost;
     the original is kept as config.toml.kybernate-backup. A config.toml that is not valid TOML is
     refused with tomllib's line and column.
  4. with --restart-containerd, and only when config.toml changed: `systemctl restart containerd`.
`--uninstall` reverses 1-3 and removes the backup when the file is back to what it was, so nothing is
left behind. Standard library only (Python >= 3.11 for tomllib, or `tomli` installed), so it runs
before anything of Kybernate is installed.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import hashlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with tomli installed
    import tomli as tomllib  # type: ignore[no-redef]

RUNTIME_NAME = "kybernate"
RUNTIME_TYPE = "io.containerd.kybernate.v1"
SHIM_BINARY = "containerd-shim-kybernate-v1"
OPERATOR_BINARY = "kybernate"
PACKAGE = "kybernate"
ANNOTATIONS = ("kybernate.io/*",)

DEFAULT_PREFIX = "/opt/kybernate"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
DEFAULT_BIN_DIR = "/usr/local/bin"
DEFAULT_RESTART = "systemctl restart containerd"
STATE_FILE = "install.json"
BACKUP_SUFFIX = ".kybernate-backup"

BLOCK_BEGIN = "# >>> kybernate runtime: managed by kybernate-install, edits inside are replaced >>>"
BLOCK_END = "# <<< kybernate runtime <<<"
CREATED_NOTE = "# kybernate-install created this file"

# CRI plugin table per config schema version.
CRI_PLUGIN = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
# Plugin ids that disable CRI when listed in disabled_plugins.
CRI_PLUGIN_IDS = {"cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"}

_TOML_LINE_RE = re.compile(r"at line (\d+), column (\d+)")


class InstallError(Exception):
    """Something the operator must fix; the message says what. Exit status 1."""


class ConfigError(InstallError):
    """config.toml cannot be merged (malformed, foreign kybernate entry, schema mismatch)."""

    def __init__(self, message: str, line: Optional[int] = None):
        self.line = line
        super().__init__(message)


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


# ---- TOML helpers --------------------------------------------------------------------------------
def toml_string(value: str) -> str:
    out = ['"']
    for ch in value:
        if ch == '"':
            out.append('\\"')
        elif ch == "\\":
            out.append("\\\\")
        elif ch == "\n":
            out.append("\\n")
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    out.append('"')
    return "".join(out)


def toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else toml_string(key)


def parse_toml(text: str, source: str) -> dict:
    """tomllib.loads, turning its error into a ConfigError carrying the line number."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        m = _TOML_LINE_RE.search(str(exc))
        line = int(m.group(1)) if m else None
        where = f" at line {line}" if line else ""
        raise ConfigError(f"{source} is not valid TOML{where}: {exc}; fix it (or restore a backup) and "
                          "run the installer again", line) from None


@dataclasses.dataclass(frozen=True)
class RuntimeSettings:
    """What goes into our runtime entry."""

    binary_name: str = ""          # OCI runtime; empty: the shim picks (runc, or the node config's nvidia_runtime)
    systemd_cgroup: bool = False
    annotations: tuple[str, ...] = ANNOTATIONS
    extra_options: tuple[tuple[str, Any], ...] = ()   # further runc-style options, e.g. CriuImagePath


def _toml_value(v: Any) -> str:
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, int):
        return str(v)
    if isinstance(v, str):
        return toml_string(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_toml_value(x) for x in v) + "]"
    raise TypeError(f"cannot write {type(v).__name__} as TOML")


def runtime_table(schema: int) -> str:
    plugin = CRI_PLUGIN[schema]
    return f"plugins.{toml_key(plugin)}.containerd.runtimes.{RUNTIME_NAME}"


def runtime_path(schema: int) -> tuple[str, ...]:
    return ("plugins", CRI_PLUGIN[schema], "containerd", "runtimes", RUNTIME_NAME)


def render_entry(schema: int, settings: RuntimeSettings) -> str:
    """The runtime's TOML tables (no markers): what the packaging/containerd snippets hold."""
    table = runtime_table(schema)
    lines = [
        f"[{table}]",
        f"  runtime_type = {toml_string(RUNTIME_TYPE)}",
        f"  pod_annotations = {_toml_value(list(settings.annotations))}",
        f"  container_annotations = {_toml_value(list(settings.annotations))}",
        f"[{table}.options]",
        f"  BinaryName = {toml_string(settings.binary_name)}",
        f"  SystemdCgroup = {_toml_value(settings.systemd_cgroup)}",
    ]
    for key, value in settings.extra_options:
        lines.append(f"  {toml_key(key)} = {_toml_value(value)}")
    return "\n".join(lines) + "\n"


def render_block(schema: int, settings: RuntimeSettings, version_line: Optional[int] = None,
                 created_file: bool = False) -> str:
    lines = [BLOCK_BEGIN]
    if created_file:
        lines.append(CREATED_NOTE)
    if version_line is not None:
        lines.append(f"version = {version_line}")
        lines.append("")
    lines.append(render_entry(schema, settings).rstrip("\n"))
    lines.append(BLOCK_END)
    return "\n".join(lines) + "\n"


@dataclasses.dataclass(frozen=True)
class Block:
    start: int          # offset of the BEGIN marker line
    end: int            # offset just past the END marker line (and its newline)
    created_file: bool


def find_block(text: str, source: str = "config.toml") -> Optional[Block]:
    """Our marked block in `text`, or None. Unbalanced or repeated markers are refused."""
    lines = text.splitlines(keepends=True)
    begins = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == BLOCK_BEGIN]
    ends = [i for i, line in enumerate(lines) if line.rstrip("\r\n") == BLOCK_END]
    if not begins and not ends:
        return None
    if len(begins) != 1 or len(ends) != 1 or ends[0] < begins[0]:
        raise ConfigError(f"{source}: the kybernate block markers are damaged "
                          f"({len(begins)} begin at lines {[b + 1 for b in begins]}, {len(ends)} end at "
                          f"lines {[e + 1 for e in ends]}); remove the kybernate lines by hand and run "
                          "the installer again", (begins or ends)[0] + 1)
    b, e = begins[0], ends[0]
    start = sum(len(x) for x in lines[:b])
    end = sum(len(x) for x in lines[:e + 1])
    created = any(x.rstrip("\r\n") == CREATED_NOTE for x in lines[b:e])
    return Block(start, end, created)


def strip_block(text: str, block: Block) -> str:
    """`text` without our block and the blank line the installer put before it."""
    before, after = text[:block.start], text[block.end:]
    if before.endswith("\n\n"):
        before = before[:-1]
    return before + after


def _dig(data: dict, path: Sequence[str]) -> Any:
    cur: Any = data
    for key in path:
        if not isinstance(cur, dict) or key not in cur:
            return None
        cur = cur[key]
    return cur


def _remove(data: dict, path: Sequence[str]) -> dict:
    """Deep copy of data without the key at path, and without tables that only held it."""
    if not path:
        return data
    out = dict(data)
    key = path[0]
    if key not in out:
        return out
    if len(path) == 1:
        del out[key]
        return out
    if isinstance(out[key], dict):
        child = _remove(out[key], path[1:])
        if child or not out[key]:
            out[key] = child
        else:
            del out[key]
    return out


def config_schema(parsed: dict, empty: bool, containerd: tuple[int, int, int], source: str) -> int:
    """The schema version containerd will read this file with."""
    version = parsed.get("version")
    if version is None:
        if empty:
            return 3 if containerd[0] >= 2 else 2
        return 1   # containerd (1.x and 2.x) reads a file without `version` as version 1
    if not isinstance(version, int) or version not in (1, 2, 3):
        raise ConfigError(f"{source}: unknown config version {version!r}; containerd knows 1, 2 and 3")
    if version == 3 and containerd[0] < 2:
        raise ConfigError(f"{source} is config version 3 (containerd 2.x) but containerd is "
                          f"{'.'.join(map(str, containerd))}, which reads versions 1 and 2 only")
    return version


def _line_of(text: str, needle_re: str) -> Optional[int]:
    for i, line in enumerate(text.splitlines(), 1):
        if re.search(needle_re, line):
            return i
    return None


def detect_systemd_cgroup(parsed: dict, schema: int) -> Optional[bool]:
    """SystemdCgroup of the config's runc runtime(s), so our runtime matches kubelet's cgroup driver."""
    runtimes = _dig(parsed, ("plugins", CRI_PLUGIN[schema], "containerd", "runtimes"))
    if not isinstance(runtimes, dict):
        return None
    for name, rt in runtimes.items():
        if name == RUNTIME_NAME or not isinstance(rt, dict):
            continue
        if str(rt.get("runtime_type", "")).startswith("io.containerd.runc"):
            value = _dig(rt, ("options", "SystemdCgroup"))
            if isinstance(value, bool):
                return value
    return None


def cri_disabled(parsed: dict) -> bool:
    disabled = parsed.get("disabled_plugins") or []
    return isinstance(disabled, list) and any(p in CRI_PLUGIN_IDS for p in disabled)


@dataclasses.dataclass
class MergeResult:
    text: str
    changed: bool
    schema: int
    notes: list[str]


def merge_config(text: Optional[str], containerd: tuple[int, int, int], settings: RuntimeSettings,
                 source: str = "config.toml", systemd_auto: bool = False) -> MergeResult:
    """config.toml text (None: the file does not exist) -> the text with our runtime declared.

    systemd_auto: take SystemdCgroup from the config's runc runtime when it has one.
    """
    notes: list[str] = []
    original = "" if text is None else text
    parse_toml(original, source)            # line numbers of the file as the operator sees it
    block = find_block(original, source)
    created_file = text is None or (block is not None and block.created_file)
    base = strip_block(original, block) if block else original
    parsed_base = parse_toml(base, f"{source} (without the kybernate block)")
    empty = not parsed_base
    schema = config_schema(parsed_base, empty, containerd, source)
    path = runtime_path(schema)
    if _dig(parsed_base, path) is not None:
        line = _line_of(base, r"runtimes\.\"?" + RUNTIME_NAME + r"\b|^\s*\"?" + RUNTIME_NAME + r"\"?\s*=")
        raise ConfigError(f"{source} already declares the runtime {RUNTIME_NAME!r} outside the kybernate "
                          f"block (line {line}); remove that entry, or keep it and do not run the "
                          "installer's config step", line)
    if systemd_auto:
        detected = detect_systemd_cgroup(parsed_base, schema)
        if detected is not None and detected != settings.systemd_cgroup:
            settings = dataclasses.replace(settings, systemd_cgroup=detected)
            notes.append(f"SystemdCgroup = {str(detected).lower()}, as for the config's runc runtime")
    if schema == 2 and containerd[0] >= 2:
        notes.append("config version 2 on containerd 2.x: containerd migrates it to version 3 at start")
    if schema == 1 and containerd[0] >= 2:
        raise ConfigError(f"{source} has no `version` line, so containerd reads it as version 1, and "
                          f"containerd {'.'.join(map(str, containerd))} does not carry CRI runtimes over from a "
                          "version 1 file (checked with `containerd config dump` on 2.1): convert it first "
                          "(`containerd config migrate > new.toml`, review, replace) and run the installer again")
    if schema == 1:
        notes.append("config has no `version` line, so containerd reads it as version 1 "
                     "(plugins.cri); consider migrating it with `containerd config migrate`")
    if cri_disabled(parsed_base):
        notes.append("the CRI plugin is disabled in this config (disabled_plugins): Kubernetes cannot use "
                     "the runtime; ctr can")

    # An empty file gets the version line (it would otherwise be read as version 1): inside our block
    # when the file existed (uninstall then gives it back as it was), above it in a file we create.
    new_block = render_block(schema, settings, version_line=schema if empty and text is not None else None,
                             created_file=created_file)
    if text is None:
        new = f"version = {schema}\n\n" + new_block
    elif block is not None:
        new = original[:block.start] + new_block + original[block.end:]   # in place: re-runs move nothing
    elif base.strip():
        new = base + ("\n" if base.endswith("\n") else "\n\n") + new_block
    else:
        new = base + new_block
    # Validate what we are about to write: valid TOML, our entry as rendered, everything else equal.
    try:
        parsed_new = tomllib.loads(new)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{source}: adding the [{runtime_table(schema)}] table would make the file "
                          f"invalid TOML ({exc}); the file defines that part of the tree in a form a table "
                          "cannot extend (an inline table?). Declare the runtime by hand (see "
                          "packaging/containerd/)") from None
    expected_entry = tomllib.loads(render_entry(schema, settings))
    if _dig(parsed_new, path) != _dig(expected_entry, path):
        raise ConfigError(f"{source}: after the merge the runtime entry reads differently from what was "
                          "written; refusing to write")
    without = _remove(parsed_new, path)
    if empty:
        without.pop("version", None)
    if without != parsed_base:
        raise ConfigError(f"{source}: the merge would change settings other than the kybernate runtime; "
                          "refusing to write")
    return MergeResult(new, new != original, schema, notes)


def unmerge_config(text: str, source: str = "config.toml") -> tuple[Optional[str], bool]:
    """Remove our block. Returns (new text, or None when the file should be deleted; changed)."""
    block = find_block(text, source)
    if block is None:
        return text, False
    new = strip_block(text, block)
    if block.created_file and re.fullmatch(r"(version\s*=\s*\d+)?", new.strip()):
        return None, True
    parse_toml(new, f"{source} (without the kybernate block)")
    return new, True


# ---- files ----------------------------------------------------------------------------------------
def atomic_write(path: Path, text: str, like: Optional[os.stat_result] = None) -> None:
    """Write via a temporary file in the same directory and rename; keep mode and owner of `like`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=str(path.parent))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        if like is not None:
            os.chmod(tmp, like.st_mode & 0o7777)
            try:
                os.chown(tmp, like.st_uid, like.st_gid)
            except PermissionError:
                pass
        else:
            os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise


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
    atomic_write(prefix / STATE_FILE, json.dumps(state, indent=2, sort_keys=True) + "\n")


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
    atomic_write(path, result.text, st)
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
                atomic_write(path, result, path.stat())
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
                   pip_args=tuple(args.pip_arg))


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    opts = options_from_args(args)
    rep = Reporter(dry_run=opts.dry_run)
    try:
        return uninstall(opts, rep) if args.uninstall else install(opts, rep)
    except InstallError as exc:
        print(f"kybernate-install: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
