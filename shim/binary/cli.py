"""The shim binary's entry point: containerd's flags, then one of three actions.

containerd runs ``containerd-shim-kybernate-v1 -namespace NS -address ADDR -publish-binary BIN -id ID
[-debug] start|delete``; the daemon is the same binary with no action. The flags follow Go's ``flag``
package (``-name value``, ``-name=value``, ``--name``; booleans only as ``-name`` or ``-name=false``)
because containerd and operators write them that way.

This module is on the hot path of every ``ctr run``: it imports only the standard library pieces it
needs, and each action imports its own module lazily.
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


USAGE = f"""Usage of containerd-shim-kybernate-v1 ({RUNTIME_NAME}):
  -namespace string    namespace that owns the shim
  -id string           id of the task
  -address string      grpc address back to main containerd
  -publish-binary str  path to publish binary (ignored: events go to $TTRPC_ADDRESS)
  -bundle string       path to the bundle if not workdir
  -socket string       socket path to serve (daemon; default: the fd 3 handed over by start)
  -debug               enable debug output in logs
  -info                print the runtime info protobuf and exit
  -v                   show the shim version and exit
actions: start | delete | (none: run the shim daemon)
"""


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    try:
        flags = parse_flags(args)
    except UsageError as exc:
        if str(exc) != "usage":
            sys.stderr.write(f"{exc}\n")
        sys.stderr.write(USAGE)
        return 2

    if flags.version:
        sys.stdout.write(f"containerd-shim-kybernate-v1:\n  Version:  {VERSION}\n  Runtime:  {RUNTIME_NAME}\n\n")
        return 0
    if flags.info:
        from shim.binary import manager

        return manager.info(flags)
    if not flags.namespace:
        sys.stderr.write(f"{RUNTIME_NAME}: shim namespace cannot be empty\n")
        return 1

    if flags.action == "start":
        from shim.binary import manager

        return manager.start(flags)
    if flags.action == "delete":
        from shim.binary import manager

        return manager.delete(flags)
    if flags.action == "warm":  # private: the pre-imported template `start` forks daemons from
        from shim.binary import warm

        return warm.serve(flags)
    if flags.action:
        sys.stderr.write(f"{RUNTIME_NAME}: unknown action {flags.action!r} (want start, delete or none)\n")
        return 2
    from shim.binary import daemon

    return daemon.run(flags)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
