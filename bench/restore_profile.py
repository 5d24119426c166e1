#!/usr/bin/env python3
"""Where the time of ``ctr containers restore --live --rw`` goes: kybernate next to containerd's runc
shim, phase by phase, on one private containerd (1.6 by default), samples alternating (with
``--baseline REV`` also the shim of another git revision, bench/baseline.py: before and after in one run).

The phases come from the kernel, not from the shims, so both runtimes are measured alike and
nothing in the product is instrumented: a private ftrace instance (tracefs, clock ``mono``, the
clock of Python's ``time.monotonic``, thread group ids recorded) holds process exec/fork/exit of
everyone and, for processes named ``containerd-shim`` (both binaries), accept4 and socket reads and
writes; containerd's debug log adds when it received the shim's TaskCreate and TaskStart events.
For each sample, in ms after ``ctr`` was started:

- ``start exec``: containerd execs the shim binary with ``start``. Before it, ctr reads the
  checkpoint from the content store and creates the container and its rw snapshot, and containerd
  unpacks the checkpoint archive into a temporary dir: the same work for both runtimes (the
  archive's size aside);
- ``start exit``: the ``start`` subcommand is done (it bound the shim socket and got a daemon:
  runc-v2 execs itself, kybernate asks its warm template for a fork);
- ``daemon born``: the daemon's fork (kybernate's warm template) or exec (runc-v2);
- ``accept``: the daemon accepted containerd's connection;
- ``rpcN request`` / ``rpcN response``: the N-th call on that connection, when the daemon's read
  returned its request and when it began to write the response (containerd 1.6 calls Create,
  Connect, Start, State, in that order, as kybernate's debug log shows);
- ``runc exec``/``runc exit``, ``criu exec``/``criu exit``: the first runc the daemon ran (the
  restore) and the longest CRIU that runc ran (the restore; runc asks CRIU for its version first);
- ``TaskCreate``/``TaskStart``: containerd logged the event it received;
- ``ctr exit``.

Durations between them (medians) go into the table; the raw timelines into the json. Run as root
(tracefs). Writes ``restore_profile.json`` and ``restore_profile.md`` into --out.
"""
from __future__ import annotations

import argparse
import calendar
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.checkpoint_support import (counting_past, read_count, remove,  # noqa: E402
                                                  run_counter, task_status, wait_until)
from tests.integration.harness import KYBERNATE_RUNTIME, RUNC_RUNTIME, SHIM_BINARY, Containerd  # noqa: E402
from bench.baseline import BINARY as BASELINE_BINARY, RUNTIME as BASELINE_RUNTIME, VENV_BIN, baseline_shim  # noqa: E402

RUNTIMES = (RUNC_RUNTIME, KYBERNATE_RUNTIME)
SHORT = {RUNC_RUNTIME: "runc-v2", KYBERNATE_RUNTIME: "kybernate", BASELINE_RUNTIME: "kybernate-base"}
SHIM_COMM = "containerd-shim"  # both binaries' comm (the file name, cut at 15 characters)
READS = ("read", "recvfrom", "recvmsg")
WRITES = ("write", "sendto", "sendmsg", "writev")
_LINE = re.compile(r"^\s*(?P<comm>.+?)-(?P<tid>\d+)\s+\(\s*(?P<tgid>\d+|-+)\)\s+\[\d+\]\s+\S+\s+"
                   r"(?P<ts>\d+\.\d+): (?P<event>\w+)(?P<rest>.*)$")
_EVENT = re.compile(r'time="([^"]+)".*msg="event forwarded".*topic=(/tasks/(?:create|start)) ')


