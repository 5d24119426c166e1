"""Reading containerd's config.toml for `kybernate doctor`: which schema, where our runtime is declared.

The node installer (packaging/kybernate_install.py) writes the entry; this module only reads, with the
same rules containerd applies: a file without `version` is version 1 (CRI plugin `cri`), version 2
uses `io.containerd.grpc.v1.cri`, version 3 (containerd 2.x) `io.containerd.cri.v1.runtime`; files
named in `imports` are read too.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import re
from pathlib import Path
from typing import Any, Optional

from . import RUNTIME_HANDLER, RUNTIME_TYPE

CRI_PLUGIN = {1: "cri", 2: "io.containerd.grpc.v1.cri", 3: "io.containerd.cri.v1.runtime"}
CRI_PLUGIN_IDS = set(CRI_PLUGIN.values())
_LINE_RE = re.compile(r"at line (\d+), column (\d+)")


class ConfigUnreadable(Exception):
    def __init__(self, message: str, line: Optional[int] = None):
        self.line = line
        super().__init__(message)


def _toml():
    try:
        import tomllib
        return tomllib
    except ModuleNotFoundError:  # Python 3.10
        try:
            import tomli  # type: ignore
            return tomli
        except ModuleNotFoundError:
            return None


def load(path: Path) -> dict:
    toml = _toml()
    if toml is None:
        raise ConfigUnreadable("cannot read TOML: Python < 3.11 and no tomli installed")
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigUnreadable(f"cannot read {path}: {exc.strerror}") from None
    try:
        return toml.loads(text)
    except toml.TOMLDecodeError as exc:
        m = _LINE_RE.search(str(exc))
        line = int(m.group(1)) if m else None
        raise ConfigUnreadable(f"{path} is not valid TOML{f' at line {line}' if line else ''}: {exc}",
                               line) from None


@dataclasses.dataclass
class RuntimeEntry:
    file: str
    schema: int
    plugin: str
    handler: str
    table: dict

    @property
    def annotations_pass(self) -> bool:
        pats = list(self.table.get("pod_annotations") or []) + list(self.table.get("container_annotations") or [])
        return any(p in ("kybernate.io/*", "*") or p.startswith("kybernate.io/") for p in pats)


@dataclasses.dataclass
class ConfigReport:
    path: str
    exists: bool
    schema: Optional[int] = None
    entries: list[RuntimeEntry] = dataclasses.field(default_factory=list)
    misplaced: list[str] = dataclasses.field(default_factory=list)  # entries containerd will not read
    cri_disabled: bool = False
    files: list[str] = dataclasses.field(default_factory=list)


def _dig(data: Any, *keys: str) -> Any:
    for k in keys:
        if not isinstance(data, dict):
            return None
        data = data.get(k)
    return data


def _runtimes_in(parsed: dict, plugin: str) -> dict:
    rts = _dig(parsed, "plugins", plugin, "containerd", "runtimes")
    return rts if isinstance(rts, dict) else {}


def _schema(parsed: dict) -> int:
    v = parsed.get("version")
    return v if isinstance(v, int) and v in CRI_PLUGIN else 1


def inspect(path: str | os.PathLike) -> ConfigReport:
    """What containerd will make of `path` regarding our runtime. Raises ConfigUnreadable."""
    path = Path(path)
    report = ConfigReport(str(path), path.exists())
    if not path.exists():
        return report
    parsed = load(path)
    report.schema = _schema(parsed)
    report.files.append(str(path))
    docs = [(str(path), parsed)]
    for pattern in parsed.get("imports") or []:
        if not isinstance(pattern, str):
            continue
        if not os.path.isabs(pattern):
            pattern = str(path.parent / pattern)
        for f in sorted(glob.glob(pattern)):
            docs.append((f, load(Path(f))))
            report.files.append(f)
    disabled = parsed.get("disabled_plugins") or []
    report.cri_disabled = isinstance(disabled, list) and any(p in CRI_PLUGIN_IDS for p in disabled)
    wanted = CRI_PLUGIN[report.schema]
    for fname, doc in docs:
        schema = _schema(doc) if fname != str(path) else report.schema
        for s, plugin in CRI_PLUGIN.items():
            for handler, table in _runtimes_in(doc, plugin).items():
                if not isinstance(table, dict):
                    continue
                if table.get("runtime_type") != RUNTIME_TYPE and handler != RUNTIME_HANDLER:
                    continue
                if plugin == CRI_PLUGIN[schema] or (fname != str(path) and plugin == wanted):
                    report.entries.append(RuntimeEntry(fname, schema, plugin, handler, table))
                else:
                    report.misplaced.append(f"{fname}: [plugins.\"{plugin}\".containerd.runtimes.{handler}] "
                                            f"is not read in a version {schema} config "
                                            f"(there the table is plugins.\"{CRI_PLUGIN[schema]}\")")
    return report
