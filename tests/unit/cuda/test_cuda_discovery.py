"""Discovery: cgroup membership (v1, v2), the driver's answer per pid, /proc evidence beside it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from cuda_bindings import ProcessState, cgroup_dir_of, cgroup_pids, discover, discover_cgroup
from cuda_bindings import procfs

R, L, C = 0, 1, 2


def _cgroup(path: Path, pids) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "cgroup.procs").write_text("".join(f"{p}\n" for p in pids))
    return path


def test_cgroup_pids_recursive(tmp_path):
    root = _cgroup(tmp_path / "ctr", [10, 11])
    _cgroup(root / "child", [12])
    _cgroup(root / "child" / "grand", [13, 10])
    assert cgroup_pids(root) == [10, 11, 12, 13]
    assert cgroup_pids(root, recursive=False) == [10, 11]
    with pytest.raises(FileNotFoundError):
        cgroup_pids(tmp_path / "nope")


def _proc_cgroup(proc: Path, pid: int, text: str) -> None:
    (proc / str(pid)).mkdir(parents=True)
    (proc / str(pid) / "cgroup").write_text(text)


def test_cgroup_dir_of_v2(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    (root / "cgroup.controllers").write_text("cpu memory pids\n")
    _proc_cgroup(tmp_path / "proc", 7, "0::/kubepods/pod1/abc\n")
    assert cgroup_dir_of(7, root, tmp_path / "proc") == root / "kubepods/pod1/abc"


def test_cgroup_dir_of_v1_prefers_memory_then_pids(tmp_path):
    root = tmp_path / "cg"
    root.mkdir()
    _proc_cgroup(tmp_path / "proc", 7, "9:pids:/docker/p\n4:memory:/docker/m\n0::/\n")
    _proc_cgroup(tmp_path / "proc", 8, "9:pids:/docker/p\n3:cpu,cpuacct:/docker/c\n")
    _proc_cgroup(tmp_path / "proc", 9, "3:cpu,cpuacct:/docker/c\n")
    assert cgroup_dir_of(7, root, tmp_path / "proc") == root / "memory/docker/m"
    assert cgroup_dir_of(8, root, tmp_path / "proc") == root / "pids/docker/p"
    with pytest.raises(FileNotFoundError):
        cgroup_dir_of(9, root, tmp_path / "proc")


def test_cgroup_of_this_process_lists_it():
    try:
        directory = cgroup_dir_of(os.getpid())
        pids = cgroup_pids(directory, recursive=False)
    except (OSError, ValueError) as exc:
        pytest.skip(f"this host's cgroup is not readable here: {exc}")
    assert os.getpid() in pids


@pytest.fixture
def device_node(tmp_path) -> tuple[Path, str]:
    """A file standing in for /dev/nvidia0, and the prefix that makes it count as one."""
    dev = tmp_path / "dev"
    dev.mkdir()
    (dev / "nvidia0").write_text("")
    return dev / "nvidia0", str(dev / "nvidia")


def test_evidence_of_a_cuda_like_process(fake, procs, device_node):
    node, prefix = device_node
    pid = procs.cuda_like(fake.path, node)
    ev = procfs.evidence(pid, prefix=prefix)
    assert ev.readable and ev.maps_libcuda and ev.nvidia_fds == 1
    plain = procfs.evidence(procs.sleeper(), prefix=prefix)
    assert plain.readable and not plain.maps_libcuda and plain.nvidia_fds == 0


def test_discover_reports_driver_state_and_cross_check(fake, procs, device_node):
    node, prefix = device_node
    running = procs.cuda_like(fake.path, node)
    checkpointed = procs.cuda_like(fake.path, None)  # maps libcuda, no device open
    liar = procs.cuda_like(fake.path, node)  # the driver says checkpointed, yet a device is open
    plain = procs.sleeper()
    fake.set_states({running: R, checkpointed: C, liar: C})
    found = discover([plain, running, checkpointed, liar, running], fake.driver(),
                     device_prefix=prefix)
    by_pid = {p.pid: p for p in found}
    assert set(by_pid) == {running, checkpointed, liar}  # plain neither holds CUDA nor maps it
    assert by_pid[running].state is ProcessState.RUNNING and by_pid[running].evidence_agrees
    assert by_pid[checkpointed].state is ProcessState.CHECKPOINTED
    assert by_pid[checkpointed].evidence_agrees
    assert not by_pid[liar].evidence_agrees
    assert by_pid[running].name == "python" or by_pid[running].name.startswith("python")


def test_discover_all_includes_non_cuda_with_drivers_answer(fake, procs, dead_pid):
    plain = procs.sleeper()
    fake.script("noproc 3")
    found = discover([plain, dead_pid], fake.driver(), include_all=True)
    assert [p.pid for p in found] == [plain]  # the dead pid is simply gone
    assert found[0].state is None and found[0].driver_answer == "CUDA_ERROR_NOT_INITIALIZED"
    assert not found[0].holds_cuda and found[0].evidence_agrees


def test_discover_keeps_going_past_an_odd_driver_error(fake, procs):
    odd, good = procs.cuda_like(fake.path, None), procs.sleeper()
    fake.set_states({good: L})
    fake.script(f"fail state {odd} 304")
    found = {p.pid: p for p in discover([odd, good], fake.driver())}
    assert found[odd].state is None and found[odd].driver_answer == "CUDA_ERROR_OPERATING_SYSTEM"
    assert found[good].state is ProcessState.LOCKED


def test_discover_cgroup(fake, procs, tmp_path):
    a, b, plain = procs.sleeper(), procs.sleeper(), procs.sleeper()
    fake.set_states({a: R, b: C})
    root = _cgroup(tmp_path / "ctr", [a, plain])
    _cgroup(root / "sub", [b])
    found = discover_cgroup(root, fake.driver())
    assert [(p.pid, p.state) for p in found] == sorted(
        [(a, ProcessState.RUNNING), (b, ProcessState.CHECKPOINTED)])
