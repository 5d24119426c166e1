#!/usr/bin/env python3
"""Checkpoint and restore latency of a counter container: kybernate next to containerd's runc shim,
in one run on one private containerd (1.6 by default).

Each sample uses a fresh counter container (busybox sh writing a number ten times a second), the two
runtimes alternating sample by sample so that drift hits both alike (with ``--baseline REV``, a third:
the shim of another git revision, bench/baseline.py; each runtime takes each place in turn). Per sample:

- ``checkpoint_api``: containerd's Tasks.Checkpoint with CheckpointOptions{image_path: a new dir}
  (leave running), timed around the gRPC call: the runtime's checkpoint as a client without ctr sees
  it. For runc.v2 containerd passes the dir to the shim and stores nothing; for kybernate (not a runc
  runtime to containerd) it also tars its scratch dir (our note) and the spec into its content
  store, part of what kybernate costs under containerd 1.6, so it is in the number.
- ``checkpoint_ctr``: ``ctr containers checkpoint --task --rw ID REF`` wall time (pause, checkpoint,
  rw layer diff, content store, resume);
- ``restore_ctr``: after the task and container are removed, ``ctr containers restore --live --rw ID
  REF`` wall time (container from the checkpoint, shim start, Create with the checkpoint, Start = runc
  restore), then checked: the restored counter goes on from its checkpointed value;
- ``restore_start``: the restore step alone: from the shim's TaskCreate event to its TaskStart event
  of that restore, as containerd's debug log stamps their arrival (ctr calls Start right after
  Create returns; both shims restore in Start). This leaves out what every task pays (the shim's
  own start-up, which bench/shim_bench.py measures).

Median of --runs (10) each; writes checkpoint_bench.json and .md into --out (bench/results/).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import platform
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

from tests.integration.checkpoint_support import (api_checkpoint, counting_past, read_count,  # noqa: E402
                                                  remove, run_counter, task_status, wait_until)
from tests.integration.harness import KYBERNATE_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402
from bench.baseline import RUNTIME as BASELINE_RUNTIME, baseline_shim  # noqa: E402


def _seconds(stamp: str) -> float:
    """containerd's RFC 3339 time with nanoseconds -> seconds of the day (the run is minutes long)."""
    hh, mm, rest = stamp.split("T")[1].rstrip("Z").split(":")
    return int(hh) * 3600 + int(mm) * 60 + float(rest[:12].split("+")[0])


def last_create_to_start(log_text: str) -> float:
    """Seconds between the last /tasks/create event and the /tasks/start that follows it."""
    events = [(m.group(2), _seconds(m.group(1))) for m in map(_STAMP.search, log_text.splitlines()) if m]
    for i in range(len(events) - 1, 0, -1):
        if events[i][0] == "/tasks/start" and events[i - 1][0] == "/tasks/create":
            return events[i][1] - events[i - 1][1]
    raise RuntimeError("no /tasks/create then /tasks/start in containerd's log")

RUNTIMES = (RUNC_RUNTIME, KYBERNATE_RUNTIME)
SHORT = {RUNC_RUNTIME: "runc-v2", KYBERNATE_RUNTIME: "kybernate", BASELINE_RUNTIME: "kybernate-base"}
METRICS = ("checkpoint_api", "checkpoint_ctr", "restore_ctr", "restore_start")
_STAMP = re.compile(r'time="([^"]+)".*msg="event forwarded".*topic=(/tasks/(?:create|start)) ')


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]  # noqa: E731
    return {"n": len(s), "median_ms": round(statistics.median(s) * 1000, 1), "p10_ms": round(q(0.1) * 1000, 1),
            "p90_ms": round(q(0.9) * 1000, 1), "min_ms": round(s[0] * 1000, 1), "max_ms": round(s[-1] * 1000, 1)}


