#!/usr/bin/env python3
"""Our shim next to containerd's runc shim, in one run, on the same private containerd (1.6 by default).

Measures, alternating the two runtimes sample by sample so that drift hits both alike:
- ``ctr run --rm IMAGE ID true`` wall time (median of --runs, 30 by default); for kybernate also the
  cold case (no warm template: the daemon is exec'd and imports everything), a few samples;
- the ``start`` subcommand alone, run as containerd runs it (bundle as cwd, flags, env), until it
  printed the address; the daemon it started is then shut down over ttrpc (Shutdown);
- ``ctr task exec ID true`` wall time on a running container;
- shim memory per container: VmRSS and PSS of each shim process with --containers containers running
  per runtime (and, for kybernate, the warm template once).
Writes shim_bench.json and shim_bench.md into --out (bench/results/ by default).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.harness import (BUSYBOX_REF, KYBERNATE_RUNTIME, RUNC_RUNTIME, SHIM_BINARY,  # noqa: E402
                                       Containerd)

RUNTIMES = (RUNC_RUNTIME, KYBERNATE_RUNTIME)
SHORT = {RUNC_RUNTIME: "runc-v2", KYBERNATE_RUNTIME: "kybernate"}


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    q = lambda p: s[min(len(s) - 1, max(0, round(p * (len(s) - 1))))]  # noqa: E731
    return {"n": len(s), "median_ms": round(statistics.median(s) * 1000, 1), "p10_ms": round(q(0.1) * 1000, 1),
            "p90_ms": round(q(0.9) * 1000, 1), "mean_ms": round(statistics.fmean(s) * 1000, 1),
            "min_ms": round(s[0] * 1000, 1), "max_ms": round(s[-1] * 1000, 1)}


def timed_ctr(cd: Containerd, *args) -> float:
    t0 = time.perf_counter()
    cd.ctr(*args, timeout=120)
    return time.perf_counter() - t0


def kill_templates(cd: Containerd) -> None:
    for pid in cd.shim_pids():
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                if f.read().split(b"\0")[-2:-1] == [b"warm"]:
                    os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
    time.sleep(0.2)


def bench_run_rm(cd: Containerd, runs: int, cold_runs: int) -> dict:
    out: dict = {rt: [] for rt in RUNTIMES}
    for rt in RUNTIMES:  # warm-up: image unpacked, page cache, the template for kybernate
        for _ in range(2):
            timed_ctr(cd, "run", "--rm", "--runtime", rt, BUSYBOX_REF, f"warm-{secrets.token_hex(3)}", "true")
    for i in range(runs):
        order = RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]
        for rt in order:
            out[rt].append(timed_ctr(cd, "run", "--rm", "--runtime", rt, BUSYBOX_REF, f"rm{i}-{SHORT[rt]}", "true"))
    cold = []
    for i in range(cold_runs):
        kill_templates(cd)
        cold.append(timed_ctr(cd, "run", "--rm", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, f"cold{i}", "true"))
    # let a template come up again for what follows
    timed_ctr(cd, "run", "--rm", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, "rewarm", "true")
    time.sleep(1.5)
    return {"runc-v2": stats(out[RUNC_RUNTIME]), "kybernate": stats(out[KYBERNATE_RUNTIME]),
            "kybernate_cold": stats(cold) if cold else None,
            "ratio_median": round(statistics.median(out[KYBERNATE_RUNTIME]) / statistics.median(out[RUNC_RUNTIME]), 2)}


def shim_binary(cd: Containerd, rt: str) -> str:
    if rt == KYBERNATE_RUNTIME:
        return str(SHIM_BINARY)
    return str(cd.install.bin_dir / "containerd-shim-runc-v2")


def bench_start(cd: Containerd, runs: int) -> dict:
    """`start` as containerd runs it, then Shutdown of the daemon it made."""
    from google.protobuf import empty_pb2

    from proto.containerd.task.v2 import shim_pb2 as api
    from ttrpc import BlockingClient, TTRPCError

    work = Path(tempfile.mkdtemp(prefix="kyb-startbench-", dir="/run"))
    spec = {"ociVersion": "1.0.2", "process": {"args": ["true"], "cwd": "/"}, "root": {"path": "rootfs"},
            "annotations": {}}
    samples: dict = {"runc-v2": [], "kybernate": [], "kybernate_cold": [], "runc-v2 -v": [], "kybernate -v": []}
    variants = [("runc-v2", RUNC_RUNTIME, {}), ("kybernate", KYBERNATE_RUNTIME, {}),
                ("kybernate_cold", KYBERNATE_RUNTIME, {"KYBERNATE_WARM": "0"})]
    try:
        for i in range(runs):
            # the floor: the binary starting and exiting (`-v`), interpreter start-up included
            for name, rt in (("runc-v2 -v", RUNC_RUNTIME), ("kybernate -v", KYBERNATE_RUNTIME)):
                t0 = time.perf_counter()
                subprocess.run([shim_binary(cd, rt), "-v"], env=cd.env, stdout=subprocess.DEVNULL, check=True)
                samples[name].append(time.perf_counter() - t0)
            for name, rt, extra_env in variants:
                cid = f"st{i}-{name}"
                bundle = work / cid
                bundle.mkdir()
                (bundle / "config.json").write_text(json.dumps(spec))
                env = dict(cd.env, TTRPC_ADDRESS=cd.ttrpc_address, GRPC_ADDRESS=cd.address, NAMESPACE=cd.namespace,
                           MAX_SHIM_VERSION="2", GOMAXPROCS="2", **extra_env)
                argv = [shim_binary(cd, rt), "-namespace", cd.namespace, "-address", cd.address,
                        "-publish-binary", str(cd.install.containerd), "-id", cid, "start"]
                t0 = time.perf_counter()
                r = subprocess.run(argv, cwd=bundle, env=env, capture_output=True, text=True, timeout=60,
                                   stdin=subprocess.DEVNULL)
                samples[name].append(time.perf_counter() - t0)
                if r.returncode != 0:
                    raise RuntimeError(f"{name} start failed: {r.stderr}")
                address = r.stdout.strip()
                if address.startswith("{"):
                    address = json.loads(address)["address"]
                for service in ("containerd.task.v2.Task", "containerd.task.v3.Task"):
                    try:
                        with BlockingClient(address, timeout=10) as client:
                            client.call(service, "Shutdown", api.ShutdownRequest(id=cid), empty_pb2.Empty, timeout=10)
                        break
                    except (TTRPCError, OSError):
                        continue
                time.sleep(0.05)
    finally:
        subprocess.run(["rm", "-rf", str(work)])
    return {k: stats(v) for k, v in samples.items()}


def bench_exec(cd: Containerd, runs: int) -> dict:
    ids = {rt: f"exec-{SHORT[rt]}-{secrets.token_hex(2)}" for rt in RUNTIMES}
    out: dict = {rt: [] for rt in RUNTIMES}
    try:
        for rt, cid in ids.items():
            cd.ctr("run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "100000")
            cd.ctr("tasks", "exec", "--exec-id", "warm", cid, "true")
        for i in range(runs):
            order = RUNTIMES if i % 2 == 0 else RUNTIMES[::-1]
            for rt in order:
                out[rt].append(timed_ctr(cd, "tasks", "exec", "--exec-id", f"x{i}", ids[rt], "true"))
    finally:
        for cid in ids.values():
            cd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            time.sleep(0.2)
            cd.ctr("tasks", "delete", "-f", cid, check=False)
            cd.ctr("containers", "delete", cid, check=False)
    return {"runc-v2": stats(out[RUNC_RUNTIME]), "kybernate": stats(out[KYBERNATE_RUNTIME]),
            "ratio_median": round(statistics.median(out[KYBERNATE_RUNTIME]) / statistics.median(out[RUNC_RUNTIME]), 2)}


def memory_of(pid: int) -> tuple[int, int]:
    rss = pss = 0
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                rss = int(line.split()[1])
    try:
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss:"):
                    pss = int(line.split()[1])
    except OSError:
        pass
    return rss, pss


def bench_memory(cd: Containerd, containers: int) -> dict:
    ids = {rt: [f"mem{i}-{SHORT[rt]}-{secrets.token_hex(2)}" for i in range(containers)] for rt in RUNTIMES}
    result: dict = {}
    try:
        for rt in RUNTIMES:
            for cid in ids[rt]:
                cd.ctr("run", "-d", "--runtime", rt, BUSYBOX_REF, cid, "sleep", "100000")
        time.sleep(2)
        shims = {}
        for pid in cd.shim_pids():
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                args = [a.decode() for a in f.read().split(b"\0") if a]
            if "warm" in args[-1:]:
                shims[pid] = ("template", args)
                continue
            cid = args[args.index("-id") + 1] if "-id" in args else ""
            for rt in RUNTIMES:
                if cid in ids[rt]:
                    shims[pid] = (rt, args)
        for rt in RUNTIMES:
            mem = [memory_of(pid) for pid, (kind, _) in shims.items() if kind == rt]
            result[SHORT[rt]] = {
                "shims": len(mem),
                "rss_kib_mean": round(statistics.fmean(m[0] for m in mem)) if mem else None,
                "rss_kib_max": max(m[0] for m in mem) if mem else None,
                "pss_kib_mean": round(statistics.fmean(m[1] for m in mem)) if mem else None,
            }
        tmpl = [memory_of(pid) for pid, (kind, _) in shims.items() if kind == "template"]
        result["kybernate_template"] = {"processes": len(tmpl), "rss_kib": tmpl[0][0] if tmpl else None,
                                        "pss_kib": tmpl[0][1] if tmpl else None}
    finally:
        for rt in RUNTIMES:
            for cid in ids[rt]:
                cd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
            time.sleep(0.5)
            for cid in ids[rt]:
                cd.ctr("tasks", "delete", "-f", cid, check=False)
                cd.ctr("containers", "delete", cid, check=False)
    return result


def markdown(res: dict) -> str:
    r = res["run_rm"]
    s = res["start"]
    e = res["exec"]
    m = res["memory"]
    lines = [
        f"# Shim benchmark: kybernate vs runc-v2 (containerd {res['containerd']})",
        "",
        f"{res['when']}, {res['machine']}, load average at start {res['loadavg']}. Samples alternate the two "
        "runtimes; times are wall clock of the whole command.",
        "",
        "| measure | runc-v2 median (p10-p90) | kybernate median (p10-p90) | ratio |",
        "| --- | --- | --- | --- |",
        f"| `ctr run --rm ... true` (n={r['runc-v2']['n']}) | {r['runc-v2']['median_ms']} ms "
        f"({r['runc-v2']['p10_ms']}-{r['runc-v2']['p90_ms']}) | {r['kybernate']['median_ms']} ms "
        f"({r['kybernate']['p10_ms']}-{r['kybernate']['p90_ms']}) | {r['ratio_median']}x |",
    ]
    if r.get("kybernate_cold"):
        c = r["kybernate_cold"]
        lines.append(f"| same, kybernate cold (no warm template, n={c['n']}) | | {c['median_ms']} ms "
                     f"({c['p10_ms']}-{c['p90_ms']}) | {round(c['median_ms'] / r['runc-v2']['median_ms'], 2)}x |")
    lines += [
        f"| `start` subcommand (n={s['runc-v2']['n']}) | {s['runc-v2']['median_ms']} ms | "
        f"{s['kybernate']['median_ms']} ms (cold: {s['kybernate_cold']['median_ms']} ms) | "
        f"{round(s['kybernate']['median_ms'] / s['runc-v2']['median_ms'], 2)}x |",
        f"| binary start-up floor (`-v`) | {s['runc-v2 -v']['median_ms']} ms | {s['kybernate -v']['median_ms']} ms | "
        f"{round(s['kybernate -v']['median_ms'] / s['runc-v2 -v']['median_ms'], 1)}x |",
        f"| `ctr task exec ... true` (n={e['runc-v2']['n']}) | {e['runc-v2']['median_ms']} ms | "
        f"{e['kybernate']['median_ms']} ms | {e['ratio_median']}x |",
        "",
        f"Shim memory with {res['containers']} containers per runtime (one shim each):",
        "",
        "| shim | RSS mean (max) | PSS mean |",
        "| --- | --- | --- |",
        f"| runc-v2 | {m['runc-v2']['rss_kib_mean']} KiB ({m['runc-v2']['rss_kib_max']}) | {m['runc-v2']['pss_kib_mean']} KiB |",
        f"| kybernate | {m['kybernate']['rss_kib_mean']} KiB ({m['kybernate']['rss_kib_max']}) | {m['kybernate']['pss_kib_mean']} KiB |",
        f"| kybernate warm template (one per containerd) | {m['kybernate_template']['rss_kib']} KiB | "
        f"{m['kybernate_template']['pss_kib']} KiB |",
        "",
        "Kybernate's daemons are forked from a warm template that has the daemon's modules imported "
        "(shim/warm.py); the cold row is the first container after boot or with KYBERNATE_WARM=0. "
        "Forked daemons share the template's pages, so their PSS is well below their RSS.",
        "",
        "containerd runs the shim binary twice per container (`start`, and `delete` after the shim exits, "
        "which containerd waits for), so the binary's start-up floor counts twice in `ctr run --rm`. Most "
        "of that floor is the Python interpreter itself. The binary is therefore a plain script "
        "(bin/containerd-shim-kybernate-v1, no console-script wrapper importing `re`) and scripts/setup.sh "
        "installs the package in setuptools' compat editable mode (a .pth entry, no import-hook finder).",
        "",
    ]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--version", default="1.6")
    ap.add_argument("--runs", type=int, default=30)
    ap.add_argument("--cold-runs", type=int, default=5)
    ap.add_argument("--start-runs", type=int, default=15)
    ap.add_argument("--exec-runs", type=int, default=30)
    ap.add_argument("--containers", type=int, default=10)
    ap.add_argument("--out", default=str(REPO / "bench" / "results"))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    res: dict = {"containerd": args.version, "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                 "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, kernel {platform.release()}",
                 "loadavg": os.getloadavg()[0], "containers": args.containers}
    with tempfile.TemporaryDirectory(prefix="kyb-bench-") as tmp:
        cd = Containerd(args.version, tmp, keep_log=False)
        cd.start()
        try:
            cd.import_busybox()
            res["run_rm"] = bench_run_rm(cd, args.runs, args.cold_runs)
            print("run --rm", json.dumps(res["run_rm"]), flush=True)
            res["start"] = bench_start(cd, args.start_runs)
            print("start", json.dumps(res["start"]), flush=True)
            res["exec"] = bench_exec(cd, args.exec_runs)
            print("exec", json.dumps(res["exec"]), flush=True)
            res["memory"] = bench_memory(cd, args.containers)
            print("memory", json.dumps(res["memory"]), flush=True)
        finally:
            cd.stop()
    (out / "shim_bench.json").write_text(json.dumps(res, indent=2) + "\n")
    (out / "shim_bench.md").write_text(markdown(res))
    print(markdown(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
