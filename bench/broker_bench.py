#!/usr/bin/env python3
"""What a parked container costs its first client (CPU side; issue 17), side by side in one run on one
private containerd (1.6 by default):

- ``runc-v2``: an HTTP GET to a busybox httpd run by containerd's runc shim (the baseline);
- ``kybernate resident``: the same to one run by our shim, not parked;
- ``kybernate parked``: the first GET to a container the node broker parked (idle release): the broker
  takes the connection, resumes the container through containerd and relays; then ``after wake``,
  the next GET, straight to the container again;
- ``broker wake``: the broker's own measure of the wake (its /kybernate/broker/wake event's duration_s),
  and ``park``: its pause, both through containerd's Tasks API and our shim.

The GPU readings come from the broker's file stand-in (no GPU here: the VRAM move itself is measured on
the GPU machine, tests/gpu/test_gpu_broker.py). Samples alternate runtimes round by round. Writes
broker_bench.json and broker_bench.md into --out (bench/results/broker/ by default).
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.broker_support import (BrokerProcess, FakeGpu, GiB, broker_config, free_port,  # noqa: E402
                                              http_get, run_server, wait_for)
from tests.integration.harness import BUSYBOX_REF, KYBERNATE_RUNTIME, RUNC_RUNTIME, Containerd  # noqa: E402


def stats(samples: list[float]) -> dict:
    s = sorted(samples)
    return {"n": len(s), "median_ms": round(statistics.median(s) * 1000, 2), "min_ms": round(s[0] * 1000, 2),
            "max_ms": round(s[-1] * 1000, 2)}


def timed_get(port: int) -> float:
    t0 = time.perf_counter()
    status, _ = http_get(port, timeout=60)
    assert status == 200
    return time.perf_counter() - t0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--version", default="1.6")
    p.add_argument("--rounds", type=int, default=15)
    p.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "broker")
    args = p.parse_args()

    work = Path(tempfile.mkdtemp(prefix="kyb-broker-bench-"))
    cd = Containerd(args.version, work / "cd")
    cd.write_node_config(broker=broker_config(cd, work, poll_s=0.1, silent_wake_s=0.5))
    samples: dict[str, list[float]] = {k: [] for k in ("runc-v2", "kybernate resident", "kybernate parked",
                                                          "after wake", "broker wake", "park")}
    events = None
    broker = None
    try:
        cd.start()
        cd.import_busybox()
        gpu = FakeGpu(work / "readings.json")
        ports = {"runc": free_port(), "resident": free_port(), "parked": free_port()}
        script = "mkdir -p /tmp/www && echo hello > /tmp/www/index.html && exec httpd -f -p 127.0.0.1:{} -h /tmp/www"
        cd.ctr("run", "-d", "--null-io", "--net-host", "--runtime", RUNC_RUNTIME, BUSYBOX_REF, "runc",
               "sh", "-c", script.format(ports["runc"]))
        run_server(cd, "resident", ports["resident"])                    # no idle release: never parked
        pid = run_server(cd, "parked", ports["parked"], "kybernate.io/idle-release-after=1s")
        gpu.holds(pid, GiB)
        wait_for(lambda: http_get(ports["runc"], timeout=5)[0] == 200, 10, what="runc httpd")
        events = subprocess.Popen([str(cd.install.ctr), "--address", cd.address, "events"], stdout=subprocess.PIPE,
                                  stderr=subprocess.DEVNULL, text=True, env=cd.env)
        broker = BrokerProcess(cd, gpu.path, work).start()
        for _ in range(args.rounds):
            samples["runc-v2"].append(timed_get(ports["runc"]))
            samples["kybernate resident"].append(timed_get(ports["resident"]))
            broker.wait_phase("parked", "parked", 30)
            time.sleep(0.2)
            samples["kybernate parked"].append(timed_get(ports["parked"]))
            samples["after wake"].append(timed_get(ports["parked"]))
        broker.stop()
        events.terminate()
        out, _ = events.communicate(timeout=10)
        for line in out.splitlines():
            if "/kybernate/broker/" in line and "{" in line:
                facts = json.loads(line[line.index("{"):])["labels"]
                key = "broker wake" if "/kybernate/broker/wake" in line else "park"
                samples[key].append(float(facts["duration_s"]))
    finally:
        if broker is not None:
            broker.stop()
        if events is not None and events.poll() is None:
            events.kill()
        cd.stop()
        __import__("shutil").rmtree(work, ignore_errors=True)
    result = {"host": platform.node(), "cpus": __import__("os").cpu_count(), "containerd": args.version,
              "rounds": args.rounds, "results": {k: stats(v) for k, v in samples.items() if v}}
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "broker_bench.json").write_text(json.dumps(result, indent=1) + "\n")
    lines = [f"# Node broker, CPU side: a parked container's first request (containerd {args.version}, "
             f"{args.rounds} rounds, {result['cpus']} CPUs)", "",
             "| what | median ms | min ms | max ms | n |", "| --- | --- | --- | --- | --- |"]
    for k, v in result["results"].items():
        lines.append(f"| {k} | {v['median_ms']} | {v['min_ms']} | {v['max_ms']} | {v['n']} |")
    (args.out / "broker_bench.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
