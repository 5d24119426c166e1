"""The runtime options containerd hands the shim on Create, as one `containerd.runc.v1.Options`.

containerd sends one of two types:

- ``containerd.runc.v1.Options``: what ctr sends runc's runtimes, and what a client may send us;
- ``runtimeoptions.v1.Options`` {type_url=1, config_path=2, config_body=3}: what the CRI plugin sends
  any runtime that is not runc's (its ``[...runtimes.kybernate.options]`` table as TOML in
  config_body, containerd 1.7 and 2.x), and what ``ctr run --runtime-config-path FILE`` sends (the
  file's path in config_path). containerd 1.6's message has no config_body.

The TOML keys are those of runc's Options in containerd's config.toml (``BinaryName``,
``SystemdCgroup``, ``CriuImagePath``, ``CriuWorkPath``...); snake_case (``criu_image_path``) is
accepted too. No protobuf module is generated for runtimeoptions: its three fields are read here.
"""
from __future__ import annotations

import logging
import os
import tomllib
from typing import Any, Mapping

log = logging.getLogger("kybernate.shim")

RUNC_OPTIONS_TYPE = "containerd.runc.v1.Options"
RUNTIME_OPTIONS_TYPE = "runtimeoptions.v1.Options"


class RuntimeOptionsError(ValueError):
    """Options that cannot be read (bad TOML, a missing config file, a value of the wrong type)."""


def _normalise(key: str) -> str:
    return key.replace("_", "").replace("-", "").lower()


def _fields():
    from proto.containerd.runc.v1 import options_pb2

    return {_normalise(f.name): f for f in options_pb2.Options.DESCRIPTOR.fields}


def _varint(buf: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        if i >= len(buf):
            raise RuntimeOptionsError("truncated runtimeoptions.v1.Options")
        b = buf[i]
        i += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, i
        shift += 7


def decode_runtimeoptions(data: bytes) -> dict[str, bytes]:
    """runtimeoptions.v1.Options wire bytes -> {"type_url", "config_path", "config_body"} (bytes)."""
    names = {1: "type_url", 2: "config_path", 3: "config_body"}
    out: dict[str, bytes] = {}
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        field, wire = key >> 3, key & 7
        if wire == 0:
            _, i = _varint(data, i)
        elif wire == 2:
            n, i = _varint(data, i)
            if i + n > len(data):
                raise RuntimeOptionsError("truncated runtimeoptions.v1.Options")
            if field in names:
                out[names[field]] = data[i:i + n]
            i += n
        elif wire == 1:
            i += 8
        elif wire == 5:
            i += 4
        else:
            raise RuntimeOptionsError(f"runtimeoptions.v1.Options: unsupported wire type {wire}")
    return out


def options_from_mapping(table: Mapping[str, Any]):
    """A runc Options message from a TOML table; unknown keys are logged and skipped."""
    from google.protobuf.descriptor import FieldDescriptor
    from proto.containerd.runc.v1 import options_pb2

    opts = options_pb2.Options()
    fields = _fields()
    for key, value in table.items():
        f = fields.get(_normalise(str(key)))
        if f is None:
            log.info("runtime option %r is not one of runc's Options: ignored", key)
            continue
        want_bool = f.type == FieldDescriptor.TYPE_BOOL
        want_int = f.type in (FieldDescriptor.TYPE_UINT32, FieldDescriptor.TYPE_INT32,
                              FieldDescriptor.TYPE_UINT64, FieldDescriptor.TYPE_INT64)
        if want_bool and not isinstance(value, bool):
            raise RuntimeOptionsError(f"runtime option {key} must be true or false, not {value!r}")
        if want_int and (isinstance(value, bool) or not isinstance(value, int)):
            raise RuntimeOptionsError(f"runtime option {key} must be an integer, not {value!r}")
        if not want_bool and not want_int and not isinstance(value, str):
            raise RuntimeOptionsError(f"runtime option {key} must be a string, not {value!r}")
        setattr(opts, f.name, value)
    return opts


def parse_runtime_options(options_any):
    """containerd's runtime options Any -> containerd.runc.v1.Options (defaults when unset).

    Raises RuntimeOptionsError for options that are present but unreadable: running a container with
    settings other than the operator's would be worse than refusing it.
    """
    from proto.anyutil import TypeMismatch, type_name, unpack
    from proto.containerd.runc.v1 import options_pb2

    if options_any is None or not options_any.type_url:
        return options_pb2.Options()
    name = type_name(options_any)
    if name == RUNC_OPTIONS_TYPE:
        try:
            return unpack(options_any, options_pb2.Options)
        except TypeMismatch:  # pragma: no cover - type_name said it matches
            pass
        except Exception as exc:
            raise RuntimeOptionsError(f"undecodable {RUNC_OPTIONS_TYPE}: {exc}") from exc
    if name == RUNTIME_OPTIONS_TYPE:
        fields = decode_runtimeoptions(options_any.value)
        body = fields.get("config_body", b"")
        path = fields.get("config_path", b"").decode(errors="replace")
        source = "config_body"
        if not body and path:
            try:
                with open(path, "rb") as f:
                    body = f.read()
            except OSError as exc:
                raise RuntimeOptionsError(f"runtime config file {path}: {exc.strerror or exc}") from exc
            source = path
        if not body:
            return options_pb2.Options()
        try:
            table = tomllib.loads(body.decode())
        except (UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
            raise RuntimeOptionsError(f"runtime options ({source}) are not valid TOML: {exc}") from exc
        return options_from_mapping(table)
    log.warning("runtime options of type %s ignored (want %s or %s)", options_any.type_url,
                RUNC_OPTIONS_TYPE, RUNTIME_OPTIONS_TYPE)
    return options_pb2.Options()


def runtimeoptions_any(config_path: str = "", config_body: bytes = b"", type_url: str = ""):
    """Encode a runtimeoptions.v1.Options Any (for tests and tools)."""
    from google.protobuf import any_pb2

    def field(num: int, data: bytes) -> bytes:
        out = bytes([(num << 3) | 2])
        n = len(data)
        while True:
            b = n & 0x7F
            n >>= 7
            out += bytes([b | (0x80 if n else 0)])
            if not n:
                return out + data

    value = b""
    if type_url:
        value += field(1, type_url.encode())
    if config_path:
        value += field(2, os.fsencode(config_path))
    if config_body:
        value += field(3, config_body)
    return any_pb2.Any(type_url=RUNTIME_OPTIONS_TYPE, value=value)
