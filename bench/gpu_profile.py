"""Stage profile of checkpoint and restore of big GPU containers, side by side with the bare driver +
CRIU sequence in the same run (issue 15). GPU machine only; run by pytest as a harness:

    . tests/gpu/device-setup.sh && KYB_GPU_OUT=$OUT python3 -m pytest -q -s bench/gpu_profile.py

Sizes: KYB_PROFILE_GIB (default "2,8"), repeats per size KYB_PROFILE_REPEATS (default 1). Images in
/dev/shm. KYB_CRIU_ALT names a second CRIU binary (a patched one, as an experiment): the bare
sequence then runs with it as well, and both are reported.

For each size:
- ours: `kybernate checkpoint --exit` equivalent (Tasks.Checkpoint, CheckpointOptions exit +
  image_path), then `ctr run` with kybernate.io/restore-from; the shim's stage profile of each
  (the checkpoint's from its completion record, the restore's from its log line) and CRIU's own
  split (stats files, log clock); the restored workload must continue its count with every VRAM
  byte right (a fresh start or a lost byte fails the run: a fast wrong restore is not a result).
- bare: the same workload outside containerd: driver lock+checkpoint, `criu dump`, `criu restore -d`,
  driver restore+unlock, each timed, with CRIU's split; plus the VMA flags of the checkpointed
  process's large private mappings (where the VRAM copy sits: do they ask for huge pages?).
Writes gpu_profile.json and gpu_profile.md to KYB_GPU_OUT. Asserts only correctness.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from criu.stats import summary  # noqa: E402
from tests.gpu.test_gpu_containers import (GiB, MiB, RESTORE_ANNOTATION, SCRATCH, SKIP, GpuContainer,  # noqa: E402,F401
                                           Tick, assert_running_intact, env, grpc_checkpoint, parse_tick,
                                           results, ticks, timed, wait_for)

pytestmark = pytest.mark.skipif(SKIP is not None, reason=SKIP or "")

OUT = os.environ.get("KYB_GPU_OUT")
SIZES = [int(x) for x in os.environ.get("KYB_PROFILE_GIB", "2,8").split(",") if x.strip()]
REPEATS = int(os.environ.get("KYB_PROFILE_REPEATS", "1"))
REPORT: dict = {"sizes_gib": SIZES, "repeats": REPEATS, "runs": []}
_STAGE = re.compile(r"([\w.+]+)=([\d.]+)s")


def _save() -> None:
    if OUT:
        Path(OUT).mkdir(parents=True, exist_ok=True)
        (Path(OUT) / "gpu_profile.json").write_text(json.dumps(REPORT, indent=1, default=str))
        (Path(OUT) / "gpu_profile.md").write_text(render(REPORT))


def profile_from_log(cd, cid: str, operation: str) -> dict:
    """The shim's 'container CID: <operation> profile: ...' line, parsed: stages and CRIU numbers."""
    found = None
    mark = f"container {cid}: {operation} profile:"
    for line in cd.log_text().splitlines():
        if mark in line:
            found = line
    if found is None:
        return {}
    text = found.replace('\\"', '"')
    head, _, criu = text.partition(" | criu: ")
    head = head.split(f"{operation} profile:", 1)[1]
    stages = [{"stage": n, "seconds": float(s)} for n, s in _STAGE.findall(head)]
    total = next((s["seconds"] for s in stages if s["stage"] == "total"), None)
    criu_numbers = {}
    m = re.match(r"(\{.*?\})", criu)
    if m:
        with contextlib.suppress(ValueError):
            criu_numbers = json.loads(m[1])
    return {"total_s": total, "stages": [s for s in stages if s["stage"] != "total"], "criu": criu_numbers}


