"""`kybernate`: the operator's command for nodes running the Kybernate containerd runtime.

    kybernate doctor                      can this node checkpoint (CPU, GPU)? what to fix
    kybernate ps                          containers run by kybernate, their CUDA processes and state
    kybernate checkpoint TARGET           checkpoint a container (containerd id or NS/POD[/CONTAINER])
    kybernate restore TARGET              restore it from a checkpoint
    kybernate wake TARGET                 make a parked GPU container resident (the node broker)
    kybernate broker serve                run the node broker: idle release, wake on demand, make room

Only argparse is imported here: each subcommand imports its module (grpc, protobuf, cffi) when it
runs, so `kybernate --help` stays fast.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Optional, Sequence

DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_CONFIG = "/etc/containerd/config.toml"


def _positive(value: str) -> float:
    v = float(value)
    if v <= 0:
        raise argparse.ArgumentTypeError("must be > 0")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="kybernate",
        description="Operator tools for the Kybernate containerd runtime (io.containerd.kybernate.v1).",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="TARGET is a containerd container id (in namespace -n) or a Kubernetes container as "
               "NAMESPACE/POD[/CONTAINER] (found through containerd's CRI plugin).")
    p.add_argument("-a", "--address", default=os.environ.get("CONTAINERD_ADDRESS", DEFAULT_ADDRESS),
                   help=f"containerd's gRPC socket (default $CONTAINERD_ADDRESS or {DEFAULT_ADDRESS})")
    p.add_argument("-n", "--namespace", default=os.environ.get("CONTAINERD_NAMESPACE", ""),
                   help="containerd namespace (default $CONTAINERD_NAMESPACE; ps: all, else 'default')")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    d = sub.add_parser("doctor", help="check this node: containerd, runtime entry, runc, CRIU, cgroups, GPU",
                       description="Check what checkpointing needs on this node; exit 1 when CPU checkpoint "
                                   "is not ready.")
    d.add_argument("--config", default=DEFAULT_CONFIG, help=f"containerd's config.toml (default {DEFAULT_CONFIG})")
    d.add_argument("--containerd", default="containerd", help="containerd binary (default: on PATH)")
    d.add_argument("--criu", default=None, help="CRIU binary to check (default: as the shim finds it)")
    d.add_argument("--json", action="store_true", help="machine-readable output")

    ps = sub.add_parser("ps", help="list containers run by kybernate, with CUDA processes and VRAM")
    ps.add_argument("--json", action="store_true", help="machine-readable output")
    ps.add_argument("--gpus", action="store_true",
                    help="the node broker's view per GPU: resident, parked in host RAM, since when")
    ps.add_argument("--socket", help="the broker's control socket (default: the node config's broker.socket)")

    c = sub.add_parser("checkpoint", help="checkpoint a container",
                       description="Checkpoint a container run by kybernate into a CRIU image directory "
                                   "(or, with --cri-archive, a CRI checkpoint archive).")
    c.add_argument("target", metavar="TARGET", help="container id, or NAMESPACE/POD[/CONTAINER]")
    c.add_argument("--image-path", help="directory for the CRIU image, new or empty (default: the node's "
                                        "checkpoint store, /var/lib/kybernate/checkpoints/<ns>/_/<id>/<UTC time>, "
                                        "<store>/k8s.io/<pod ns>/<pod>/<container>/<UTC time> for pods)")
    c.add_argument("--work-path", help="CRIU work directory (logs); default: the shim's")
    c.add_argument("--exit", action="store_true", help="stop the container after the checkpoint "
                                                       "(default: leave it running)")
    c.add_argument("--tcp-established", action="store_true", help="checkpoint established TCP connections")
    c.add_argument("--ext-unix-sk", action="store_true", help="allow external unix sockets")
    c.add_argument("--file-locks", action="store_true", help="checkpoint file locks")
    c.add_argument("--cri-archive", metavar="FILE",
                   help="Kubernetes targets on containerd 2.x: write kubelet's checkpoint archive through "
                        "CRI CheckpointContainer instead")
    c.add_argument("--timeout", type=_positive, default=None, help="give up after this many seconds")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress display")

    ls = sub.add_parser("checkpoints", help="list, remove, push and pull checkpoints; prune abandoned half images",
                        description="List every checkpoint in the node's store with its status: complete, "
                                    "in-progress, abandoned (its shim was killed: a half image) or "
                                    "incomplete, and on a node with tiers ([store]) every checkpoint of the "
                                    "tier catalog with its size, tiers and pending copies. `prune` removes the "
                                    "abandoned ones; `rm ID`, `push ID`, `pull ID` act on one checkpoint id.")
    ls.add_argument("action", nargs="?", choices=("ls", "prune", "rm", "push", "pull"), default="ls")
    ls.add_argument("id", nargs="?", metavar="ID", help="checkpoint id (rm, push, pull)")
    ls.add_argument("--keep-registry", action="store_true", help="rm: leave the registry's copy")
    ls.add_argument("--json", action="store_true", help="machine-readable output")
    ls.add_argument("-q", "--quiet", action="store_true", help="no progress bar")

    st = sub.add_parser("store", help="the node's checkpoint tier worker",
                        description="`serve`: copy checkpoints down the tiers (RAM -> disk -> registry), retry, "
                                    "resume after a crash, evict by LRU and keep_last ([store] in the node config).")
    st.add_argument("action", choices=("serve",))
    st.add_argument("--once", action="store_true", help="one round of due jobs and eviction, then exit")
    st.add_argument("--poll", type=_positive, default=1.0, help="seconds between rounds (default 1)")

    w = sub.add_parser("wake", help="wake a parked GPU container through the node broker",
                       description="Ask the node's broker to make TARGET resident: its VRAM back on the GPU, "
                                   "its processes thawed. Where the GPU lacks room the broker first parks idle "
                                   "containers (lowest kybernate.io/gpu-priority, then least recently used); "
                                   "exit 3 when no room can be made (the message names what holds the GPU).")
    w.add_argument("target", metavar="TARGET", help="container id, or NAMESPACE/POD[/CONTAINER]")
    w.add_argument("--socket", help="the broker's control socket (default: the node config's broker.socket)")
    w.add_argument("--timeout", type=_positive, default=None, help="give up after this many seconds (default 300)")
    w.add_argument("--json", action="store_true", help="machine-readable output")

    b = sub.add_parser("broker", help="the node broker (idle release, wake on demand, making room)",
                       description="`serve`: run the node's broker ([broker] in the node config). One per node, "
                                   "as root in the host's pid namespace (the DaemonSet or "
                                   "packaging/systemd/kybernate-broker.service).")
    b.add_argument("action", choices=("serve",))
    b.add_argument("--gpu-readings", metavar="FILE", default=None,
                   help="tests only: GPU readings from this JSON file instead of NVML (see broker/readings.py)")

    r = sub.add_parser("restore", help="restore a container from a checkpoint",
                       description="Restore a checkpoint through the shim's kybernate.io/restore-from "
                                   "annotation: a containerd id with ctr run (replacing the stopped "
                                   "container of that id, or as --new-id), a Kubernetes container with "
                                   "CRI CreateContainer/StartContainer in its running pod.")
    r.add_argument("target", metavar="TARGET", help="container id, or NAMESPACE/POD/CONTAINER")
    r.add_argument("--from", dest="from_", metavar="PATH|ID",
                   help="checkpoint id (served by the node's tiers, pulled from the registry when no local "
                        "tier holds it), checkpoint directory (or CRI archive); default for containerd ids: the newest "
                        "in the node's checkpoint store (<store>/<ns>/_/<id>). One outside the store "
                        "restores only from beneath the node config's checkpoint.restore_roots")
    r.add_argument("--new-id", help="containerd ids: restore as this new container id")
    r.add_argument("--image", help="image for the restored container (default: the original's)")
    r.add_argument("--net-host", action="store_true", help="containerd ids: host network")
    r.add_argument("--ctr", default="ctr", help="ctr binary (containerd ids; default: on PATH)")
    r.add_argument("--timeout", type=_positive, default=None, help="give up after this many seconds")
    r.add_argument("args", nargs="*", help="containerd ids: the process arguments (default: the original's)")
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    from kybernate import OperatorError

    try:
        if args.command == "doctor":
            from kybernate import doctor
            return doctor.main(args)
        if args.command == "ps":
            from kybernate import ps
            return ps.main(args)
        if args.command == "checkpoints":
            from kybernate import checkpoints, store_cmd
            if args.action in ("rm", "push", "pull"):
                if not args.id:
                    raise OperatorError(f"`kybernate checkpoints {args.action}` needs a checkpoint ID", 2)
                return getattr(store_cmd, args.action)(args)
            if args.action == "ls" and store_cmd.tier_store(required=False) is not None:
                store_cmd.ls(args)   # the tiers' catalog first, then the store's directories
                if args.json:
                    return 0
                print()
            return checkpoints.main(args)
        if args.command == "store":
            from kybernate import store_cmd
            return store_cmd.serve(args)
        if args.command in ("wake", "broker"):
            from kybernate import wake
            return wake.wake(args) if args.command == "wake" else wake.serve(args)
        args.namespace = args.namespace or "default"
        from kybernate import checkpoint
        if args.command == "checkpoint":
            return checkpoint.checkpoint(args)
        return checkpoint.restore(args)
    except OperatorError as exc:
        print(f"kybernate {args.command}: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        print(f"kybernate {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
