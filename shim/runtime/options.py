"""The runtime options containerd hands the shim (on `start`'s stdin and in Create's ``options``).

Two shapes reach us, as an Any:

* ``containerd.runc.v1.Options`` (protobuf): what containerd's runc shim gets; a client may send it to
  any runtime;
* ``runtimeoptions.v1.Options`` {type_url, config_path, config_body}: what containerd's CRI plugin
  sends every runtime type it does not know (ours included) for a config.toml entry
  ``[...runtimes.kybernate.options]``: the options section itself as TOML in ``config_body``, or a
  TOML file named by its ``ConfigPath``.

Both become one `RuntimeOptions`. TOML keys are the runc shim's (``BinaryName``, ``Root``,
``SystemdCgroup``, ``CriuPath``, ``ShimCgroup``, ``IoUid``, ...); snake_case works too. Decoding uses
`shim.wire`, not protobuf: `start` needs ShimCgroup and must stay light.
"""
from __future__ import annotations

from shim.wire import WireError, fields

RUNC_OPTIONS = "containerd.runc.v1.Options"
GENERIC_OPTIONS = "runtimeoptions.v1.Options"


class OptionsError(ValueError):
    """Options that do not decode (bad protobuf, bad TOML, unreadable config file)."""


class RuntimeOptions:
    __slots__ = ("binary_name", "root", "systemd_cgroup", "criu_path", "shim_cgroup", "io_uid", "io_gid",
                 "no_pivot_root", "no_new_keyring", "criu_image_path", "criu_work_path", "source")

    def __init__(self, **kw) -> None:
        self.binary_name = self.root = self.criu_path = self.shim_cgroup = ""
        self.criu_image_path = self.criu_work_path = ""
        self.systemd_cgroup = self.no_pivot_root = self.no_new_keyring = False
        self.io_uid = self.io_gid = 0
        self.source = "defaults"
        for k, v in kw.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return "RuntimeOptions(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RuntimeOptions) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)


# protobuf field numbers of containerd.runc.v1.Options
_RUNC_FIELDS = {1: "no_pivot_root", 2: "no_new_keyring", 3: "shim_cgroup", 4: "io_uid", 5: "io_gid",
                6: "binary_name", 7: "root", 8: "criu_path", 9: "systemd_cgroup", 10: "criu_image_path",
                11: "criu_work_path"}
_BOOLS = {"no_pivot_root", "no_new_keyring", "systemd_cgroup"}
_INTS = {"io_uid", "io_gid"}
# TOML keys (the runc shim's Go field names) -> ours
_TOML_KEYS = {
    "BinaryName": "binary_name", "Root": "root", "SystemdCgroup": "systemd_cgroup", "CriuPath": "criu_path",
    "ShimCgroup": "shim_cgroup", "IoUid": "io_uid", "IoGid": "io_gid", "NoPivotRoot": "no_pivot_root",
    "NoNewKeyring": "no_new_keyring", "CriuImagePath": "criu_image_path", "CriuWorkPath": "criu_work_path",
}


def parse(type_url: str, value: bytes) -> RuntimeOptions:
    """Options from an Any's type URL and value; defaults for an empty Any or an unknown type."""
    name = type_url.rpartition("/")[2]
    if not name and not value:
        return RuntimeOptions()
    try:
        if name == RUNC_OPTIONS:
            return _from_runc(value)
        if name == GENERIC_OPTIONS:
            return _from_generic(value)
    except WireError as exc:
        raise OptionsError(f"runtime options {name}: {exc}") from exc
    return RuntimeOptions(source=f"ignored options of type {name or '<none>'}")


def parse_marshalled_any(data: bytes) -> RuntimeOptions:
    """Options from a marshalled google.protobuf.Any (`start`'s stdin)."""
    if not data:
        return RuntimeOptions()
    type_url, value = "", b""
    try:
        for number, v in fields(data):
            if number == 1 and isinstance(v, bytes):
                type_url = v.decode("utf-8", "replace")
            elif number == 2 and isinstance(v, bytes):
                value = v
    except WireError as exc:
        raise OptionsError(f"runtime options are not a protobuf Any: {exc}") from exc
    return parse(type_url, value)


def _from_runc(value: bytes) -> RuntimeOptions:
    opts = RuntimeOptions(source=RUNC_OPTIONS)
    for number, v in fields(value):
        name = _RUNC_FIELDS.get(number)
        if name is None:
            continue
        if name in _BOOLS:
            setattr(opts, name, bool(v))
        elif name in _INTS:
            setattr(opts, name, int(v) if isinstance(v, int) else 0)
        elif isinstance(v, bytes):
            setattr(opts, name, v.decode("utf-8", "replace"))
    return opts


def _from_generic(value: bytes) -> RuntimeOptions:
    config_path, body = "", b""
    for number, v in fields(value):
        if number == 2 and isinstance(v, bytes):
            config_path = v.decode("utf-8", "replace")
        elif number == 3 and isinstance(v, bytes):
            body = v
    source = GENERIC_OPTIONS
    if config_path:
        try:
            with open(config_path, "rb") as f:
                body = f.read()
        except OSError as exc:
            raise OptionsError(f"runtime options: config file {config_path}: {exc.strerror}") from exc
        source = f"{GENERIC_OPTIONS} ConfigPath={config_path}"
    return from_toml(body, source)


def from_toml(body: bytes, source: str = "toml") -> RuntimeOptions:
    import tomllib

    try:
        table = tomllib.loads(body.decode("utf-8")) if body else {}
    except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise OptionsError(f"runtime options ({source}) are not TOML: {exc}") from exc
    opts = RuntimeOptions(source=source)
    for key, v in table.items():
        name = _TOML_KEYS.get(key) or (key if key in RuntimeOptions.__slots__ and key != "source" else None)
        if name is None:
            continue  # ConfigPath, TypeUrl and keys of other runtimes
        if name in _BOOLS:
            if not isinstance(v, bool):
                raise OptionsError(f"runtime option {key} must be true or false, not {v!r}")
        elif name in _INTS:
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise OptionsError(f"runtime option {key} must be a non-negative integer, not {v!r}")
        elif not isinstance(v, str):
            raise OptionsError(f"runtime option {key} must be a string, not {v!r}")
        setattr(opts, name, v)
    return opts
