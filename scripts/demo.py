"""Kybernate demo driver (scripts/demo.sh): a private containerd runs a busybox counter with our runtime.

    1. start a private containerd (tests/integration/harness.py) and import the busybox image
    2. attached run: a short counter whose output streams back through the shim
    3. detached run: a counter logging to a file; show the task, its output growing, then kill and
       delete it (checkpoint/restore of this counter comes here later)
    4. stop containerd and remove everything it made

--runtime io.containerd.runc.v2 runs the same demo with containerd's own shim, for comparison.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.harness import (BUSYBOX_REF, KYBERNATE_RUNTIME, SHIM_BINARY, VERSIONS,  # noqa: E402
                                       Containerd, CtrError, unavailable_reason)

COUNTER = 'i=0; while true; do i=$((i+1)); echo "count $i at $(date +%T)"; sleep 1; done'


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str, indent: str = "    ") -> None:
    for line in text.rstrip("\n").splitlines():
        print(indent + line, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containerd", choices=VERSIONS, default="1.6", help="containerd version (default 1.6)")
    ap.add_argument("--runtime", default=KYBERNATE_RUNTIME, help=f"runtime name (default {KYBERNATE_RUNTIME})")
    ap.add_argument("--seconds", type=int, default=4, help="how long to watch the detached counter")
    ap.add_argument("--keep", action="store_true", help="keep containerd's log directory afterwards")
    args = ap.parse_args(argv)

    reason = unavailable_reason(args.containerd)
    if reason:
        print(f"demo: {reason}", file=sys.stderr)
        return 2
    if args.runtime == KYBERNATE_RUNTIME and not os.access(SHIM_BINARY, os.X_OK):
        print(f"demo: {SHIM_BINARY} is missing; run scripts/setup.sh", file=sys.stderr)
        return 2

    workdir = Path(tempfile.mkdtemp(prefix="kybernate-demo-", dir="/var/tmp"))
    cd = Containerd(args.containerd, workdir)
    cid = "kyb-counter"
    rc = 1
    try:
        step(f"containerd {args.containerd}: private instance at {cd.address} (log {cd.log_path})")
        cd.start()
        show(cd.ctr("version").stdout)
        cd.import_busybox()
        show(f"image {BUSYBOX_REF} imported into namespace {cd.namespace}")

        step(f"attached run with --runtime {args.runtime}: three counts")
        r = cd.ctr("run", "--rm", "--runtime", args.runtime, BUSYBOX_REF, f"{cid}-once",
                   "sh", "-c", 'for i in 1 2 3; do echo "count $i"; sleep 0.3; done', timeout=60)
        show(r.stdout)

        step(f"detached counter with --runtime {args.runtime}, output to a log file")
        log = workdir / "counter.log"
        cd.ctr("run", "-d", "--runtime", args.runtime, "--log-uri", f"file://{log}", BUSYBOX_REF, cid,
               "sh", "-c", COUNTER)
        show(cd.ctr("tasks", "ls").stdout)
        for _ in range(args.seconds):
            time.sleep(1)
            lines = log.read_text().splitlines() if log.exists() else []
            show(f"{len(lines)} lines, last: {lines[-1] if lines else '(none yet)'}")
        # (checkpoint / restore of the running counter will be demonstrated here)

        step("kill and delete the counter")
        cd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
        for _ in range(50):
            if " STOPPED" in cd.ctr("tasks", "ls").stdout or cid not in cd.ctr("tasks", "ls").stdout:
                break
            time.sleep(0.1)
        cd.ctr("tasks", "delete", cid)
        cd.ctr("containers", "delete", cid)
        show(cd.ctr("tasks", "ls").stdout)
        rc = 0
    except CtrError as e:
        print(f"\ndemo: FAILED: {e}", file=sys.stderr)
        print(f"--- containerd log (tail) ---\n{cd.log_tail(40)}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - a demo reports any failure and still cleans up
        print(f"\ndemo: FAILED: {type(e).__name__}: {e}", file=sys.stderr)
        print(f"--- containerd log (tail) ---\n{cd.log_tail(40)}", file=sys.stderr)
    finally:
        step("stop containerd and clean up")
        cd.stop()
        left = cd.leftovers()
        show("nothing left behind" if not left else f"left behind: {left}")
        if args.keep or rc:
            show(f"containerd log kept in {cd.log_path}")
        else:
            for p in workdir.iterdir():
                p.unlink()
            workdir.rmdir()
    return rc


if __name__ == "__main__":
    sys.exit(main())
