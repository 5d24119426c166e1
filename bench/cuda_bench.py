#!/usr/bin/env python3
"""CUDA suspend/resume through cuda_bindings: time and GB/s, next to the machine's copy bandwidth.

Measures, on one GPU, with tests/gpu/workload.cu processes (every byte incremented and checked each
tick, so each cycle is also verified: bad=0 and the count continues):
- one process of 1, 2, 8 GiB: lock, checkpoint, restore, unlock, each timed; the first cycle is
  reported apart as cold (host memory first touched), the rest warm;
- 1, 2, 4 processes of 2 GiB each through suspend_all/resume_all (parallel threads);
- pinned cudaMemcpy bandwidth, device-to-host and host-to-device, in the same run (torch, in a
  subprocess), the physical bound the driver's checkpoint is compared with;
- the binding's overhead against bare ctypes calls on the same process, by alternating cycles
  (and, per call, by alternating blocks of cuCheckpointProcessGetState).
Writes cuda_bench.json and cuda_bench.md into --out ($OUT, else bench/results/), after each section,
so that a run cut short still leaves what it measured.
"""
from __future__ import annotations

import argparse
import ctypes
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests" / "gpu"))

import gpu_workload as gw  # noqa: E402
from cuda_bindings import CudaDriver, ProcessState, resume_all, suspend_all  # noqa: E402

TIMEOUT_MS = 10000

MEMCPY = r"""
import json, time, torch
n = 1 << 30
d = torch.empty(n, dtype=torch.uint8, device="cuda"); d.fill_(1)
h = torch.empty(n, dtype=torch.uint8, pin_memory=True)
res = {"bytes": n, "device": torch.cuda.get_device_name(0)}
for name, fn in [("d2h", lambda: h.copy_(d, non_blocking=True)),
                 ("h2d", lambda: d.copy_(h, non_blocking=True))]:
    fn(); torch.cuda.synchronize()
    ts = []
    for _ in range(7):
        t0 = time.perf_counter(); fn(); torch.cuda.synchronize(); ts.append(time.perf_counter() - t0)
    ts.sort()
    res[name + "_GBps_best"] = n / ts[0] / 1e9
    res[name + "_GBps_median"] = n / ts[len(ts) // 2] / 1e9
print(json.dumps(res))
"""


class RawCtypes:
    """The same driver calls through bare ctypes, checking only the return code: the baseline."""

    class LockArgs(ctypes.Structure):
        _fields_ = [("timeoutMs", ctypes.c_uint), ("reserved0", ctypes.c_uint),
                    ("reserved1", ctypes.c_uint64 * 7)]

    def __init__(self, path: str):
        self.lib = ctypes.CDLL(path)
        assert self.lib.cuInit(0) == 0

    def _ok(self, rc: int) -> None:
        if rc:
            raise RuntimeError(f"CUresult {rc}")

    def state(self, pid: int) -> int:
        out = ctypes.c_int(-1)
        self._ok(self.lib.cuCheckpointProcessGetState(pid, ctypes.byref(out)))
        return out.value

    def cycle(self, pid: int) -> None:
        self._ok(self.lib.cuCheckpointProcessLock(pid, ctypes.byref(self.LockArgs(TIMEOUT_MS))))
        self._ok(self.lib.cuCheckpointProcessCheckpoint(pid, None))
        self._ok(self.lib.cuCheckpointProcessRestore(pid, None))
        self._ok(self.lib.cuCheckpointProcessUnlock(pid, None))