class Trace:
    """A private ftrace instance; removed again by `close` (and tracefs unmounted if we mounted it)."""

    def __init__(self) -> None:
        self.mounted = ""
        root = Path("/sys/kernel/tracing")
        if not (root / "instances").is_dir():
            self.mounted = tempfile.mkdtemp(prefix="kyb-tracefs-")
            subprocess.run(["mount", "-t", "tracefs", "nodev", self.mounted], check=True)
            root = Path(self.mounted)
        self.dir = root / "instances" / f"kyb-restore-{secrets.token_hex(3)}"
        self.dir.mkdir()
        try:
            (self.dir / "tracing_on").write_text("0")
            (self.dir / "trace_clock").write_text("mono")
            (self.dir / "buffer_size_kb").write_text("16384")
            (self.dir / "options" / "record-tgid").write_text("1")
            for ev in ("sched_process_exec", "sched_process_fork", "sched_process_exit"):
                (self.dir / "events" / "sched" / ev / "enable").write_text("1")
            calls = ["sys_exit_accept4"] + [f"sys_{d}_{s}" for s in READS + WRITES for d in ("enter", "exit")]
            for name in calls:
                ev = self.dir / "events" / "syscalls" / name
                (ev / "filter").write_text(f'comm == "{SHIM_COMM}"')
                (ev / "enable").write_text("1")
        except BaseException:
            self.close()
            raise

    def begin(self) -> None:
        (self.dir / "trace").write_text("")
        (self.dir / "tracing_on").write_text("1")

    def end(self) -> list[tuple]:
        """(ts, tid, tgid, comm, event, rest) of each line."""
        (self.dir / "tracing_on").write_text("0")
        out = []
        for line in (self.dir / "trace").read_text(errors="replace").splitlines():
            m = _LINE.match(line)
            if m and not line.startswith("#"):
                tgid = int(m["tgid"]) if m["tgid"].isdigit() else int(m["tid"])
                out.append((float(m["ts"]), int(m["tid"]), tgid, m["comm"].strip(), m["event"], m["rest"]))
        return out

    def close(self) -> None:
        try:
            if self.dir.exists():
                (self.dir / "tracing_on").write_text("0")
                for ev in self.dir.glob("events/*/*/enable"):
                    if ev.read_text().strip() != "0":
                        ev.write_text("0")
                self.dir.rmdir()
        finally:
            if self.mounted:
                subprocess.run(["umount", self.mounted], check=False)
                os.rmdir(self.mounted)


def _fields(rest: str) -> dict[str, str]:
    return dict(kv.split("=", 1) for kv in rest.lstrip(": ").split() if "=" in kv)


def _ret(rest: str) -> int:
    """`` -> 0x1f`` of a syscall exit line; negative errnos come as 64-bit two's complement."""
    value = int(rest.split("->", 1)[1].strip(), 16)
    return value - (1 << 64) if value >= 1 << 63 else value


def _fd(rest: str) -> int:
    m = re.search(r"fd: (0x[0-9a-f]+|\d+)", rest)
    return int(m.group(1), 0) if m else -1


def wall_to_mono(stamp: str, offset: float) -> float:
    """containerd's RFC 3339 UTC stamp -> CLOCK_MONOTONIC seconds (offset: time.time() - time.monotonic())."""
    day, clock = stamp.rstrip("Z").split("T")
    clock = clock.split("+")[0]
    hms, _, frac = clock.partition(".")
    t = calendar.timegm(time.strptime(f"{day} {hms}", "%Y-%m-%d %H:%M:%S"))
    return t + float("0." + (frac or "0")) - offset


