"""The shim binary's entry point: containerd's flags (`shim.binary.flags`), then one action.

containerd runs ``containerd-shim-kybernate-v1 -namespace NS -address ADDR -publish-binary BIN -id ID
[-debug] start|delete``; the daemon is the same binary with no action; ``warm`` (private) is the warm
template `start` forks daemons from.

This module is the top of the binary's lifecycle: it imports the others, lazily and one per action,
and nothing imports it (``cli -> manager -> warm -> daemon``, all over ``flags``; the picture is in
`shim.binary.flags`). It is on the hot path of every ``ctr run``: standard library pieces only.
"""
from __future__ import annotations

import sys

from shim.binary.flags import RUNTIME_NAME, VERSION, UsageError, parse_flags

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
        from shim.binary import template

        return template.serve(flags)
    if flags.action:
        sys.stderr.write(f"{RUNTIME_NAME}: unknown action {flags.action!r} (want start, delete or none)\n")
        return 2
    from shim.binary import daemon

    return daemon.run(flags)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