class Bench:
    def __init__(self, args):
        self.args = args
        self.out = Path(args.out)
        self.out.mkdir(parents=True, exist_ok=True)
        self.deadline = time.monotonic() + args.budget_s
        self.driver = CudaDriver()
        binary = gw.find_binary() if not args.workload else Path(args.workload)
        self.binary = binary or gw.build(Path("/tmp"))
        self.results: dict = {"driver_version": self.driver.driver_version(),
                              "devices": self.driver.device_uuids(), "sections": {}}

    # ---- plumbing ----------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def section(self, name: str, estimate_s: float, fn) -> None:
        if self.left() < estimate_s:
            self.results["sections"][name] = {"skipped": f"budget: {self.left():.0f}s left, "
                                                         f"needs about {estimate_s:.0f}s"}
        else:
            start = time.monotonic()
            try:
                self.results["sections"][name] = fn()
            except Exception as exc:  # record and go on: one broken section must not hide the rest
                self.results["sections"][name] = {"error": f"{type(exc).__name__}: {exc}"}
            self.results["sections"][name]["section_s"] = round(time.monotonic() - start, 2)
        print(f"[{name}] {json.dumps(self.results['sections'][name])[:400]}", flush=True)
        self.write()

    def workloads(self, count: int, nbytes: int) -> list[gw.Workload]:
        ws = [gw.Workload(self.binary, nbytes) for _ in range(count)]
        for w in ws:
            w.wait_ready(2)
        return ws

    # ---- sections ----------------------------------------------------------------------------
    def memcpy(self) -> dict:
        out = subprocess.run([sys.executable, "-c", MEMCPY], capture_output=True, text=True,
                             timeout=120)
        if out.returncode:
            return {"error": out.stderr.strip().splitlines()[-1:] or ["torch failed"]}
        return json.loads(out.stdout.strip().splitlines()[-1])

    def single(self, gib: int) -> dict:
        nbytes = gib * gw.GIB
        (w,) = self.workloads(1, nbytes)
        cycles = []
        try:
            for _ in range(1 + self.args.cycles):
                w.wait_tick(w.last + 1)
                t = {}
                for step, call in (("lock", lambda: self.driver.lock(w.pid, TIMEOUT_MS)),
                                   ("checkpoint", lambda: self.driver.checkpoint(w.pid)),
                                   ("restore", lambda: self.driver.restore(w.pid)),
                                   ("unlock", lambda: self.driver.unlock(w.pid))):
                    start = time.perf_counter()
                    call()
                    t[step + "_s"] = time.perf_counter() - start
                t["checkpoint_GBps"] = nbytes / t["checkpoint_s"] / 1e9
                t["restore_GBps"] = nbytes / t["restore_s"] / 1e9
                cycles.append(t)
            w.wait_tick(w.last + 2)
            w.verify()
        finally:
            w.stop()
        return {"bytes": nbytes, "cold": cycles[0], "warm": cycles[1:],
                "warm_median": _medians(cycles[1:]), "verified": True}

    def multi(self, count: int) -> dict:
        nbytes = self.args.proc_gib * gw.GIB
        ws = self.workloads(count, nbytes)
        pids = [w.pid for w in ws]
        cycles = []
        try:
            for _ in range(1 + self.args.cycles):
                for w in ws:
                    w.wait_tick(w.last + 1)
                s = suspend_all(self.driver, pids, TIMEOUT_MS).raise_for_failure()
                r = resume_all(self.driver, pids).raise_for_failure()
                total = count * nbytes
                cycles.append({"suspend_s": s.seconds, "suspend_serial_s": s.serial_seconds,
                               "suspend_GBps": total / s.seconds / 1e9,
                               "resume_s": r.seconds, "resume_serial_s": r.serial_seconds,
                               "resume_GBps": total / r.seconds / 1e9})
            for w in ws:
                w.wait_tick(w.last + 2)
                w.verify()
        finally:
            for w in ws:
                w.stop()
        return {"processes": count, "bytes_each": nbytes, "cold": cycles[0], "warm": cycles[1:],
                "warm_median": _medians(cycles[1:]), "verified": True}

    def overhead(self) -> dict:
        """Alternate, on one process: binding primitives, bare ctypes, binding suspend/resume."""
        raw = RawCtypes(self.driver.path)
        (w,) = self.workloads(1, self.args.overhead_mib * gw.MIB)
        pid = w.pid
        kinds = {
            "ctypes": lambda: raw.cycle(pid),
            "binding": lambda: (self.driver.lock(pid, TIMEOUT_MS), self.driver.checkpoint(pid),
                                self.driver.restore(pid), self.driver.unlock(pid)),
            "binding_helpers": lambda: (self.driver.suspend(pid, TIMEOUT_MS),
                                        self.driver.resume(pid)),
        }
        order = list(kinds)
        times: dict[str, list[float]] = {k: [] for k in kinds}
        try:
            for k in order:  # warm-up, not counted
                kinds[k]()
            for i in range(self.args.overhead_rounds):
                rotated = order[i % 3:] + order[:i % 3]  # no kind always first or last
                for k in rotated:
                    start = time.perf_counter()
                    kinds[k]()
                    times[k].append(time.perf_counter() - start)
                    assert self.driver.state(pid) is ProcessState.RUNNING
            calls = {"ctypes": lambda: raw.state(pid), "binding": lambda: self.driver.state(pid)}
            per_call: dict[str, list[float]] = {k: [] for k in calls}
            for i in range(10):
                for k in (list(calls) if i % 2 else list(calls)[::-1]):
                    start = time.perf_counter()
                    for _ in range(500):
                        calls[k]()
                    per_call[k].append((time.perf_counter() - start) / 500)
            w.wait_tick(w.last + 2)
            w.verify()
        finally:
            w.stop()
        med = {k: statistics.median(v) for k, v in times.items()}
        call_med = {k: statistics.median(v) for k, v in per_call.items()}
        spread = statistics.quantiles(times["ctypes"], n=4) if len(times["ctypes"]) >= 4 else None
        extra_per_cycle = 4 * (call_med["binding"] - call_med["ctypes"])
        return {
            "bytes": self.args.overhead_mib * gw.MIB, "rounds": self.args.overhead_rounds,
            "cycle_median_s": med,
            "ctypes_cycle_quartiles_s": spread,
            "binding_vs_ctypes_pct": 100 * (med["binding"] - med["ctypes"]) / med["ctypes"],
            "helpers_vs_ctypes_pct": 100 * (med["binding_helpers"] - med["ctypes"]) / med["ctypes"],
            "getstate_call_us": {k: v * 1e6 for k, v in call_med.items()},
            "per_call_overhead_pct_of_cycle": 100 * extra_per_cycle / med["ctypes"],
            "under_2pct": {
                "cycle_median": abs(med["binding"] - med["ctypes"]) < 0.02 * med["ctypes"],
                "per_call_estimate": extra_per_cycle < 0.02 * med["ctypes"]},
            "samples_s": times,
        }

    # ---- output ------------------------------------------------------------------------------
    def write(self) -> None:
        (self.out / "cuda_bench.json").write_text(json.dumps(self.results, indent=1))
        (self.out / "cuda_bench.md").write_text(markdown(self.results))

    def run(self) -> None:
        a = self.args
        self.section("memcpy_pinned", 20, self.memcpy)
        self.section("overhead", 10 + a.overhead_rounds * 1.5, self.overhead)
        single = lambda gib: self.section(f"single_{gib}GiB", 6 + gib * 1.5 * (1 + a.cycles),
                                          lambda: self.single(gib))
        for gib in (g for g in a.sizes if g <= a.proc_gib):
            single(gib)
        for count in a.procs:  # before the large single sizes, which a short budget drops first
            self.section(f"parallel_{count}x{a.proc_gib}GiB",
                         8 + count * a.proc_gib * 1.2 * (1 + a.cycles), lambda c=count: self.multi(c))
        for gib in (g for g in a.sizes if g > a.proc_gib):
            single(gib)
        print(markdown(self.results), flush=True)


