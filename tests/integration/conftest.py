"""Fixtures for integration tests: private containerd instances (harness.py).

- `containerd`: session-scoped, parametrized over containerd 1.6, 1.7 and 2.1 (ids containerd-1.6 ...),
  started with the busybox image imported (BUSYBOX_REF); skipped with the reason when not root or
  the version's binaries are missing. KYB_CONTAINERD_VERSIONS="1.6,2.1" narrows the set.
- `runtime_name`: "io.containerd.runc.v2" and "io.containerd.kybernate.v1" (ids runc, kybernate), for
  side-by-side tests; the kybernate case skips when the shim binary is not installed.
- `container_id`: a unique id for this test; its task and container are removed afterwards.
- `containerd_factory`: `factory(version) -> Containerd` started in this test's tmp dir and stopped
  (and checked for leftovers) at its end, for tests that restart or break containerd.
Every test under tests/integration is marked `integration`. A failing test that used `containerd`
gets the tail of containerd's debug log in its report. A test's `record_property("timings", line)`
lines are shown in the terminal summary (pass or fail, without -s): the soak's and the fuzz run's numbers.
"""

from __future__ import annotations

import os
import re
import secrets
from pathlib import Path

import pytest

from .harness import (KYBERNATE_RUNTIME, RUNC_RUNTIME, SHIM_BINARY, VERSIONS, Containerd,
                      unavailable_reason)

HERE = Path(__file__).resolve().parent


def _selected_versions() -> list[str]:
    wanted = os.environ.get("KYB_CONTAINERD_VERSIONS")
    if not wanted:
        return list(VERSIONS)
    return [v for v in VERSIONS if v in {w.strip() for w in wanted.split(",")}]


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.path)).resolve().parents:
            item.add_marker(pytest.mark.integration)


def _start(version: str, workdir: Path) -> Containerd:
    reason = unavailable_reason(version)
    if reason:
        pytest.skip(reason)
    cd = Containerd(version, workdir)
    try:
        cd.start()
        cd.import_busybox()
    except BaseException:
        cd.stop()
        raise
    return cd


def _stop_and_check(cd: Containerd) -> None:
    cd.stop()
    left = cd.leftovers()
    assert not left, f"Containerd({cd.version}).stop() left behind: {left}"


@pytest.fixture(scope="session", params=_selected_versions(), ids=lambda v: f"containerd-{v}")
def containerd(request, tmp_path_factory):
    cd = _start(request.param, tmp_path_factory.mktemp(f"containerd-{request.param}"))
    yield cd
    _stop_and_check(cd)


@pytest.fixture(params=[RUNC_RUNTIME, KYBERNATE_RUNTIME], ids=["runc", "kybernate"])
def runtime_name(request):
    if request.param == KYBERNATE_RUNTIME and not os.access(SHIM_BINARY, os.X_OK):
        pytest.skip(f"{SHIM_BINARY} is not installed (scripts/setup.sh)")
    return request.param


@pytest.fixture
def container_id(request):
    """A unique container id; whatever task/container of that id a `containerd` holds is removed after."""
    # containerd's identifier rule: alphanumeric runs joined by single '.', '_' or '-'.
    base = re.sub(r"[^A-Za-z0-9]+", "-", request.node.name.removeprefix("test_"))[:40].strip("-")
    cid = f"{base}-{secrets.token_hex(3)}"
    yield cid
    cd = request.node.funcargs.get("containerd")
    if isinstance(cd, Containerd) and cd.pid:
        cd.ctr("tasks", "kill", "-a", "-s", "SIGKILL", cid, check=False, timeout=15)
        cd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
        cd.ctr("containers", "delete", cid, check=False, timeout=30)


@pytest.fixture
def containerd_factory(tmp_path):
    started: list[Containerd] = []

    def factory(version: str) -> Containerd:
        cd = _start(version, tmp_path / f"containerd-{version}-{len(started)}")
        started.append(cd)
        return cd

    yield factory
    for cd in started:
        _stop_and_check(cd)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    if report.when == "call" and report.failed:
        cd = getattr(item, "funcargs", {}).get("containerd")
        if isinstance(cd, Containerd):
            report.sections.append((f"containerd {cd.version} log (tail)", cd.log_tail(60)))


def pytest_terminal_summary(terminalreporter):
    lines = []
    for reports in terminalreporter.stats.values():
        for report in reports:
            if getattr(report, "when", None) != "call":
                continue
            lines += [f"{report.nodeid}: {value}" for name, value in getattr(report, "user_properties", ())
                      if name == "timings"]
    if lines:
        terminalreporter.write_sep("-", "timings")
        for line in lines:
            terminalreporter.write_line(line)