def ours(env, nbytes: int, n: int, where: Path = SCRATCH) -> dict:
    label = f"{nbytes // GiB}g{n}"
    c = GpuContainer(env, f"prof-{label}", nbytes).start()
    before = ticks(c)
    images = where / f"kyb-prof-{label}"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    out: dict = {"kind": "ours", "gib": nbytes // GiB}
    try:
        out["checkpoint_s"] = grpc_checkpoint(env, c.id, images, exit=True)
        out["checkpoint_profile"] = profile_from_log(env.cd, c.id, "checkpoint")
        out["image_bytes"] = sum(f.stat().st_size for f in images.rglob("*") if f.is_file())
        c.remove()
        r = GpuContainer(env, f"prof-{label}-r", nbytes)
        _, out["restore_s"] = timed(r.ctr, *r.run_args({RESTORE_ANNOTATION: str(images)}), timeout=300)
        env.containers.append(r)
        first = r.wait_tick(0, timeout=60)
        assert first.n > before[0], f"restored workload started afresh (tick {first.n}, was {before[0]})"
        assert_running_intact(r, {0: first.n}, "restored", nbytes // MiB)
        out["restore_profile"] = profile_from_log(env.cd, r.id, "restore")
        r.remove()
    finally:
        shutil.rmtree(images, ignore_errors=True)
    return out


def big_vma_flags(pid: int, min_bytes: int = 64 * MiB) -> dict:
    """Private mappings of at least min_bytes: how many, how many bytes, which VmFlags (hg: asks for
    huge pages), AnonHugePages."""
    vmas, cur = [], None
    with contextlib.suppress(OSError):
        for line in Path(f"/proc/{pid}/smaps").read_text().splitlines():
            head = line.split()
            if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = {"bytes": hi - lo, "perms": head[1], "path": head[5] if len(head) > 5 else ""}
                vmas.append(cur)
            elif cur is not None and head and head[0] == "VmFlags:":
                cur["flags"] = " ".join(head[1:])
            elif cur is not None and head and head[0] == "AnonHugePages:":
                cur["anon_huge_kib"] = int(head[1])
    big = [v for v in vmas if v["bytes"] >= min_bytes]
    return {"count": len(big), "bytes": sum(v["bytes"] for v in big),
            "flags": sorted({v.get("flags", "") for v in big}),
            "with_hg": sum(1 for v in big if " hg" in " " + v.get("flags", "")),
            "anon_huge_kib": sum(v.get("anon_huge_kib", 0) for v in big),
            "paths": sorted({v["path"] for v in big})[:5]}


def bare(env, nbytes: int, criu: str, label: str, where: Path = SCRATCH) -> dict:
    images = where / f"kyb-bare-{label}"
    shutil.rmtree(images, ignore_errors=True)
    images.mkdir(parents=True)
    status = SCRATCH / f"kyb-bare-status-{label}"
    status.unlink(missing_ok=True)
    run_env = dict(os.environ, LD_LIBRARY_PATH=os.path.dirname(env.libcuda))
    with open(env.workdir / f"bare-{label}.log", "w") as log:
        proc = subprocess.Popen([env.workload, str(nbytes), str(status)], stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=run_env)
    pid = proc.pid
    out: dict = {"kind": "bare", "gib": nbytes // GiB, "criu": criu}
    try:
        wait_for(lambda: (parse_tick(status.read_text() if status.exists() else "") or Tick(0, 0, 0)).n > 2,
                 60, what="bare workload ticking")
        before = parse_tick(status.read_text())
        _, out["suspend_s"] = timed(env.driver.suspend, pid, 10_000)
        out["vmas_after_suspend"] = big_vma_flags(pid)
        dump, out["criu_dump_s"] = timed(subprocess.run, [criu, "dump", "-t", str(pid), "-D", str(images),
                                                          "-o", "dump.log", "-v4"], capture_output=True,
                                         text=True, timeout=300)
        assert dump.returncode == 0, (images / "dump.log").read_text()[-2000:]
        out["criu_dump"] = summary("dump", images, images / "dump.log")
        proc.wait(10)
        restore, out["criu_restore_s"] = timed(subprocess.run, [criu, "restore", "-D", str(images), "-d",
                                                                "-o", "restore.log", "-v4"],
                                               capture_output=True, text=True, timeout=300)
        assert restore.returncode == 0, (images / "restore.log").read_text()[-2000:]
        out["criu_restore"] = summary("restore", images, images / "restore.log")
        _, out["resume_s"] = timed(env.driver.resume, pid)
        after = wait_for(lambda: (lambda t: t if t and t.n > before.n + 1 else None)(parse_tick(status.read_text())),
                         30, what="restored bare workload ticking")
        assert after.bad == 0 and after.err == 0, after
        out["checkpoint_s"] = round(out["suspend_s"] + out["criu_dump_s"], 4)
        out["restore_s"] = round(out["criu_restore_s"] + out["resume_s"], 4)
        out["image_bytes"] = sum(f.stat().st_size for f in images.iterdir() if f.is_file())
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        with contextlib.suppress(Exception):
            proc.wait(5)
        shutil.rmtree(images, ignore_errors=True)
        status.unlink(missing_ok=True)
    return out


THP = Path("/sys/kernel/mm/transparent_hugepage/enabled")


@contextlib.contextmanager
def variant(name: str):
    """Where the images go and how memory is set up, for one experiment: "shm" (images in /dev/shm,
    the node as it is), "hugetmpfs" (images on a tmpfs mounted huge=always), "thp" (transparent huge
    pages set to always for the run; put back after)."""
    if name == "shm":
        yield SCRATCH
    elif name == "hugetmpfs":
        where = SCRATCH / "kyb-huge"
        where.mkdir(exist_ok=True)
        subprocess.run(["mount", "-t", "tmpfs", "-o", "huge=always,mode=0700", "kyb-huge", str(where)], check=True)
        try:
            yield where
        finally:
            subprocess.run(["umount", "-l", str(where)], check=False)
            with contextlib.suppress(OSError):
                where.rmdir()
    elif name == "thp":
        before = re.search(r"\[(\w+)\]", _read(str(THP)))
        THP.write_text("always")
        try:
            yield SCRATCH
        finally:
            THP.write_text(before[1] if before else "madvise")
    else:
        raise ValueError(f"unknown variant {name}")


def _label(criu: str) -> str:
    """Which CRIU a bare run used, as the device script named it (KYB_CRIU_LABELS: path=label;...)."""
    labels = dict(item.split("=", 1) for item in os.environ.get("KYB_CRIU_LABELS", "").split(";") if "=" in item)
    return labels.get(criu, criu)


def test_profile(env):
    if not env.workload or not os.access(env.workload, os.X_OK):
        pytest.skip("no bare workload binary ($KYB_GPU_WORKLOAD)")
    alt = os.environ.get("KYB_CRIU_ALT", "")
    REPORT["setup"] = {"criu": _label(env.criu), "criu_alt": _label(alt) if alt else "",
                       "scratch": str(SCRATCH), "thp": _read(str(THP)),
                       "thp_defrag": _read("/sys/kernel/mm/transparent_hugepage/defrag"),
                       "cpus": os.cpu_count(), "kernel": os.uname().release}
    extra = [x.partition(":") for x in os.environ.get("KYB_PROFILE_EXTRA", "").split(",") if x]
    plan = [("shm", g) for g in SIZES] + [(v, int(g)) for v, _, g in extra]
    for name, gib in plan:
        nbytes = gib * GiB
        for n in range(REPEATS):
            with variant(name) as where:
                tag = f"{gib}g{n}-{name}"
                runs = [lambda: ours(env, nbytes, n, where), lambda: bare(env, nbytes, env.criu, tag, where)]
                if alt:
                    runs.append(lambda: bare(env, nbytes, alt, tag + "-alt", where))
                for run in runs:
                    t0 = time.perf_counter()
                    try:
                        result = run()
                    except Exception as exc:
                        REPORT["runs"].append({"error": f"{type(exc).__name__}: {exc}"[:2000], "variant": name,
                                               "gib": gib, "seconds": round(time.perf_counter() - t0, 2)})
                        _save()
                        raise
                    result["variant"] = name
                    if result["kind"] == "bare":
                        result["criu_label"] = _label(result["criu"])
                    REPORT["runs"].append(result)
                    _save()


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


def _stages(profile) -> str:
    if not profile:
        return "-"
    return ", ".join(f"{s['stage']} {s['seconds']:.2f}" for s in profile.get("stages", []))


def _criu(numbers) -> str:
    if not numbers:
        return "-"
    keys = ("criu_s", "freezing_s", "frozen_s", "memdump_s", "memwrite_s", "forking_s", "restore_s", "page_read_s")
    parts = [f"{k[:-2]} {numbers[k]:.2f}" for k in keys if k in numbers]
    if numbers.get("page_bytes"):
        parts.append(f"{numbers['page_bytes'] / 1e9:.2f} GB")
        span = numbers.get("page_read_s") or numbers.get("memwrite_s")
        if span:
            parts.append(f"{numbers['page_bytes'] / 1e9 / span:.2f} GB/s")
    return ", ".join(parts)


def render(report: dict) -> str:
    lines = ["# Stage profile: big GPU containers, ours and the bare driver + CRIU sequence (bench/gpu_profile.py)",
             "", f"setup: `{json.dumps(report.get('setup', {}))}`", "",
             "| run | GiB | checkpoint s | restore s | stages (s) | CRIU (s) |", "| --- | --- | --- | --- | --- | --- |"]
    for r in report["runs"]:
        v = f" [{r.get('variant', 'shm')}]"
        if "error" in r:
            lines.append(f"| error{v} | {r.get('gib')} | | | {r['error'][:300]} | |")
        elif r["kind"] == "ours":
            cp, rp = r.get("checkpoint_profile") or {}, r.get("restore_profile") or {}
            lines.append(f"| ours checkpoint{v} | {r['gib']} | {r['checkpoint_s']} | | {_stages(cp)} | {_criu(cp.get('criu'))} |")
            lines.append(f"| ours restore{v} | {r['gib']} | | {r['restore_s']} | {_stages(rp)} | {_criu(rp.get('criu'))} |")
        else:
            name = f"bare, {r.get('criu_label', r['criu'])}{v}"
            lines.append(f"| {name} | {r['gib']} | {r['checkpoint_s']} | {r['restore_s']} | suspend {r['suspend_s']:.2f}, "
                         f"dump {r['criu_dump_s']:.2f}, restore {r['criu_restore_s']:.2f}, resume {r['resume_s']:.2f} | "
                         f"dump: {_criu(r.get('criu_dump'))}; restore: {_criu(r.get('criu_restore'))} |")
    vmas = [r.get("vmas_after_suspend") for r in report["runs"] if r.get("vmas_after_suspend")]
    if vmas:
        lines += ["", f"Large private mappings of a checkpointed CUDA process: `{json.dumps(vmas[0])}`"]
    return "\n".join(lines) + "\n"
