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
    [store]                                    # checkpoint tiers (`tiers`): off while ram_dir and registry are ""
    ram_dir = ""                               # tier 1: a tmpfs dir, root's (0700), laid out like the store
    ram_cap_mib = 0                            # tier 1 cap (0: the filesystem's free space only)
    disk_dir = ""                              # tier 2: a local disk dir ("" = checkpoint.store)
    disk_cap_mib = 0                           # tier 2 cap (0: the filesystem's free space only)
    registry = ""                              # tier 3: OCI repository HOST[:PORT]/PATH ("" = none)
    registry_plain_http = false                # http:// instead of https:// (a registry on loopback)
    credentials_file = ""                      # root's 0600 JSON {"username": .., "password": ..}
    state_dir = "/var/lib/kybernate/tiers"     # catalog and the worker's queue (root's, 0700)
    keep_last = 0                              # checkpoints kept per container (0: all)
    chunk_mib = 16                             # registry blob size: unit of parallel pulls and of sharing
    parallel_transfers = 4                     # blobs pushed or pulled at once
    min_idle_s = 60                            # a checkpoint used this recently is not evicted
    [broker]                                   # the node broker (`kybernate broker serve`, issue 17)
    socket = "/run/kybernate/broker.sock"      # its control socket (root only): kybernate wake, ps
    state_dir = "/run/kybernate/broker"        # what it parked (root's, 0700)
    poll_s = 1.0                               # seconds between GPU readings
    min_idle_s = 10                            # making room parks only containers idle this long
    silent_wake_s = 1.0                        # a connection to a parked container that sends nothing
                                               # this long wakes it (protocols where the server speaks first)
    wake_timeout_s = 120                       # one resume (and the room made for it) must finish in this
    metrics_address = ""                       # Prometheus metrics HOST:PORT ("" = none)
    kube_events = true                         # post Kubernetes pod events where it has credentials
    exec_wait_s = 30                           # the shim: an exec started in a paused container waits this
                                               # long for a resume while a broker serves the node (its socket
                                               # answers), then fails; 0: fails at once

Environment variables that predate this file still count, since they too come from the node:
KYBERNATE_LIBCUDA (gpu.libcuda), KYBERNATE_CRIU_PLUGIN_DIR (criu.plugin_dir). The file wins.
"""
from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass, fields
from typing import Mapping, Optional

from fsutil.bounded import UnsafeFile, read_regular

CONFIG_ENV = "KYBERNATE_CONFIG"
DEFAULT_CONFIG = "/etc/kybernate/config.toml"
DEFAULT_STORE = "/var/lib/kybernate/checkpoints"
DEFAULT_SEAL_KEY = "/etc/kybernate/seal.key"
DEFAULT_SEAL_WITNESS_DIR = "/run/kybernate/sealed"
DEFAULT_TIER_STATE = "/var/lib/kybernate/tiers"
DEFAULT_BROKER_SOCKET = "/run/kybernate/broker.sock"
DEFAULT_BROKER_STATE = "/run/kybernate/broker"
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
    store_ram_dir: str = ""
    store_ram_cap_mib: int = 0
    store_disk_dir: str = ""
    store_disk_cap_mib: int = 0
    store_registry: str = ""
    store_registry_plain_http: bool = False
    store_credentials_file: str = ""
    store_state_dir: str = DEFAULT_TIER_STATE
    store_keep_last: int = 0
    store_chunk_mib: int = 16
    store_parallel_transfers: int = 4
    store_min_idle_s: float = 60.0
    broker_socket: str = DEFAULT_BROKER_SOCKET
    broker_state_dir: str = DEFAULT_BROKER_STATE
    broker_poll_s: float = 1.0
    broker_min_idle_s: float = 10.0
    broker_silent_wake_s: float = 1.0
    broker_wake_timeout_s: float = 120.0
    broker_metrics_address: str = ""
    broker_kube_events: bool = True
    broker_exec_wait_s: float = 30.0
    source: str = "defaults"

    @property
    def tiers(self) -> bool:
        """Whether the node keeps checkpoints in tiers (`tiers`): a RAM tier or a registry is set."""
        return bool(self.store_ram_dir or self.store_registry)

    @property
    def disk_tier_dir(self) -> str:
        """Tier 2's root: [store] disk_dir, else the checkpoint store."""
        return self.store_disk_dir or self.checkpoint_store

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
        for name in ("checkpoint_store", "seal_key_file", "store_state_dir", "broker_socket", "broker_state_dir"):
            if not os.path.isabs(getattr(self, name)):
                raise NodeConfigError(f"node config {self.source}: {name}={getattr(self, name)!r} is not absolute")
        for name in ("criu_plugin_dir", "libcuda", "seal_witness_dir", "store_ram_dir", "store_disk_dir",
                     "store_credentials_file"):
            value = getattr(self, name)
            if value and not os.path.isabs(value):
                raise NodeConfigError(f"node config {self.source}: {name}={value!r} is not absolute")
        for root in self.restore_roots:
            if not os.path.isabs(root) or os.path.normpath(root) == "/":
                raise NodeConfigError(f"node config {self.source}: restore_roots entry {root!r} must be an "
                                      f"absolute directory other than /")
        for name in ("checkpoint_timeout_s", "restore_timeout_s", "store_chunk_mib", "store_parallel_transfers",
                     "broker_poll_s", "broker_silent_wake_s", "broker_wake_timeout_s"):
            if not getattr(self, name) > 0:
                raise NodeConfigError(f"node config {self.source}: {name} must be > 0")
        for name in ("store_ram_cap_mib", "store_disk_cap_mib", "store_keep_last", "store_min_idle_s",
                     "broker_min_idle_s", "broker_exec_wait_s"):
            if getattr(self, name) < 0:
                raise NodeConfigError(f"node config {self.source}: {name} must be >= 0")
        if self.broker_metrics_address:
            try:
                split_host_port(self.broker_metrics_address)
            except ValueError as exc:
                raise NodeConfigError(f"node config {self.source}: broker.metrics_address: {exc}") from None
        if self.store_registry:
            try:
                split_registry(self.store_registry)
            except ValueError as exc:
                raise NodeConfigError(f"node config {self.source}: store.registry: {exc}") from None


