"""`kybernate ps`: the containers containerd runs with the kybernate runtime, their tasks, and the CUDA
processes in them with their checkpoint state (and VRAM when nvidia-smi is there).
"""
from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
from typing import Optional

import grpc

from . import (LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, RUNTIME_TYPE, OperatorError)
from .containerd_api import Containerd, describe_rpc_error, status_name

FALLBACK_NAMESPACES = ("default", "k8s.io")


@dataclasses.dataclass
class Row:
    namespace: str
    id: str
    pod: str
    status: str
    pid: int
    pids: list[int]
    cuda: Optional[list[dict]]     # None: not known (no driver); [] none
    cuda_note: str
    vram_mib: Optional[int]

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def pod_of(labels) -> str:
    ns, pod = labels.get(LABEL_POD_NAMESPACE), labels.get(LABEL_POD_NAME)
    if not (ns and pod):
        return ""
    name = labels.get(LABEL_CONTAINER_NAME)
    return f"{ns}/{pod}/{name}" if name else f"{ns}/{pod}"


def container_pids(pid: int) -> list[int]:
    """Every process of the container: its cgroup's, else just the init pid."""
    if pid <= 0:
        return []
    try:
        from cuda_bindings import cgroup_dir_of, cgroup_pids
        return sorted(set(cgroup_pids(cgroup_dir_of(pid))) | {pid})
    except Exception:
        return [pid]


def nvidia_smi_usage(which=shutil.which) -> Optional[dict[int, int]]:
    """pid -> used GPU memory in MiB, from nvidia-smi; None when nvidia-smi is missing or fails."""
    smi = which("nvidia-smi")
    if not smi:
        return None
    try:
        out = subprocess.run([smi, "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    usage: dict[int, int] = {}
    for line in out.stdout.splitlines():
        parts = [p.strip() for p in line.split(",")]
        if len(parts) == 2 and parts[0].isdigit() and parts[1].isdigit():
            usage[int(parts[0])] = usage.get(int(parts[0]), 0) + int(parts[1])
    return usage


class CudaView:
    """One CudaDriver for the whole listing, or the reason there is none."""

    def __init__(self):
        self.driver = None
        self.reason = ""
        try:
            from cuda_bindings import CudaBindingsError, CudaDriver
            try:
                self.driver = CudaDriver()
            except CudaBindingsError as exc:
                self.reason = "no driver" if type(exc).__name__ == "DriverMissing" else str(exc)
        except Exception as exc:  # cffi missing
            self.reason = f"cuda_bindings unavailable: {exc}"

    def processes(self, pids: list[int]) -> tuple[Optional[list[dict]], str]:
        if self.driver is None:
            return None, self.reason
        from cuda_bindings import discover
        found = discover(pids, self.driver)
        return [{"pid": p.pid, "name": p.name, "state": p.state.label if p.state is not None else None,
                 "driver_answer": p.driver_answer} for p in found], ""


def collect(client: Containerd, namespaces: list[str], cuda: Optional[CudaView] = None,
            vram: Optional[dict[int, int]] = None) -> list[Row]:
    rows = []
    for ns in namespaces:
        try:
            containers = client.containers(ns, [f'runtime.name=="{RUNTIME_TYPE}"'])
        except grpc.RpcError as exc:
            raise OperatorError(f"listing containers in namespace {ns}: {describe_rpc_error(exc)}") from None
        for c in containers:
            if c.runtime.name != RUNTIME_TYPE:
                continue
            task = client.task(ns, c.id)
            pid = task.pid if task is not None else 0
            status = status_name(task)
            pids = container_pids(pid) if status in ("running", "paused", "pausing", "created") else []
            if cuda is None:
                procs, note = None, ""
            elif cuda.driver is None:
                procs, note = None, cuda.reason
            else:
                procs, note = cuda.processes(pids) if pids else ([], "")
            used = None
            if vram is not None:
                used = sum(vram.get(p, 0) for p in pids)
            rows.append(Row(ns, c.id, pod_of(c.labels), status, pid, pids, procs, note, used))
    return rows


def _cuda_cell(row: Row) -> str:
    if row.cuda is None:
        return f"n/a ({row.cuda_note})" if row.cuda_note else "-"
    held = [p for p in row.cuda if p["state"]]
    if not held:
        return "none"
    states: dict[str, int] = {}
    for p in held:
        states[p["state"]] = states.get(p["state"], 0) + 1
    return ",".join(f"{n} {s}" for s, n in sorted(states.items()))


def render(rows: list[Row]) -> str:
    header = ("NAMESPACE", "CONTAINER", "POD", "STATUS", "PID", "PROCS", "CUDA", "VRAM")
    table = [header]
    for r in rows:
        cid = r.id if len(r.id) <= 20 else r.id[:13]
        table.append((r.namespace, cid, r.pod or "-", r.status, str(r.pid or "-"), str(len(r.pids)),
                      _cuda_cell(r), f"{r.vram_mib} MiB" if r.vram_mib is not None else "-"))
    widths = [max(len(row[i]) for row in table) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in table)


def broker_view(socket_path: str) -> Optional[dict]:
    """The node broker's status (`broker.control`), None when no broker answers there."""
    from broker import BrokerError
    from broker.control import call
    try:
        return call(socket_path, {"op": "status"}, timeout=10)
    except BrokerError:
        return None


def _when(stamp: float) -> str:
    import datetime
    if not stamp:
        return "-"
    return datetime.datetime.fromtimestamp(stamp).strftime("%Y-%m-%d %H:%M:%S")


def render_gpus(view: dict) -> str:
    """Per GPU: what is resident, what is parked in host RAM, and since when."""
    header = ("GPU", "STATE", "CONTAINER", "VRAM", "SINCE", "IDLE", "NOTE")
    table = [header]
    rows = []
    for c in view.get("containers", []):
        gpus = c.get("gpus") or ["-"]
        for g in gpus:
            vram = (c.get("vram") or {}).get(g, 0)
            note = c.get("refused") or c.get("reason") or ""
            if c.get("phase") == "parked" and c.get("wake_ports"):
                note = (note + "; " if note else "") + "wakes on port " + ",".join(map(str, c["wake_ports"]))
            if not c.get("gpu"):
                note = note or "no GPU"
            rows.append((g, c.get("phase", "?"), c.get("name", c.get("id", "?")), f"{vram / (1 << 30):.2f} GiB",
                         _when(c.get("since", 0)), "-" if c.get("phase") != "resident" else f"{c.get('idle_s', 0):.0f} s",
                         note))
    table += sorted(rows, key=lambda r: (r[0], r[1] != "resident", r[2]))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(r, widths)).rstrip() for r in table]
    for g, info in sorted((view.get("gpus") or {}).items()):
        lines.append(f"{g}: {info['free'] / (1 << 30):.2f} GiB free of {info['total'] / (1 << 30):.2f} GiB")
    return "\n".join(lines)


