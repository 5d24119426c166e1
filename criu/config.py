"""The CRIU configuration file that runc hands to CRIU, and the annotation that names it.

How runc finds it (libcontainer ``handleCriuConfigurationFile``, runc 1.1 and later): when the
container's spec has the annotation ``org.criu.config`` runc passes that path to CRIU (an empty value
means "no file at all"); without the annotation runc passes ``/etc/criu/runc.conf``. CRIU (3.11+)
parses it *after* the options runc sent over RPC, so the file's settings override runc's.

Which one we use, and why: a per-task file named by the annotation. ``/etc/criu/runc.conf`` is global
to the node: every runc container (those of the stock ``io.containerd.runc.v2`` shim too) would get
our plugin dir, log file and TCP policy, and two tasks could not have different settings. So the shim
writes one file per task (e.g. ``<bundle>/criu-runc.conf``) and sets the annotation in the bundle's
``config.json``. Timing matters: for ``runc checkpoint`` runc reads the annotation from the config it
stored at ``runc create``, for ``runc restore`` from the bundle's ``config.json`` then; so the
annotation must be in ``config.json`` before create *and* before restore.

Caveat: ``log-file`` here overrides runc's ``dump.log``/``restore.log`` in the work path, so runc's
own error text then names a log file that does not exist; see ``criu.logs.locate_log``.

Syntax (CRIU ``criu/config.c``): one option per line, the long option name without the leading
dashes, then its value separated by whitespace; ``#`` starts a comment. Options whose argument is
optional (``manage-cgroups``, ``ext-unix-sk``) need ``name=value`` in one word, as getopt wants.
The parser documents quoted values, but CRIU 4.1.1 here rejects any quoted value containing a
space ("Unsupported configuration file format") and cuts a value at ``#`` (checked with
``criu check --config``). So we refuse values with whitespace, quotes or ``#`` rather than write a
file that makes every checkpoint fail.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, MutableMapping, Optional, Union

from fsutil.atomic import atomic_write

CRIU_CONFIG_ANNOTATION = "org.criu.config"
RUNC_DEFAULT_CONFIG = "/etc/criu/runc.conf"
#: File name the shim uses for its per-task config inside the bundle.
TASK_CONFIG_NAME = "criu-runc.conf"

Option = Union[str, tuple[str, Optional[str]]]


def _check_value(value: str) -> str:
    """A value CRIU 4.1.1 reads back unchanged; ``""`` is CRIU's spelling of an empty value."""
    if value == "":
        return '""'
    if any(c.isspace() for c in value) or '"' in value or "#" in value:
        raise ValueError(f"CRIU's config parser cannot carry whitespace, quotes or '#' in a value: "
                         f"{value!r}")
    return value


def _option_line(opt: Option) -> str:
    """One line from ``"tcp-established"``, ``"ext-mount-map auto"`` or ``("log-file", "/x")``."""
    if isinstance(opt, tuple):
        name, value = opt
    else:
        name, _, rest = opt.strip().partition(" ")
        value = rest.strip() or None
        if value == '""':
            value = ""
    name = name.strip().lstrip("-")
    if not name or any(c.isspace() for c in name):
        raise ValueError(f"bad CRIU option name {name!r}")
    return name if value is None else f"{name} {_check_value(str(value))}"


def render_criu_config(*, plugin_dir: Optional[str | os.PathLike] = None,
                       log_file: Optional[str | os.PathLike] = None,
                       extra_options: Iterable[Option] = ()) -> str:
    """Text of the config file; the header says who wrote it, since operators will find it on disk."""
    lines = ["# written by kybernate: CRIU options for runc (see org.criu.config)"]
    if plugin_dir is not None:
        lines.append(_option_line(("libdir", os.fspath(plugin_dir))))
    if log_file is not None:
        lines.append(_option_line(("log-file", os.fspath(log_file))))
    lines.extend(_option_line(o) for o in extra_options)
    return "\n".join(lines) + "\n"


def write_runc_criu_config(path: str | os.PathLike, *, plugin_dir: Optional[str | os.PathLike] = None,
                           log_file: Optional[str | os.PathLike] = None,
                           extra_options: Iterable[Option] = (), durable: bool = True) -> Path:
    """Write the file atomically (runc/CRIU may read it while a previous task's write is replaced);
    durable=False: without fsync (a file in a task's bundle: `fsutil.atomic.atomic_write`)."""
    path = Path(path)
    atomic_write(path, render_criu_config(plugin_dir=plugin_dir, log_file=log_file,
                                          extra_options=extra_options), durable=durable)
    return path


def parse_criu_config(text: str) -> list[tuple[str, Optional[str]]]:
    """Read back our own files (tests, diagnostics): (name, value) per line, comments dropped."""
    out: list[tuple[str, Optional[str]]] = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, _, rest = line.partition(" ")
        rest = rest.strip()
        if rest == '""':
            rest = ""
            out.append((name, rest))
            continue
        out.append((name, rest or None))
    return out


def set_criu_config_annotation(spec: MutableMapping[str, Any],
                               config_path: Optional[str | os.PathLike]) -> MutableMapping[str, Any]:
    """Add or update ``org.criu.config`` in an OCI spec dict (``None`` removes it: runc's default).

    Mutates and returns ``spec`` so it can be used inline.
    """
    annotations = spec.get("annotations")
    if annotations is None:
        annotations = spec["annotations"] = {}
    if config_path is None:
        annotations.pop(CRIU_CONFIG_ANNOTATION, None)
    else:
        annotations[CRIU_CONFIG_ANNOTATION] = os.fspath(config_path)
    return spec


def criu_config_of(spec: Mapping[str, Any]) -> Optional[str]:
    """The file runc will hand to CRIU for this spec ('' = none), mirroring runc's rule."""
    annotations = spec.get("annotations") or {}
    if CRIU_CONFIG_ANNOTATION in annotations:
        return annotations[CRIU_CONFIG_ANNOTATION]
    return RUNC_DEFAULT_CONFIG


def annotate_bundle(bundle: str | os.PathLike, config_path: Optional[str | os.PathLike],
                    durable: bool = True) -> Path:
    """Set the annotation in ``<bundle>/config.json`` in place (atomic rename, other keys untouched);
    durable=False: without fsync, as containerd wrote the file (`fsutil.atomic.atomic_write`)."""
    spec_path = Path(bundle) / "config.json"
    spec = json.loads(spec_path.read_text())
    set_criu_config_annotation(spec, config_path)
    atomic_write(spec_path, json.dumps(spec, indent=None, separators=(",", ":")),
                 mode=spec_path.stat().st_mode & 0o7777, durable=durable)
    return spec_path