def _medians(cycles: list[dict]) -> dict:
    if not cycles:
        return {}
    return {k: statistics.median(c[k] for c in cycles) for k in cycles[0]}


def markdown(results: dict) -> str:
    s = results["sections"]
    lines = [f"# CUDA suspend/resume through cuda_bindings",
             f"driver API {results['driver_version']}, devices {', '.join(results['devices'])}", ""]
    mc = s.get("memcpy_pinned", {})
    if "d2h_GBps_best" in mc:
        lines.append(f"Pinned cudaMemcpy 1 GiB ({mc['device']}): device-to-host "
                     f"{mc['d2h_GBps_best']:.1f} GB/s, host-to-device {mc['h2d_GBps_best']:.1f} GB/s "
                     "(best of 7).")
    else:
        lines.append(f"Pinned cudaMemcpy: {mc}")
    lines += ["", "## One process (warm: median of the cycles after the first; cold: the first)", "",
              "| VRAM | lock ms | checkpoint s | GB/s | % of pinned D2H | restore s | GB/s | "
              "unlock ms | cold checkpoint s | cold restore s |",
              "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    for name, sec in s.items():
        if not name.startswith("single_"):
            continue
        m, cold = sec.get("warm_median"), sec.get("cold")
        if not m:
            lines.append(f"| {name} | {sec} |")
            continue
        pct = (f"{100 * m['checkpoint_GBps'] / mc['d2h_GBps_best']:.1f}"
               if "d2h_GBps_best" in mc else "-")
        lines.append(f"| {sec['bytes'] / gw.GIB:.0f} GiB | {m['lock_s'] * 1e3:.2f} | "
                     f"{m['checkpoint_s']:.3f} | {m['checkpoint_GBps']:.2f} | {pct} | "
                     f"{m['restore_s']:.3f} | {m['restore_GBps']:.2f} | {m['unlock_s'] * 1e3:.2f} | "
                     f"{cold['checkpoint_s']:.3f} | {cold['restore_s']:.3f} |")
    lines += ["", "## Processes in parallel (suspend_all / resume_all; GB/s of all processes together)",
              "", "| processes | suspend s | GB/s | sum of per-process s | resume s | GB/s | "
              "sum of per-process s |", "| --- | --- | --- | --- | --- | --- | --- |"]
    for name, sec in s.items():
        if not name.startswith("parallel_"):
            continue
        m = sec.get("warm_median")
        if not m:
            lines.append(f"| {name} | {sec} |")
            continue
        lines.append(f"| {sec['processes']} x {sec['bytes_each'] / gw.GIB:.0f} GiB | "
                     f"{m['suspend_s']:.3f} | {m['suspend_GBps']:.2f} | {m['suspend_serial_s']:.3f} | "
                     f"{m['resume_s']:.3f} | {m['resume_GBps']:.2f} | {m['resume_serial_s']:.3f} |")
    ov = s.get("overhead", {})
    lines += ["", "## Overhead of the binding against bare ctypes (same process, alternating cycles)",
              ""]
    if "cycle_median_s" in ov:
        c = ov["cycle_median_s"]
        lines += [
            f"{ov['rounds']} rounds of lock+checkpoint+restore+unlock on {ov['bytes'] // gw.MIB} MiB; "
            f"median cycle: ctypes {c['ctypes']:.4f} s, binding {c['binding']:.4f} s "
            f"({ov['binding_vs_ctypes_pct']:+.2f} %), binding suspend()+resume() "
            f"{c['binding_helpers']:.4f} s ({ov['helpers_vs_ctypes_pct']:+.2f} %, includes their "
            "state reads). ctypes cycle quartiles: "
            f"{', '.join(f'{q:.4f}' for q in ov['ctypes_cycle_quartiles_s'] or [])} s.",
            f"Per call (cuCheckpointProcessGetState, median of 10 blocks of 500): ctypes "
            f"{ov['getstate_call_us']['ctypes']:.2f} us, binding {ov['getstate_call_us']['binding']:.2f}"
            f" us: 4 calls a cycle add {ov['per_call_overhead_pct_of_cycle']:.4f} % to a cycle.",
            f"Under 2 %: by cycle medians {ov['under_2pct']['cycle_median']}, by the per-call "
            f"estimate {ov['under_2pct']['per_call_estimate']}."]
    else:
        lines.append(str(ov))
    return "\n".join(lines) + "\n"


def main() -> None:
    default_out = os.environ.get("OUT") or str(REPO / "bench" / "results")
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=default_out)
    p.add_argument("--workload", default=None, help="workload binary (default $KYBERNATE_WORKLOAD, "
                                                    "else built with nvcc)")
    p.add_argument("--sizes", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 8],
                   help="GiB held by the single process, comma-separated")
    p.add_argument("--procs", type=lambda t: [int(x) for x in t.split(",")], default=[1, 2, 4])
    p.add_argument("--proc-gib", type=int, default=2)
    p.add_argument("--cycles", type=int, default=2, help="warm cycles after the cold one")
    p.add_argument("--overhead-mib", type=int, default=256)
    p.add_argument("--overhead-rounds", type=int, default=12)
    p.add_argument("--budget-s", type=float, default=170.0,
                   help="skip sections that would not finish within this many seconds")
    Bench(p.parse_args()).run()


if __name__ == "__main__":
    main()
