"""`python -m cuda_bindings ACTION PID...`: the operator's tool, in the spirit of NVIDIA's cuda-checkpoint.

Exit status: 0 every pid done, 1 some pid failed (each says why), 2 the driver itself is unusable
(missing, too old) or the command line is wrong.
"""
from __future__ import annotations

import argparse
import json
import sys
import time

from .batch import BatchResult, resume_all, suspend_all
from .discovery import cgroup_pids, probe
from .driver import DEFAULT_LOCK_TIMEOUT_MS, CudaDriver
from .errors import CudaBindingsError, error_dict, format_version

PRIMITIVES = ("lock", "unlock", "checkpoint", "restore")
ACTIONS = ("state", "suspend", "resume") + PRIMITIVES + ("devices",)


def parse_gpu_map(text: str | None) -> dict[str, str] | None:
    """'OLD=NEW,OLD2=NEW2' (UUIDs as nvidia-smi prints them) -> {OLD: NEW, ...}."""
    if not text:
        return None
    pairs = {}
    for item in text.split(","):
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise argparse.ArgumentTypeError(f"--gpu-map wants OLD=NEW[,OLD=NEW...], got {item!r}")
        pairs[old.strip()] = new.strip()
    return pairs


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cuda_bindings",
                                     description="Inspect, suspend and resume CUDA processes "
                                                 "through the driver's checkpoint API.")
    parser.add_argument("action", choices=ACTIONS)
    parser.add_argument("pids", nargs="*", type=int, metavar="PID")
    parser.add_argument("--cgroup", action="append", default=[],
                        help="also act on every process of this cgroup directory")
    parser.add_argument("--timeout-ms", type=int, default=DEFAULT_LOCK_TIMEOUT_MS,
                        help="lock timeout in milliseconds (0: wait forever); default 10000")
    parser.add_argument("--gpu-map", type=parse_gpu_map, default=None,
                        help="restore/resume onto other GPUs: OLD_UUID=NEW_UUID,...")
    parser.add_argument("--lib", default=None, help="path of libcuda (default $KYBERNATE_LIBCUDA "
                                                    "or libcuda.so.1)")
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")
    return parser


def _primitive(driver: CudaDriver, action: str, pid: int, args) -> dict:
    calls = {"lock": lambda: driver.lock(pid, args.timeout_ms), "unlock": lambda: driver.unlock(pid),
             "checkpoint": lambda: driver.checkpoint(pid),
             "restore": lambda: driver.restore(pid, args.gpu_map)}
    start = time.perf_counter()
    try:
        calls[action]()
        error = None
    except CudaBindingsError as exc:
        error = exc
    return {"pid": pid, "ok": error is None, "seconds": round(time.perf_counter() - start, 6),
            "error": error_dict(error), "message": str(error) if error else None}


def _print_batch(result: BatchResult) -> None:
    for o in result.outcomes:
        if o.ok:
            moved = f"{o.before.label} -> {o.after.label}"
            print(f"{o.pid} {result.operation} ok: {moved} [{','.join(o.steps) or 'nothing to do'}] "
                  f"{o.seconds:.3f}s")
        elif o.skipped:
            print(f"{o.pid} {result.operation} skipped (another process failed first)")
        else:
            print(f"{o.pid} {result.operation} FAILED after [{','.join(o.steps)}]: {o.error}")
    for o in result.rollback:
        status = f"back to {o.after.label}" if o.ok else f"FAILED: {o.error}"
        print(f"{o.pid} rollback [{','.join(o.steps)}] {status}")
    print(f"{result.operation}: {len(result.outcomes)} process(es) in {result.seconds:.3f}s "
          f"({'ok' if result.ok else 'failed'})")


def run(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        pids = list(args.pids)
        for cgroup in args.cgroup:
            pids += cgroup_pids(cgroup)
    except OSError as exc:
        parser.error(str(exc))
    if args.action != "devices" and not pids:
        parser.error("give at least one PID or --cgroup")
    try:
        driver = CudaDriver(args.lib)
        if args.action != "devices":
            driver.require_checkpoint_api()
    except CudaBindingsError as exc:  # DriverMissing, DriverTooOld, cuInit failing
        if args.json:
            print(json.dumps({"ok": False, "error": error_dict(exc)}))
        print(f"error: {exc}", file=sys.stderr)
        return 2

    if args.action == "devices":
        doc = {"ok": True, "driver_version": driver.driver_version(),
               "devices": driver.device_uuids()}
        if args.json:
            print(json.dumps(doc))
        else:
            print(f"CUDA driver API {format_version(doc['driver_version'])} "
                  f"({doc['driver_version']})")
            for ordinal, uuid in enumerate(doc["devices"]):
                print(f"{ordinal} {uuid}")
        return 0

    if args.action == "state":
        found = [probe(driver, pid) for pid in dict.fromkeys(pids)]
        ok = all(p.holds_cuda for p in found)
        if args.json:
            print(json.dumps({"ok": ok, "processes": [p.to_dict() for p in found]}))
        else:
            for p in found:
                ev = p.evidence
                print(f"{p.pid} {p.driver_answer} (name={p.name or '?'} "
                      f"libcuda={'yes' if ev.maps_libcuda else 'no'} nvidia_fds={ev.nvidia_fds}"
                      f"{'' if p.evidence_agrees else ' EVIDENCE DISAGREES'})")
        return 0 if ok else 1

    if args.action in ("suspend", "resume"):
        if args.action == "suspend":
            result = suspend_all(driver, pids, args.timeout_ms)
        else:
            result = resume_all(driver, pids, args.gpu_map)
        if args.json:
            print(json.dumps(result.to_dict()))
        else:
            _print_batch(result)
        return 0 if result.ok else 1

    rows = [_primitive(driver, args.action, pid, args) for pid in dict.fromkeys(pids)]
    ok = all(r["ok"] for r in rows)
    if args.json:
        print(json.dumps({"ok": ok, "action": args.action, "results": rows}))
    else:
        for r in rows:
            outcome = "ok" if r["ok"] else f"FAILED: {r['message']}"
            print(f"{r['pid']} {args.action} {outcome} {r['seconds'] * 1e3:.1f}ms")
    return 0 if ok else 1


def main() -> None:
    sys.exit(run())
