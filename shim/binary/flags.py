"""containerd's shim flags: what every part of the binary's lifecycle reads, and nothing else.

containerd runs ``containerd-shim-kybernate-v1 -namespace NS -address ADDR -publish-binary BIN -id ID
[-debug] start|delete``; the daemon is the same binary with no action. The flags follow Go's ``flag``
package (``-name value``, ``-name=value``, ``--name``; booleans only as ``-name`` or ``-name=false``)
because containerd and operators write them that way.

Imports in the binary's lifecycle go one way (lazily where marked ``~>``); nothing imports `cli`::

    cli ~~> manager ~~> warm             `start`'s hot path: builtin modules only
    cli ~~> template --> warm
            template ~~> daemon ~~> shim.task, shim.runtime, ttrpc, proto
    cli ~~> daemon
    all of the above --> flags, sockets, _digest   (stdlib only; import nothing of ours)

`manager` is `start`/`delete`/``-info``; `warm` is how `start` reaches the warm template (names,
request format); `template` is the template process, which preloads `daemon` and runs it in each
fork; `daemon` never imports `manager`, `warm` or `template`.

This module sits at the bottom and is on the hot path of every ``ctr run``: standard library pieces
only, no ``dataclasses`` or ``re`` (each costs milliseconds of imports per ``start``).
"""
from __future__ import annotations

import os
import sys

RUNTIME_NAME = "io.containerd.kybernate.v1"
VERSION = "0.1.0"

_STRING_FLAGS = {
    "namespace": "namespace",
    "address": "address",
    "publish-binary": "publish_binary",
    "id": "id",
    "bundle": "bundle",
    "socket": "socket",
    "debug-socket": "debug_socket",
}
_BOOL_FLAGS = {"debug": "debug", "v": "version", "info": "info"}
_TRUE = {"1", "t", "T", "true", "TRUE", "True"}
_FALSE = {"0", "f", "F", "false", "FALSE", "False"}


class UsageError(Exception):
    """The command line is not one containerd (or a person) could mean; exit status 2, as Go's flag."""


class Flags:
    """containerd's flags (a plain class: dataclasses costs ~30 ms of imports on the hot path)."""

    __slots__ = ("namespace", "address", "publish_binary", "id", "bundle", "socket", "debug_socket",
                 "debug", "version", "info", "action", "ttrpc_address")

    def __init__(self, **kw: object) -> None:
        self.namespace = self.address = self.publish_binary = self.id = ""
        self.bundle = self.socket = self.debug_socket = self.action = ""
        # TTRPC_ADDRESS from the environment: where events go (containerd's own ttrpc socket)
        self.ttrpc_address = ""
        self.debug = self.version = self.info = False
        for k, v in kw.items():
            setattr(self, k, v)

    def __repr__(self) -> str:
        return "Flags(" + ", ".join(f"{k}={getattr(self, k)!r}" for k in self.__slots__) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Flags) and all(getattr(self, k) == getattr(other, k) for k in self.__slots__)

    @property
    def bundle_path(self) -> str:
        """The bundle: ``-bundle`` when given (containerd 2.x delete), else the working directory."""
        return self.bundle or os.getcwd()

    def daemon_args(self, action: str = "") -> list[str]:
        """The flags a daemon (or the warm template, ``action="warm"``) of this shim is started with."""
        args = ["-namespace", self.namespace, "-id", self.id, "-address", self.address]
        if self.publish_binary:
            args += ["-publish-binary", self.publish_binary]
        if self.debug:
            args.append("-debug")
        if action:
            args.append(action)
        return args


def parse_flags(argv: list[str], environ: dict[str, str] | None = None) -> Flags:
    """Parse containerd's shim command line like Go's flag package does.

    Parsing stops at the first non-flag argument (the action) or after ``--``. An unknown flag, a
    string flag without a value or a boolean with a non-boolean value is a `UsageError`.
    """
    flags = Flags()
    env = os.environ if environ is None else environ
    flags.ttrpc_address = env.get("TTRPC_ADDRESS", "")
    i = 0
    rest: list[str] = []
    while i < len(argv):
        arg = argv[i]
        if arg == "--":
            rest = argv[i + 1:]
            break
        if len(arg) < 2 or arg[0] != "-":
            rest = argv[i:]
            break
        name = arg[2:] if arg.startswith("--") else arg[1:]
        if not name or name[0] in "-=":
            raise UsageError(f"bad flag syntax: {arg}")
        value: str | None = None
        if "=" in name:
            name, value = name.split("=", 1)
        if name in _BOOL_FLAGS:
            if value is None:
                setattr(flags, _BOOL_FLAGS[name], True)
            elif value in _TRUE:
                setattr(flags, _BOOL_FLAGS[name], True)
            elif value in _FALSE:
                setattr(flags, _BOOL_FLAGS[name], False)
            else:
                raise UsageError(f"invalid boolean value {value!r} for -{name}")
        elif name in _STRING_FLAGS:
            if value is None:
                if i + 1 >= len(argv):
                    raise UsageError(f"flag needs an argument: -{name}")
                i += 1
                value = argv[i]
            setattr(flags, _STRING_FLAGS[name], value)
        elif name in ("h", "help"):
            raise UsageError("usage")
        else:
            raise UsageError(f"flag provided but not defined: -{name}")
        i += 1
    if rest:
        flags.action = rest[0]
    return flags


MODULE_COMMAND = ("-m", "shim.binary.cli")  # how the binary runs without its script (tests, -m use)


def binary_command() -> list[str]:
    """The command that runs this binary again: its script, or ``python -m shim.binary.cli``."""
    argv0 = os.path.abspath(sys.argv[0]) if sys.argv and sys.argv[0] else ""
    if not argv0 or argv0.endswith(".py") or not os.access(argv0, os.X_OK):
        return [sys.executable, *MODULE_COMMAND]
    return [argv0]


IDENTIFIER_MAX = 76
_ALNUM = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789")


def identifier_error(value: str) -> str:
    """Why `value` is no containerd identifier (namespace, container id), or "" when it is one.

    containerd's rule (pkg/identifiers): 1 to 76 characters, letters and digits in runs joined by
    single ``.``, ``_`` or ``-``, neither first nor last. Written without ``re`` (hot path)."""
    if not value:
        return "is empty"
    if len(value) > IDENTIFIER_MAX:
        return f"is longer than {IDENTIFIER_MAX} characters"
    previous_alnum = False
    for ch in value:
        if ch in _ALNUM:
            previous_alnum = True
        elif ch in "._-" and previous_alnum:
            previous_alnum = False
        else:
            return "must be letters and digits joined by single '.', '_' or '-'"
    if not previous_alnum:
        return "must end with a letter or digit"
    return ""
