"""The node's own configuration: the trusted half of every setting.

Who may say what (docs/security.md): the node's operator (this file, the shim's environment that
containerd hands it, containerd's runtime options) is trusted; pod authors, images and checkpoint
images are not (`shim.policy.untrusted` turns what they say into settings, or refuses it). So every
knob that names a host path, a library, a binary or a widening of what a pod may reach lives here.

The file is TOML, ``/etc/kybernate/config.toml`` unless the shim's environment names another one in
``KYBERNATE_CONFIG`` (containerd's environment, set by the operator). A missing file means the
defaults, which are the safe ones. Only root may own it: a file that others can write is refused,
since it widens what pods may reach.

    [checkpoint]
    store = "/var/lib/kybernate/checkpoints"   # root-owned store, scoped by namespace (0700)
    restore_roots = []                         # host dirs outside the store that restore-from may name
    accept_restore_from_env = false            # RESTORE_FROM in an image's env restores (off: ignored)
    seal_key_file = "/etc/kybernate/seal.key"  # key that authenticates checkpoint manifests
    require_seal = true                        # refuse unsealed images (restore-from, CRI)
    seal_witness_dir = "/run/kybernate/sealed" # root-only; lets a restore skip re-hashing files this node
                                               # hashed, unchanged since ("" = hash every byte every time)
    [criu]
    plugin_dir = ""                            # CRIU plugins ("" = none: CRIU's built-in default)
    checkpoint_timeout_s = 600                 # deadline of one runc checkpoint (CRIU dump)
    restore_timeout_s = 600                    # deadline of one runc restore
    [gpu]
    libcuda = ""                               # absolute host path of libcuda.so.1 ("" = the loader)
    accept_visible_devices_env = false         # NVIDIA_VISIBLE_DEVICES in a pod/image env grants GPUs
    nvidia_runtime = ""                        # nvidia-container-runtime for GPU bundles without CDI devices

Environment variables that predate this file still count, since they too come from the node:
KYBERNATE_LIBCUDA (gpu.libcuda), KYBERNATE_CRIU_PLUGIN_DIR (criu.plugin_dir). The file wins.
"""
from __future__ import annotations

import os
import stat
from dataclasses import dataclass, fields
from typing import Mapping, Optional

from fsutil.bounded import UnsafeFile, read_regular

CONFIG_ENV = "KYBERNATE_CONFIG"
DEFAULT_CONFIG = "/etc/kybernate/config.toml"
DEFAULT_STORE = "/var/lib/kybernate/checkpoints"
DEFAULT_SEAL_KEY = "/etc/kybernate/seal.key"
DEFAULT_SEAL_WITNESS_DIR = "/run/kybernate/sealed"
MAX_CONFIG_BYTES = 1 << 20


class NodeConfigError(ValueError):
    """The node's config file is unreadable, malformed or not root's: the shim refuses to guess."""