def one_sample(cd: Containerd, runtime: str, scratch: Path) -> dict[str, float]:
    cid = f"bench-{SHORT[runtime]}-{secrets.token_hex(3)}"
    ref = f"kybbench/{cid}:ckpt"
    out: dict[str, float] = {}
    try:
        run_counter(cd, cid, runtime)
        if counting_past(cd, cid, 3) is None:
            raise RuntimeError(f"{cid} does not count")
        image = scratch / cid
        t0 = time.perf_counter()
        api_checkpoint(cd, cid, image_path=str(image))
        out["checkpoint_api"] = time.perf_counter() - t0
        shutil.rmtree(image, ignore_errors=True)

        # read before the checkpoint: the task runs on after it, so a read after may see a count the
        # image does not hold (the restored counter then starts one below it, correctly)
        at_checkpoint = read_count(cd, cid)
        t0 = time.perf_counter()
        cd.ctr("containers", "checkpoint", "--task", "--rw", cid, ref, timeout=120)
        out["checkpoint_ctr"] = time.perf_counter() - t0
        remove(cd, cid)

        t0 = time.perf_counter()
        cd.ctr("containers", "restore", "--live", "--rw", cid, ref, timeout=120)
        out["restore_ctr"] = time.perf_counter() - t0
        out["restore_start"] = last_create_to_start(cd.log_text())
        if task_status(cd, cid) != "RUNNING":
            raise RuntimeError(f"{cid}: restored task is {task_status(cd, cid)}")
        first = wait_until(lambda: (lambda n: n if n > 0 else None)(read_count(cd, cid)), 10)
        if first is None or first < at_checkpoint or counting_past(cd, cid, first, 10) is None:
            raise RuntimeError(f"{cid}: restored counter at {first}, checkpointed at {at_checkpoint}, not counting on")
    finally:
        remove(cd, cid)
        cd.ctr("images", "rm", ref, check=False)
    return out


def markdown(result: dict) -> str:
    names = list(result["results"])
    kybs = [n for n in names if n != "runc-v2"]
    base = f" (`kybernate-base` is {result['baseline']}, the same containerd)" if result.get("baseline") else ""
    lines = [
        "# Checkpoint/restore latency: kybernate vs containerd's runc shim",
        "",
        f"containerd {result['containerd']} ({result['ctr_version']}), {result['runc']}, CRIU {result['criu']}, "
        f"kernel {result['kernel']}, {result['cpus']} CPUs, load average {result.get('load_before', '?')} before "
        f"and {result.get('load_after', '?')} after; {result['runs']} samples per runtime and metric, "
        f"alternating runtimes, each sample a fresh busybox counter container{base}. Times in ms.",
        "",
        "| metric | " + " | ".join(f"{n} median" for n in names) + " | "
        + " | ".join(f"{n} / runc-v2" for n in kybs) + " | " + " | ".join(f"{n} p10-p90" for n in names) + " |",
        "| --- | " + " | ".join("---:" for _ in names + kybs) + " | " + " | ".join("---" for _ in names) + " |",
    ]
    for m in METRICS:
        r = result["results"]
        lines.append(f"| {m} | " + " | ".join(str(r[n][m]["median_ms"]) for n in names) + " | "
                     + " | ".join(f"{result['ratios'][n][m]:.2f}" for n in kybs) + " | "
                     + " | ".join(f"{r[n][m]['p10_ms']}-{r[n][m]['p90_ms']}" for n in names) + " |")
    paired = {n: {m: statistics.median(a / b for a, b in zip(result["samples_ms"][n][m],
                                                             result["samples_ms"]["runc-v2"][m]))
                  for m in METRICS} for n in kybs}
    lines += [
        "",
        "Median of the per-round ratios (a round runs every runtime once, in rotating order, so drift in the "
        "machine's load hits a round's samples alike): "
        + "; ".join(f"{n} " + ", ".join(f"{m} {paired[n][m]:.2f}" for m in METRICS) for n in kybs) + ".",
        "",
        "- checkpoint_api: Tasks.Checkpoint with image_path (leave running), timed around the gRPC call.",
        "- checkpoint_ctr: `ctr containers checkpoint --task --rw` (pause, checkpoint, rw diff, content store, resume).",
        "- restore_ctr: `ctr containers restore --live --rw` (container from the checkpoint, shim start, task Create+Start).",
        "- restore_start: the restore step alone, TaskCreate to TaskStart event of the restored task (containerd's log).",
        f"- target: kybernate within 10 % of runc-v2; met: "
        + ", ".join(f"{m} {'yes' if result['ratio'][m] <= 1.10 else 'no'}" for m in METRICS),
        "",
        "Command: `" + result["command"] + "`",
    ]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containerd", default="1.6", choices=("1.6", "1.7", "2.1"))
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    ap.add_argument("--name", default="checkpoint_bench", help="file name of the json and md written")
    ap.add_argument("--baseline", metavar="REV", help="also the shim of git revision REV, as a third runtime "
                    "(bench/baseline.py): before and after in one run")
    args = ap.parse_args(argv)
    with contextlib.ExitStack() as stack:
        baseline = stack.enter_context(baseline_shim(args.baseline)) if args.baseline else ""
        runtimes = RUNTIMES + ((BASELINE_RUNTIME,) if baseline else ())
        return _run(args, argv, runtimes, baseline)