_HOST = re.compile(r"(?:[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]*[A-Za-z0-9])?)*"
                   r"(?::[0-9]{1,5})?|\[[0-9A-Fa-f:]+\](?::[0-9]{1,5})?")
_REPO_PATH = re.compile(r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*")


def split_registry(reference: str) -> tuple[str, str]:
    """``HOST[:PORT]/REPOSITORY`` -> (host[:port], repository), as the distribution spec names them
    (lower-case path components); ValueError naming what is wrong. No scheme, tag or digest: the
    scheme is ``registry_plain_http``'s, tags are checkpoint ids."""
    host, _, path = reference.partition("/")
    if "://" in reference:
        raise ValueError(f"{reference!r} holds a scheme: write HOST[:PORT]/REPOSITORY "
                         "(registry_plain_http chooses http)")
    if not path or not _HOST.fullmatch(host) or not _REPO_PATH.fullmatch(path) or len(path) > 255:
        raise ValueError(f"{reference!r} is not HOST[:PORT]/REPOSITORY (lower-case path components)")
    return host, path


def split_host_port(address: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[V6]:PORT``) -> (host, port); ValueError naming what is wrong."""
    host, sep, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    if not sep or not host or not port.isdigit() or not 1 <= int(port) <= 65535:
        raise ValueError(f"{address!r} is not HOST:PORT")
    return host, int(port)


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
    ("store", "ram_dir", "store_ram_dir"),
    ("store", "ram_cap_mib", "store_ram_cap_mib"),
    ("store", "disk_dir", "store_disk_dir"),
    ("store", "disk_cap_mib", "store_disk_cap_mib"),
    ("store", "registry", "store_registry"),
    ("store", "registry_plain_http", "store_registry_plain_http"),
    ("store", "credentials_file", "store_credentials_file"),
    ("store", "state_dir", "store_state_dir"),
    ("store", "keep_last", "store_keep_last"),
    ("store", "chunk_mib", "store_chunk_mib"),
    ("store", "parallel_transfers", "store_parallel_transfers"),
    ("store", "min_idle_s", "store_min_idle_s"),
    ("broker", "socket", "broker_socket"),
    ("broker", "state_dir", "broker_state_dir"),
    ("broker", "poll_s", "broker_poll_s"),
    ("broker", "min_idle_s", "broker_min_idle_s"),
    ("broker", "silent_wake_s", "broker_silent_wake_s"),
    ("broker", "wake_timeout_s", "broker_wake_timeout_s"),
    ("broker", "metrics_address", "broker_metrics_address"),
    ("broker", "kube_events", "broker_kube_events"),
    ("broker", "exec_wait_s", "broker_exec_wait_s"),
)
_TYPES = {f.name: f.type for f in fields(NodeConfig)}


def _coerce(name: str, value):
    kind = _TYPES[name]
    if kind == "bool":
        if not isinstance(value, bool):
            raise ValueError(f"{name} must be true or false, not {value!r}")
        return value
    if kind == "int":
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be a whole number, not {value!r}")
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
    if data == _parsed[0]:
        return _parsed[1]
    try:
        doc = tomllib.loads(data.decode())
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise NodeConfigError(f"node config {path}: {exc}") from exc
    unknown = sorted(f"{s}.{k}" for s, tbl in doc.items() if isinstance(tbl, dict) for k in tbl
                     if (s, k) not in {(a, b) for a, b, _ in _KEYS})
    unknown += sorted(s for s, tbl in doc.items() if not isinstance(tbl, dict))
    if unknown:
        raise NodeConfigError(f"node config {path}: unknown setting(s) {', '.join(unknown)}")
    _parsed[:] = [data, doc]
    return doc


# The last file content that parsed and passed, and its parse: the file is read and its owner and mode
# checked at every load (every Create), the TOML parser (pure Python, ~0.8 ms in a daemon just forked
# from the warm template, which loads the config once to fill this) runs only when the bytes changed.
# Only `NodeConfig.load` reads the parse, without changing it.
_parsed: list = [None, None]