def timeline(events, t0: float, start_file: str, daemon_pid: int) -> dict[str, float]:
    """Milliseconds after `t0` of each phase boundary (see the module docstring)."""
    ms = lambda t: round((t - t0) * 1000, 2)  # noqa: E731
    out: dict[str, float] = {}
    parent: dict[int, int] = {}
    start_pid = runc_pid = 0
    criu_runs: dict[int, list[float]] = {}  # pid -> [exec, exit] of each CRIU that runc ran
    conn_fd = -1
    entered: dict[int, tuple[str, int]] = {}   # tid -> (syscall, fd) of a read/write under way
    calls: list[list[float]] = []
    busy = False
    for ts, tid, tgid, comm, event, rest in events:
        if ts < t0:
            continue
        if event == "sched_process_fork":
            f = _fields(rest)
            child = int(f["child_pid"])
            parent[child] = int(f["pid"])
            if child == daemon_pid:
                out.setdefault("daemon born", ms(ts))
        elif event == "sched_process_exec":
            f = _fields(rest)
            filename, pid = f.get("filename", ""), int(f.get("pid", tid))
            if filename == start_file and not start_pid:
                start_pid = pid
                out["start exec"] = ms(ts)
            elif pid == daemon_pid:
                out["daemon born"] = ms(ts)  # runc-v2's daemon: exec'd (its fork is `start`'s)
            elif os.path.basename(filename) == "runc" and not runc_pid and _descends(pid, daemon_pid, parent):
                runc_pid = pid
                out["runc exec"] = ms(ts)
            elif os.path.basename(filename) == "criu" and runc_pid:
                criu_runs[pid] = [ts]
        elif event == "sched_process_exit":
            if tid == start_pid:
                out.setdefault("start exit", ms(ts))
            elif tid == runc_pid:
                out.setdefault("runc exit", ms(ts))
            elif tid in criu_runs:
                criu_runs[tid].append(ts)
        elif tgid != daemon_pid:
            continue
        elif event == "sys_accept4":
            fd = _ret(rest)
            if fd >= 0 and conn_fd < 0:
                conn_fd = fd
                out["accept"] = ms(ts)
        elif rest.startswith("("):   # a syscall entered
            name = event[len("sys_"):]
            entered[tid] = (name, _fd(rest))
            if name in WRITES and entered[tid][1] == conn_fd and busy:
                calls[-1].append(ts)
                busy = False
        elif "->" in rest:           # a syscall returned
            name, fd = entered.pop(tid, ("", -1))
            if name in READS and fd == conn_fd >= 0 and _ret(rest) > 0 and not busy:
                calls.append([ts])
                busy = True
    done = [run for run in criu_runs.values() if len(run) == 2]
    if done:  # runc asks CRIU for its version first: the restore is the longest run
        longest = max(done, key=lambda run: run[1] - run[0])
        out["criu exec"], out["criu exit"] = ms(longest[0]), ms(longest[1])
    for i, call in enumerate(calls):
        out[f"rpc{i + 1} request"] = ms(call[0])
        if len(call) > 1:
            out[f"rpc{i + 1} response"] = ms(call[1])
    return out


def _descends(pid: int, ancestor: int, parent: dict[int, int]) -> bool:
    for _ in range(64):
        if pid == ancestor:
            return True
        pid = parent.get(pid, 0)
        if not pid:
            return False
    return False


# -- one sample ---------------------------------------------------------------------------------------

def shim_file(cd: Containerd, runtime: str) -> str:
    """What containerd execs for `runtime` (the sched_process_exec filename)."""
    if runtime == KYBERNATE_RUNTIME:
        return cd.which("containerd-shim-kybernate-v1") or str(SHIM_BINARY)
    if runtime == BASELINE_RUNTIME:
        return str(VENV_BIN / BASELINE_BINARY)
    return cd.which("containerd-shim-runc-v2") or str(cd.install.bin_dir / "containerd-shim-runc-v2")


def shim_daemon(cd: Containerd, cid: str) -> int:
    """The pid of the shim daemon serving `cid` (runc-v2 keeps no shim.pid in the bundle): the shim
    process of this containerd whose command line says ``-id cid``."""
    for pid in cd.shim_pids():
        try:
            args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "-id" in args and args[args.index("-id") + 1:][:1] == [cid] and args[-2:-1] != ["warm"]:
            return pid
    raise RuntimeError(f"no shim daemon for {cid}")