def _broker_socket(args) -> str:
    if getattr(args, "socket", None):
        return args.socket
    from shim.policy.node import NodeConfig, NodeConfigError
    try:
        return NodeConfig.load().broker_socket
    except NodeConfigError:
        return ""


def main(args) -> int:
    if getattr(args, "gpus", False):
        view = broker_view(_broker_socket(args))
        if view is None:
            raise OperatorError(f"no kybernate broker answers at {_broker_socket(args) or '-'}: "
                                "is `kybernate broker serve` running on this node?")
        print(json.dumps(view, indent=2) if args.json else render_gpus(view))
        return 0
    with Containerd(args.address) as client:
        if args.namespace:
            namespaces = [args.namespace]
        else:
            try:
                namespaces = client.namespaces()
            except grpc.RpcError as exc:
                if exc.code() == grpc.StatusCode.UNAVAILABLE:
                    raise OperatorError(f"cannot reach containerd at {args.address}: {exc.details()}") from None
                namespaces = list(FALLBACK_NAMESPACES)
        try:
            rows = collect(client, namespaces, CudaView(), nvidia_smi_usage())
        except grpc.RpcError as exc:
            raise OperatorError(f"containerd at {args.address}: {describe_rpc_error(exc)}") from None
    if args.json:
        print(json.dumps([r.to_dict() for r in rows], indent=2))
        return 0
    if rows:
        print(render(rows))
    else:
        print(f"no containers run by {RUNTIME_TYPE} in namespace(s) {', '.join(namespaces) or '-'}")
    socket_path = _broker_socket(args)
    view = broker_view(socket_path) if socket_path else None
    if view is not None and view.get("containers"):
        print()
        print(render_gpus(view))
    return 0