@dataclass(frozen=True)
class NodeConfig:
    checkpoint_store: str = DEFAULT_STORE
    restore_roots: tuple[str, ...] = ()
    accept_restore_from_env: bool = False
    seal_key_file: str = DEFAULT_SEAL_KEY
    require_seal: bool = True
    seal_witness_dir: str = DEFAULT_SEAL_WITNESS_DIR
    criu_plugin_dir: str = ""
    checkpoint_timeout_s: float = 600.0
    restore_timeout_s: float = 600.0
    libcuda: str = ""
    accept_visible_devices_env: bool = False
    nvidia_runtime: str = ""
    source: str = "defaults"

    @classmethod
    def load(cls, environ: Mapping[str, str] = os.environ, path: Optional[str] = None) -> "NodeConfig":
        """The node's settings: the file (if any) over the node's environment over the defaults."""
        path = path or environ.get(CONFIG_ENV) or DEFAULT_CONFIG
        values: dict = {}
        if environ.get("KYBERNATE_LIBCUDA"):
            values["libcuda"] = environ["KYBERNATE_LIBCUDA"]
        if environ.get("KYBERNATE_CRIU_PLUGIN_DIR"):
            values["criu_plugin_dir"] = environ["KYBERNATE_CRIU_PLUGIN_DIR"]
        doc = _read_toml(path)
        source = "defaults" if doc is None else path
        for section, key, name in _KEYS:
            if doc is not None and key in (doc.get(section) or {}):
                values[name] = doc[section][key]
        try:
            config = cls(**{k: _coerce(k, v) for k, v in values.items()}, source=source)
        except (TypeError, ValueError) as exc:
            raise NodeConfigError(f"node config {path}: {exc}") from exc
        config.check()
        return config

    def check(self) -> None:
        """Paths the root code uses must be absolute; deadlines positive."""
        for name in ("checkpoint_store", "seal_key_file"):
            if not os.path.isabs(getattr(self, name)):
                raise NodeConfigError(f"node config {self.source}: {name}={getattr(self, name)!r} is not absolute")
        for name in ("criu_plugin_dir", "libcuda", "seal_witness_dir"):
            value = getattr(self, name)
            if value and not os.path.isabs(value):
                raise NodeConfigError(f"node config {self.source}: {name}={value!r} is not absolute")
        for root in self.restore_roots:
            if not os.path.isabs(root) or os.path.normpath(root) == "/":
                raise NodeConfigError(f"node config {self.source}: restore_roots entry {root!r} must be an "
                                      f"absolute directory other than /")
        for name in ("checkpoint_timeout_s", "restore_timeout_s"):
            if not getattr(self, name) > 0:
                raise NodeConfigError(f"node config {self.source}: {name} must be > 0")


# (TOML section, key, NodeConfig field)
_KEYS = (
    ("checkpoint", "store", "checkpoint_store"),
    ("checkpoint", "restore_roots", "restore_roots"),
    ("checkpoint", "accept_restore_from_env", "accept_restore_from_env"),
    ("checkpoint", "seal_key_file", "seal_key_file"),
    ("checkpoint", "require_seal", "require_seal"),
    ("checkpoint", "seal_witness_dir", "seal_witness_dir"),
    ("criu", "plugin_dir", "criu_plugin_dir"),
    ("criu", "checkpoint_timeout_s", "checkpoint_timeout_s"),
    ("criu", "restore_timeout_s", "restore_timeout_s"),
    ("gpu", "libcuda", "libcuda"),
    ("gpu", "accept_visible_devices_env", "accept_visible_devices_env"),
    ("gpu", "nvidia_runtime", "nvidia_runtime"),
)
_TYPES = {f.name: f.type for f in fields(NodeConfig)}


def _coerce(name: str, value):
    kind = _TYPES[name]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{name} must be a number of seconds, not {value!r}")
        return float(value)
    if kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be a string, not {value!r}")
        return value
    if kind.startswith("tuple"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(f"{name} must be a list of strings, not {value!r}")
        return tuple(value)
    raise ValueError(f"unknown setting {name}")


def _read_toml(path: str) -> Optional[dict]:
    """The parsed file, or None when it does not exist; refused when others may write it."""
    import tomllib

    try:
        found = read_regular(path, MAX_CONFIG_BYTES)
    except UnsafeFile as exc:
        raise NodeConfigError(f"node config {path}: {exc}") from exc
    except OSError as exc:
        raise NodeConfigError(f"node config {path}: {exc.strerror}") from exc
    if found is None:
        return None
    data, st = found
    if st.st_uid != 0 or st.st_mode & 0o022:
        raise NodeConfigError(f"node config {path}: must be owned by root and not writable by group or others "
                              f"(uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):o})")
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NodeConfigError(f"node config {path}: {exc}") from exc
    unknown = sorted(f"{s}.{k}" for s, tbl in doc.items() if isinstance(tbl, dict) for k in tbl
                     if (s, k) not in {(a, b) for a, b, _ in _KEYS})
    unknown += sorted(s for s, tbl in doc.items() if not isinstance(tbl, dict))
    if unknown:
        raise NodeConfigError(f"node config {path}: unknown setting(s) {', '.join(unknown)}")
    return doc