def one_sample(cd: Containerd, runtime: str, trace: Trace) -> dict:
    cid = f"prof-{SHORT[runtime]}-{secrets.token_hex(3)}"
    ref = f"kybprof/{cid}:ckpt"
    try:
        run_counter(cd, cid, runtime)
        if counting_past(cd, cid, 3) is None:
            raise RuntimeError(f"{cid} does not count")
        at_checkpoint = read_count(cd, cid)  # before: the task runs on after the checkpoint
        cd.ctr("containers", "checkpoint", "--task", "--rw", cid, ref, timeout=120)
        remove(cd, cid)
        log_from = cd.log_path.stat().st_size
        time.sleep(0.3)  # let the removed task's shim exit out of the way
        trace.begin()
        offset = time.time() - time.monotonic()
        t0 = time.monotonic()
        cd.ctr("containers", "restore", "--live", "--rw", cid, ref, timeout=120)
        t1 = time.monotonic()
        time.sleep(0.05)
        events = trace.end()
        daemon_pid = shim_daemon(cd, cid)
        out = timeline(events, t0, shim_file(cd, runtime), daemon_pid)
        out["ctr exit"] = round((t1 - t0) * 1000, 2)
        with open(cd.log_path, "rb") as f:
            f.seek(log_from)
            log = f.read().decode(errors="replace")
        for m in map(_EVENT.search, log.splitlines()):
            if m:
                name = "TaskCreate" if m.group(2) == "/tasks/create" else "TaskStart"
                out[name] = round((wall_to_mono(m.group(1), offset) - t0) * 1000, 2)
        if task_status(cd, cid) != "RUNNING":
            raise RuntimeError(f"{cid}: restored task is {task_status(cd, cid)}")
        first = wait_until(lambda: (lambda n: n if n > 0 else None)(read_count(cd, cid)), 10)
        if first is None or first < at_checkpoint or counting_past(cd, cid, first, 10) is None:
            raise RuntimeError(f"{cid}: restored counter at {first}, checkpointed at {at_checkpoint}, not counting on")
        return out
    finally:
        remove(cd, cid)
        cd.ctr("images", "rm", ref, check=False)


# -- the table ----------------------------------------------------------------------------------------

# (name, from, to): the phases the table shows, each the median over samples of (to - from)
PHASES = (
    ("ctr and containerd before the shim (container, rw layer, checkpoint unpacked)", "t0", "start exec"),
    ("`start` subcommand (exec to exit)", "start exec", "start exit"),
    ("  of which: until the daemon exists (its fork or exec)", "start exec", "daemon born"),
    ("`start` exit to the daemon's accept", "start exit", "accept"),
    ("accept to Create's request read", "accept", "rpc1 request"),
    ("Create in the shim (request read to response)", "rpc1 request", "rpc1 response"),
    ("Create's response to Start's request (containerd, ctr; Connect between)", "rpc1 response", "rpc3 request"),
    ("Start's request to runc exec", "rpc3 request", "runc exec"),
    ("runc restore (exec to exit)", "runc exec", "runc exit"),
    ("  of which CRIU's restore (exec to exit)", "criu exec", "criu exit"),
    ("runc exit to Start's response", "runc exit", "rpc3 response"),
    ("Start's response to ctr exit (State between)", "rpc3 response", "ctr exit"),
    ("TaskCreate to TaskStart event (containerd's log; checkpoint_bench's restore_start)", "TaskCreate", "TaskStart"),
    ("whole command (ctr start to exit)", "t0", "ctr exit"),
)


def phase_stats(samples: list[dict]) -> dict[str, dict]:
    out = {}
    for name, a, b in PHASES:
        vals = [s[b] - (0.0 if a == "t0" else s[a]) for s in samples if b in s and (a == "t0" or a in s)]
        if vals:
            out[name] = {"n": len(vals), "median_ms": round(statistics.median(vals), 1),
                         "p10_ms": round(sorted(vals)[int(0.1 * (len(vals) - 1))], 1),
                         "p90_ms": round(sorted(vals)[round(0.9 * (len(vals) - 1))], 1)}
    return out


