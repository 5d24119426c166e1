#!/usr/bin/env python3
"""containerd's config.toml and our runtime in it: reading, merging our block in, taking it out.

Text in, text out: nothing here touches a file, runs containerd or installs anything (that is
kybernate_install.py), so every rule is tested on strings.

The block: our runtime's tables between marker comments, in the file's own schema (version 1
`plugins.cri`, 2 `plugins."io.containerd.grpc.v1.cri"`, 3 `plugins."io.containerd.cri.v1.runtime"`);
the rest of the file is never rewritten. Every merge is re-read with tomllib and compared with the
original, so no other runtime or setting can be lost; a config.toml that is not valid TOML is refused
with tomllib's line and column. Standard library only (Python >= 3.11 for tomllib, or `tomli`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Optional, Sequence

try:  # Python 3.11+
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10 with tomli installed
    import tomli as tomllib  # type: ignore[no-redef]

RUNTIME_NAME = "kybernate"
RUNTIME_TYPE = "io.containerd.kybernate.v1"
ANNOTATIONS = ("kybernate.io/*",)

BLOCK_BEGIN = "# >>> kybernate runtime: managed by kybernate-install, edits inside are replaced >>>"
BLOCK_END = "# <<< kybernate runtime <<<"
CREATED_NOTE = "# kybernate-install created this file"

# CRI plugin table per config schema version.
CRI_PLUGIN = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
# Plugin ids that disable CRI when listed in disabled_plugins.
CRI_PLUGIN_IDS = {"cri", "io.containerd.grpc.v1.cri", "io.containerd.cri.v1.runtime"}

_TOML_LINE_RE = re.compile(r"at line (\d+), column (\d+)")


class ConfigError(Exception):
    """config.toml cannot be merged (malformed, foreign kybernate entry, schema mismatch); the message
    says what the operator must fix."""

    def __init__(self, message: str, line: Optional[int] = None):
        self.line = line
        super().__init__(message)


# ---- TOML text ----------------------------------------------------------------------------------
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
