"""Kybernate demo driver (scripts/demo.sh): a private containerd runs a busybox counter with our runtime,
checkpoints it, and restores it into a new task that counts on.

    1. start a private containerd (tests/integration/harness.py) and import the busybox image
    2. attached run: a short counter whose output streams back through the shim
    3. detached counter logging to a file, run with the annotation kybernate.io/checkpoint-exit=true
       and a runtime config (CriuImagePath) so that plain `ctr task checkpoint` (which drops --exit and
       --image-path for runtimes other than runc) stops it and puts the CRIU image in a directory
    4. checkpoint: the task stops; show the last value it printed and the image directory
    5. kill and delete what is left of it
    6. restore: `ctr run --annotation kybernate.io/restore-from=DIR`, output to a new log file;
       show the first value the restored counter prints (the one after the last before)
    7. stop containerd and remove everything it made

--runtime io.containerd.runc.v2 runs steps 1-3 and 5 with containerd's own shim, for comparison (ctr
has no restore from a directory for it).
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.integration.harness import (BUSYBOX_REF, KYBERNATE_RUNTIME, SHIM_BINARY, VERSIONS,  # noqa: E402
                                       Containerd, CtrError, unavailable_reason)

COUNTER = 'i=0; while true; do i=$((i+1)); echo "count $i at $(date +%T)"; sleep 0.2; done'


def step(text: str) -> None:
    print(f"\n==> {text}", flush=True)


def show(text: str, indent: str = "    ") -> None:
    for line in text.rstrip("\n").splitlines():
        print(indent + line, flush=True)


def task_status(cd: Containerd, cid: str) -> str | None:
    for line in cd.ctr("tasks", "ls").stdout.splitlines()[1:]:
        fields = line.split()
        if fields and fields[0] == cid:
            return fields[-1]
    return None


def wait_for(pred, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError("timed out waiting")
        time.sleep(0.1)


def counts(log: Path) -> list[int]:
    return [int(line.split()[1]) for line in log.read_text().splitlines() if line.startswith("count ")]


def last_count(log: Path) -> int:
    return counts(log)[-1]


def first_count(log: Path) -> int:
    return counts(log)[0]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--containerd", choices=VERSIONS, default="1.6", help="containerd version (default 1.6)")
    ap.add_argument("--runtime", default=KYBERNATE_RUNTIME, help=f"runtime name (default {KYBERNATE_RUNTIME})")
    ap.add_argument("--seconds", type=int, default=3, help="how long to watch the detached counter")
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

        kyb = args.runtime == KYBERNATE_RUNTIME
        log = workdir / "counter.log"
        images = workdir / "checkpoints"
        extra: list[str] = []
        if kyb:
            runtime_config = workdir / "runtime.toml"
            runtime_config.write_text(f'CriuImagePath = "{images}"\n')
            extra = ["--annotation", "kybernate.io/checkpoint-exit=true",
                     "--runtime-config-path", str(runtime_config)]
        step(f"detached counter with --runtime {args.runtime}, output to {log}")
        cd.ctr("run", "-d", "--runtime", args.runtime, *extra, "--log-uri", f"file://{log}", BUSYBOX_REF, cid,
               "sh", "-c", COUNTER)
        show(cd.ctr("tasks", "ls").stdout)
        deadline = time.monotonic() + args.seconds
        while time.monotonic() < deadline:
            time.sleep(1)
            lines = log.read_text().splitlines() if log.exists() else []
            show(f"{len(lines)} lines, last: {lines[-1] if lines else '(none yet)'}")

        image = None
        if kyb:
            step("checkpoint: ctr task checkpoint (exit and image dir come from the annotation and runtime config)")
            t0 = time.monotonic()
            cd.ctr("tasks", "checkpoint", cid, timeout=120)
            show(f"checkpointed in {time.monotonic() - t0:.2f} s")
            wait_for(lambda: task_status(cd, cid) == "STOPPED")
            show(cd.ctr("tasks", "ls").stdout)
            last_before = last_count(log)
            image = next(images.rglob("inventory.img")).parent
            show(f"image: {image} ({sum(f.stat().st_size for f in image.iterdir()) // 1024} KiB)")
            show(f"last value before the checkpoint: {last_before}")

        step("kill and delete the counter")
        cd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False)
        wait_for(lambda: task_status(cd, cid) in (None, "STOPPED"))
        cd.ctr("tasks", "delete", cid)
        cd.ctr("containers", "delete", cid)
        show(cd.ctr("tasks", "ls").stdout)

        if image is not None:
            step(f"restore from {image} into a new task (annotation kybernate.io/restore-from)")
            log2 = workdir / "restored.log"
            t0 = time.monotonic()
            cd.ctr("run", "-d", "--runtime", args.runtime, "--annotation", f"kybernate.io/restore-from={image}",
                   "--log-uri", f"file://{log2}", BUSYBOX_REF, cid, "sh", "-c", COUNTER)
            show(f"restored in {time.monotonic() - t0:.2f} s")
            show(cd.ctr("tasks", "ls").stdout)
            wait_for(lambda: log2.exists() and log2.read_text().strip())
            time.sleep(1)
            show(log2.read_text())
            first_after = first_count(log2)
            show(f"last value before the checkpoint: {last_before}; first value after the restore: {first_after}")
            if first_after != last_before + 1:
                raise RuntimeError(f"the restored counter did not continue: {last_before} -> {first_after}")
            cd.ctr("tasks", "kill", "-s", "SIGKILL", cid)
            wait_for(lambda: task_status(cd, cid) in (None, "STOPPED"))
            cd.ctr("tasks", "delete", cid)
            cd.ctr("containers", "delete", cid)
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
            shutil.rmtree(workdir, ignore_errors=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