def markdown(result: dict) -> str:
    names = list(result["phases"])
    ref = result["phases"]["runc-v2"]
    kybs = [n for n in names if n != "runc-v2"]
    base = f" (`kybernate-base`: the shim at {result['baseline']}, on the same containerd)" if result.get("baseline") else ""
    lines = [
        "# Where `ctr c restore --live --rw` spends its time: kybernate next to runc-v2",
        "",
        f"containerd {result['containerd']} ({result['ctr_version']}), {result['runc']}, CRIU {result['criu']}, "
        f"kernel {result['kernel']}, {result['cpus']} CPUs, load average {result['load_before']} before and "
        f"{result['load_after']} after; {result['runs']} samples per runtime, alternating{base}, each a fresh "
        "busybox counter checkpointed with `ctr c checkpoint --task --rw`, removed, restored. Phase boundaries "
        "from a private ftrace instance and containerd's debug log (bench/restore_profile.py). Medians in ms "
        "(each phase's own median: the rows do not add up exactly).",
        "",
        "| phase | " + " | ".join(names) + " | " + " | ".join(f"{n} - runc-v2" for n in kybs) + " | "
        + " | ".join(f"{n} p10-p90" for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names + kybs) + " | " + " | ".join("---" for _ in names) + " |",
    ]
    for name, _, _ in PHASES:
        got = [result["phases"][n].get(name) for n in names]
        if any(g is None for g in got):
            continue
        lines.append(f"| {name} | " + " | ".join(str(g["median_ms"]) for g in got) + " | "
                     + " | ".join(f"{result['phases'][n][name]['median_ms'] - ref[name]['median_ms']:+.1f}" for n in kybs)
                     + " | " + " | ".join(f"{g['p10_ms']}-{g['p90_ms']}" for g in got) + " |")
    lines += ["", "Command: `" + result["command"] + "`"]
    return "\n".join(lines) + "\n"


def _load() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containerd", default="1.6", choices=("1.6", "1.7", "2.1"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "cpu-restore"))
    ap.add_argument("--name", default="restore_profile", help="file name of the json and md written")
    ap.add_argument("--baseline", metavar="REV", help="also the shim of git revision REV, as a third runtime "
                    "(bench/baseline.py): before and after in one run")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(baseline_shim(args.baseline)) if args.baseline else ""
        return _run(args, argv, RUNTIMES + ((BASELINE_RUNTIME,) if baseline else ()), baseline)


def _run(args, argv, runtimes: tuple[str, ...], baseline: str) -> int:

    load_before = _load()
    workdir = Path(tempfile.mkdtemp(prefix="kyb-restore-prof-", dir="/var/tmp"))
    cd = Containerd(args.containerd, workdir, keep_log=False)
    samples: dict[str, list[dict]] = {SHORT[r]: [] for r in runtimes}
    trace = Trace()
    try:
        cd.start()
        cd.import_busybox()
        for rt in runtimes:  # warm-up (page cache, first CRIU run, the templates), not counted
            one_sample(cd, rt, trace)
        for i in range(args.runs):
            shift = i % len(runtimes)  # each runtime takes each place in the order in turn
            for rt in runtimes[shift:] + runtimes[:shift]:
                samples[SHORT[rt]].append(one_sample(cd, rt, trace))
            print(f"sample {i + 1}/{args.runs}: " + ", ".join(
                f"{name} {s[-1].get('ctr exit', 0):.0f} ms" for name, s in samples.items()), flush=True)
        ctr_version = cd.ctr("version").stdout.split("Version:")[1].split()[0]
    finally:
        trace.close()
        cd.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    criu = subprocess.run(["/usr/local/sbin/criu", "--version"], capture_output=True, text=True).stdout
    runc = subprocess.run([str(cd.install.runc), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    result = {
        "containerd": args.containerd, "ctr_version": ctr_version, "runc": runc,
        "criu": criu.split("Version:")[1].split()[0] if "Version:" in criu else criu.strip(),
        "kernel": platform.release(), "cpus": os.cpu_count(), "runs": args.runs,
        "load_before": load_before, "load_after": _load(), "baseline": baseline,
        "phases": {name: phase_stats(s) for name, s in samples.items()},
        "timelines_ms": samples,
        "command": "bench/restore_profile.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "when": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.name}.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / f"{args.name}.md").write_text(markdown(result))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