def _run(args, argv, runtimes: tuple[str, ...], baseline: str) -> int:

    load_before = " ".join(Path("/proc/loadavg").read_text().split()[:3])
    workdir = Path(tempfile.mkdtemp(prefix="kyb-ckpt-bench-", dir="/var/tmp"))
    cd = Containerd(args.containerd, workdir, keep_log=False)
    samples = {SHORT[r]: {m: [] for m in METRICS} for r in runtimes}
    try:
        cd.start()
        cd.import_busybox()
        scratch = workdir / "criu-images"
        scratch.mkdir()
        for runtime in runtimes:  # warm-up (page cache, first CRIU run, the templates), not counted
            one_sample(cd, runtime, scratch)
        for i in range(args.runs):
            shift = i % len(runtimes)  # each runtime takes each place in the order in turn
            for runtime in runtimes[shift:] + runtimes[:shift]:
                for m, v in one_sample(cd, runtime, scratch).items():
                    samples[SHORT[runtime]][m].append(v)
            print(f"sample {i + 1}/{args.runs}: " + ", ".join(
                f"{name} {m} {vals[m][-1] * 1000:.0f} ms" for name, vals in samples.items() for m in METRICS),
                flush=True)
        ctr_version = cd.ctr("version").stdout.split("Version:")[1].split()[0]
    finally:
        cd.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    results = {name: {m: stats(v) for m, v in vals.items()} for name, vals in samples.items()}
    criu = subprocess.run(["/usr/local/sbin/criu", "--version"], capture_output=True, text=True).stdout
    runc = subprocess.run([str(cd.install.runc), "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    result = {
        "containerd": args.containerd, "ctr_version": ctr_version, "runc": runc,
        "criu": criu.split("Version:")[1].split()[0] if "Version:" in criu else criu.strip(),
        "kernel": platform.release(), "cpus": os.cpu_count(), "runs": args.runs,
        "load_before": load_before, "load_after": " ".join(Path("/proc/loadavg").read_text().split()[:3]),
        "results": results, "baseline": baseline,
        "ratio": {m: round(results["kybernate"][m]["median_ms"] / results["runc-v2"][m]["median_ms"], 3)
                  for m in METRICS},
        "ratios": {n: {m: round(results[n][m]["median_ms"] / results["runc-v2"][m]["median_ms"], 3) for m in METRICS}
                   for n in results if n != "runc-v2"},
        "samples_ms": {name: {m: [round(x * 1000, 1) for x in v] for m, v in vals.items()}
                       for name, vals in samples.items()},
        "command": "bench/checkpoint_bench.py " + " ".join(argv if argv is not None else sys.argv[1:]),
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
