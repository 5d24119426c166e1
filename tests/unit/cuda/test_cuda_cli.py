"""`python -m cuda_bindings` as an operator runs it, in a subprocess, against the stand-in."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

R, L, C = 0, 1, 2
REPO = Path(__file__).resolve().parents[3]


def cli(fake, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cuda_bindings", *args], cwd=REPO,
                          env=fake.env(**env), capture_output=True, text=True, timeout=60)


def test_suspend_then_state_then_resume(fake, procs):
    a, b = procs.sleeper(), procs.sleeper()
    fake.set_states({a: R, b: L})
    out = cli(fake, "suspend", str(a), str(b), "--timeout-ms", "777")
    assert out.returncode == 0, out.stderr
    assert f"{a} suspend ok: running -> checkpointed [lock,checkpoint]" in out.stdout
    assert f"{b} suspend ok: locked -> checkpointed [checkpoint]" in out.stdout
    assert [l.detail for l in fake.log("lock")] == ["timeout=777"]
    out = cli(fake, "state", str(a), str(b), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and [p["state"] for p in doc["processes"]] == ["checkpointed"] * 2
    out = cli(fake, "resume", str(a), str(b), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 0 and doc["ok"] and fake.states() == {a: R, b: R}
    assert [o["steps"] for o in doc["outcomes"]] == [["restore", "unlock"]] * 2


def test_primitives_one_by_one(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    for action, state in (("lock", L), ("checkpoint", C), ("restore", L), ("unlock", R)):
        out = cli(fake, action, str(pid))
        assert out.returncode == 0 and f"{pid} {action} ok" in out.stdout, out.stdout + out.stderr
        assert fake.states()[pid] == state


def test_failure_exit_status_and_words(fake, procs):
    pid = procs.sleeper()
    fake.set_states({pid: R})
    out = cli(fake, "unlock", str(pid), "--json")
    doc = json.loads(out.stdout)
    assert out.returncode == 1 and not doc["ok"]
    assert doc["results"][0]["error"]["name"] == "CUDA_ERROR_ILLEGAL_STATE"
    out = cli(fake, "state", str(procs.sleeper()))
    assert out.returncode == 1 and "CUDA_ERROR_NOT_FOUND" in out.stdout


def test_suspend_failure_reports_rollback(fake, procs):
    a, b = procs.sleeper(), procs.sleeper()
    fake.set_states({a: R, b: R})
    fake.script(f"fail checkpoint {b} 999")
    out = cli(fake, "suspend", str(a), str(b))
    assert out.returncode == 1
    assert f"{b} suspend FAILED after [lock]" in out.stdout and "CUDA_ERROR_UNKNOWN" in out.stdout
    assert f"{a} rollback [restore,unlock] back to running" in out.stdout
    assert fake.states() == {a: R, b: R}


def test_missing_and_too_old_driver_exit_2(fake, procs, tmp_path):
    pid = str(procs.sleeper())
    out = cli(fake, "state", pid, "--lib", str(tmp_path / "none.so"))
    assert out.returncode == 2 and "cannot load the CUDA driver library" in out.stderr
    out = cli(fake, "state", pid, "--json", FAKECUDA_VERSION="12040",
              KYBERNATE_LIBCUDA=str(fake.libs.old))
    assert out.returncode == 2 and json.loads(out.stdout)["error"]["type"] == "DriverTooOld"
    assert "needs CUDA driver API 12.8" in out.stderr


def test_devices_and_gpu_map(fake, procs):
    out = cli(fake, "devices", "--json")
    uuids = json.loads(out.stdout)["devices"]
    assert out.returncode == 0 and len(uuids) == 2
    pid = procs.sleeper()
    fake.set_states({pid: C})
    out = cli(fake, "resume", str(pid), "--gpu-map", f"{uuids[0]}={uuids[1]},{uuids[1]}={uuids[0]}")
    assert out.returncode == 0, out.stdout + out.stderr
    assert fake.log("restore")[0].detail.startswith("pairs=2 ")


def test_cgroup_option(fake, procs, tmp_path):
    a = procs.sleeper()
    fake.set_states({a: R})
    cg = tmp_path / "cg"
    cg.mkdir()
    (cg / "cgroup.procs").write_text(f"{a}\n")
    out = cli(fake, "suspend", "--cgroup", str(cg))
    assert out.returncode == 0 and fake.states() == {a: C}


@pytest.mark.parametrize("args", [["state"], ["resume", "1", "--gpu-map", "nonsense"]])
def test_usage_errors(fake, args):
    out = cli(fake, *args)
    assert out.returncode == 2 and "usage:" in out.stderr
