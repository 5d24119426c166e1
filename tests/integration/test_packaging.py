"""The node installer against private containerd instances, and `kybernate doctor` on this machine.

- Each containerd version reads the config the installer writes: `containerd config dump` shows our
  runtime with its annotations and options (1.6 and 1.7 with a version 2 file, 1.6 also version 1,
  2.1 version 3 and a migrated version 2 file).
- A full cycle on 1.7 and 2.1: containerd without the runtime and without our shim on its PATH (so
  `ctr run --runtime io.containerd.kybernate.v1` fails), packaging/install.sh into a tmp prefix from an
  offline wheelhouse (as the DaemonSet image does), containerd restarted: a container runs through the
  linked shim from the venv; a second run changes nothing (config bytes and mtime, venv, links); the
  uninstall gives back the original config byte for byte and leaves no file behind, and containerd
  can no longer start the runtime.
"""
from __future__ import annotations

import json
import os
import re
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .checkpoint_support import stands_still
from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME, VENV_BIN, Containerd, installation, unavailable_reason

REPO = Path(__file__).resolve().parents[2]
INSTALL_SH = REPO / "packaging" / "install.sh"
sys.path.insert(0, str(REPO / "packaging"))
import containerd_toml as ct  # noqa: E402  (standalone scripts, see tests/unit/packaging)
import kybernate_install as ki  # noqa: E402

sys.path.remove(str(REPO / "packaging"))


def skip_unless(version: str) -> None:
    reason = unavailable_reason(version)
    if reason:
        pytest.skip(reason)


class PlainContainerd(Containerd):
    """The harness's containerd with neither our runtime in its config nor our .venv/bin on its PATH:
    what a node looks like before the installer. `shim_dir` is on PATH first (the installer's
    --bin-dir, standing in for /usr/local/bin). The config is written once and then left to the
    installer (the harness would rewrite it at every start)."""

    def __init__(self, version: str, workdir: Path, shim_dir: Path):
        super().__init__(version, workdir)
        dirs = [d for d in self.env["PATH"].split(os.pathsep) if Path(d) != VENV_BIN]
        self.env["PATH"] = os.pathsep.join([str(shim_dir), *dirs])

    def config_toml(self) -> str:
        if self.config_path.exists():
            return self.config_path.read_text()
        out, skip = [], False
        for line in super().config_toml().splitlines():
            if line.startswith("["):
                skip = ".runtimes.kybernate" in line
            if not skip:
                out.append(line)
        text = "\n".join(out) + "\n"
        assert "io.containerd.kybernate.v1" not in text and ".runtimes.kybernate" not in text, text
        return text


@pytest.fixture(scope="module")
def wheelhouse(tmp_path_factory):
    """kybernate and its dependencies as wheels, built once (pip's cache makes the dependencies quick)."""
    base = tmp_path_factory.mktemp("wheelhouse")
    src = ki.copy_source(REPO, base / "src")
    out = base / "wheels"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--disable-pip-version-check",
                    "--wheel-dir", str(out), str(src)], check=True, capture_output=True, timeout=600)
    assert list(out.glob("kybernate-*.whl"))
    return out


def install_sh(*args: str, env_path: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if env_path:
        env["PATH"] = env_path
    return subprocess.run(["sh", str(INSTALL_SH), *args], capture_output=True, text=True, timeout=600, env=env)


def tree_state(*roots: Path) -> dict[str, tuple]:
    """path -> (kind, size, mtime_ns, link target) for everything under the roots."""
    state = {}
    for root in roots:
        if not root.exists() and not root.is_symlink():
            continue
        paths = [root] + ([Path(r) / n for r, ds, fs in os.walk(root) for n in ds + fs] if root.is_dir()
                          and not root.is_symlink() else [])
        for p in paths:
            st = os.lstat(p)
            state[str(p)] = (st.st_mode, st.st_size, st.st_mtime_ns,
                             os.readlink(p) if p.is_symlink() else None)
    return state


def config_dump(containerd_binary: Path, config: Path) -> str:
    r = subprocess.run([str(containerd_binary), "--config", str(config), "config", "dump"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


# ---- each containerd reads what the installer writes ----------------------------------------------
@pytest.mark.parametrize("version,base,plugin", [
    ("1.6", "version = 2\n", "io.containerd.grpc.v1.cri"),
    ("1.6", 'root = "/var/lib/containerd"\n', "io.containerd.grpc.v1.cri"),   # version 1 file
    ("1.7", "version = 2\n", "io.containerd.grpc.v1.cri"),
    ("2.1", "version = 3\n", "io.containerd.cri.v1.runtime"),
    ("2.1", "version = 2\n", "io.containerd.cri.v1.runtime"),                 # migrated by containerd
    ("2.1", None, "io.containerd.cri.v1.runtime"),                            # no file: created
], ids=["1.6-v2", "1.6-v1", "1.7-v2", "2.1-v3", "2.1-v2", "2.1-new"])
def test_containerd_reads_the_merged_runtime(tmp_path, version, base, plugin):
    inst = installation(version)
    if not os.access(inst.containerd, os.X_OK):
        pytest.skip(f"containerd {version} missing; run scripts/setup.sh")
    cfg = tmp_path / "config.toml"
    if base is not None:
        cfg.write_text(base)
    opts = ki.Options(prefix=tmp_path / "opt", config=cfg, bin_dir=tmp_path / "bin", source=None,
                      wheelhouse=None, python=sys.executable, containerd_binary=str(inst.containerd),
                      containerd_version="auto", settings=ct.RuntimeSettings(systemd_cgroup=True),
                      systemd_auto=False, restart=False, restart_command="true", dry_run=False,
                      force_reinstall=False, skip_config=False)
    assert ki.install_config(opts, ki.containerd_version(opts), ki.Reporter())
    dump = config_dump(inst.containerd, cfg)
    table = re.search(rf"^\s*\[plugins\.[\"']{re.escape(plugin)}[\"']\.containerd\.runtimes\.kybernate\]\n"
                      rf"((?:\s*\w+ = .*\n)+)", dump, re.M)
    assert table, dump
    assert re.search(r"runtime_type = [\"']io\.containerd\.kybernate\.v1[\"']", table.group(1))
    assert re.search(r"pod_annotations = \[[\"']kybernate\.io/\*[\"']\]", table.group(1))
    assert re.search(r"container_annotations = \[[\"']kybernate\.io/\*[\"']\]", table.group(1))
    options = re.search(rf"\[plugins\.[\"']{re.escape(plugin)}[\"']\.containerd\.runtimes\.kybernate\.options\]\n"
                        rf"((?:\s*\w+ = .*\n)+)", dump, re.M)
    assert options and re.search(r"SystemdCgroup = true", options.group(1)), dump


# ---- the whole cycle --------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("version", ["1.7", "2.1"])
def test_install_run_reinstall_uninstall(tmp_path, wheelhouse, version):
    skip_unless(version)
    bin_dir = tmp_path / "usr-local-bin"
    bin_dir.mkdir()
    prefix = tmp_path / "opt-kybernate"
    cd = PlainContainerd(version, tmp_path / "containerd", bin_dir)
    try:
        cd.start()
        cd.import_busybox()
        assert cd.which("containerd-shim-kybernate-v1") is None
        before = cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, "before", "true",
                        check=False, timeout=60)
        assert before.returncode != 0 and "containerd-shim-kybernate-v1" in before.stderr, before
        cd.ctr("containers", "delete", "before", check=False)
        original = cd.config_path.read_bytes()
        seal_key = tmp_path / "etc-kybernate" / "seal.key"
        common = ["--prefix", str(prefix), "--config", str(cd.config_path), "--bin-dir", str(bin_dir),
                  "--containerd-binary", str(cd.install.containerd), "--seal-key", str(seal_key)]

        # install: offline from the wheelhouse, containerd version detected from the binary
        r = install_sh(*common, "--wheelhouse", str(wheelhouse))
        assert r.returncode == 0, r.stdout + r.stderr
        assert f"containerd {version}." in r.stdout
        assert "restart containerd to load the change" in r.stdout
        shim_link = bin_dir / "containerd-shim-kybernate-v1"
        assert os.readlink(shim_link) == str(prefix / "venv" / "bin" / "containerd-shim-kybernate-v1")
        assert (cd.config_path.with_name("config.toml.kybernate-backup")).read_bytes() == original
        merged = cd.config_path.read_text()
        assert merged.startswith(original.decode()), "the installer rewrote the operator's part of the file"
        state = json.loads((prefix / "install.json").read_text())
        assert state["version"] == "0.1.0" and state["source"].endswith(".whl")
        key = seal_key.stat()
        assert (key.st_uid, stat.S_IMODE(key.st_mode), len(seal_key.read_text().strip())) == (0, 0o600, 64)

        cd.restart()
        assert cd.which("containerd-shim-kybernate-v1") == str(shim_link)
        out = cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, "through-link",
                     "echo", "installed shim says hi", timeout=60)
        assert out.stdout == "installed shim says hi\n"
        # A running container's shim is the venv's console script, found through the link.
        cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, "long", "sleep", "60", timeout=60)
        try:
            shims = cd.shim_pids()
            assert shims, "no shim process for the running container"
            cmdlines = [Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0") for p in shims]
            assert all(str(prefix / "venv").encode() in b" ".join(c) or str(shim_link).encode() in b" ".join(c)
                       for c in cmdlines), cmdlines
            assert all(os.path.realpath(f"/proc/{p}/exe").startswith("/usr/bin/python")
                       or "python" in os.path.realpath(f"/proc/{p}/exe") for p in shims)
        finally:
            cd.ctr("tasks", "kill", "-s", "SIGKILL", "long", check=False)
            deadline = time.monotonic() + 15
            while cd.ctr("tasks", "delete", "long", check=False).returncode != 0 and time.monotonic() < deadline:
                time.sleep(0.2)
            cd.ctr("containers", "delete", "long", check=False)

        # doctor from the installed venv sees the runtime entry and the shim
        doc = subprocess.run([str(bin_dir / "kybernate"), "--address", cd.address, "doctor", "--json",
                              "--config", str(cd.config_path), "--containerd", str(cd.install.containerd)],
                             capture_output=True, text=True, timeout=120, env=cd.env)
        report = json.loads(doc.stdout)
        assert report["containerd"]["ready"], report["containerd"]
        names = {c["name"]: c for c in report["checks"]}
        assert names["containerd daemon"]["status"] == "pass"
        assert names["runtime in containerd config"]["status"] == "pass"
        assert names["shim binary"]["detail"].startswith(str(shim_link))

        # second run: nothing changes
        watched = tree_state(prefix, bin_dir, cd.config_path.parent)
        r2 = install_sh(*common, "--wheelhouse", str(wheelhouse))
        assert r2.returncode == 0, r2.stdout + r2.stderr
        assert "done: nothing to change" in r2.stdout, r2.stdout
        assert tree_state(prefix, bin_dir, cd.config_path.parent) == watched

        # uninstall: the original config byte for byte, no backup, no venv, no links
        r3 = install_sh(*common, "--uninstall")
        assert r3.returncode == 0, r3.stdout + r3.stderr
        assert cd.config_path.read_bytes() == original
        assert not prefix.exists()
        assert sorted(os.listdir(bin_dir)) == []
        assert not cd.config_path.with_name("config.toml.kybernate-backup").exists()
        assert seal_key.stat().st_ino == key.st_ino and "leaving the seal key" in r3.stdout
        cd.restart()
        after = cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, "after", "true",
                       check=False, timeout=60)
        assert after.returncode != 0 and "containerd-shim-kybernate-v1" in after.stderr
        cd.ctr("containers", "delete", "after", check=False)
        # and uninstalling again is a no-op
        r4 = install_sh(*common, "--uninstall")
        assert r4.returncode == 0 and "done: nothing to change" in r4.stdout, r4.stdout + r4.stderr
    finally:
        cd.stop()
    assert not cd.leftovers()


def test_installer_refuses_a_malformed_config_with_its_line(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri"]\n  sandbox_image = registry/pause\n')
    r = install_sh("--prefix", str(tmp_path / "opt"), "--config", str(cfg), "--bin-dir", str(tmp_path / "bin"),
                   "--containerd-version", "1.7", "--source", str(REPO))
    assert r.returncode == 1
    assert "not valid TOML at line 3" in r.stderr
    assert not (tmp_path / "opt").exists() and not (tmp_path / "bin").exists()


# ---- doctor on this machine ---------------------------------------------------------------------------
def test_doctor_on_this_machine():
    """CPU checkpoint ready once CRIU 4 is installed (scripts/setup.sh), GPU not available: no driver here."""
    if os.geteuid() != 0:
        pytest.skip("criu check needs root")
    r = subprocess.run([str(VENV_BIN / "kybernate"), "doctor", "--json"], capture_output=True, text=True,
                       timeout=120)
    report = json.loads(r.stdout)
    checks = {c["name"]: c for c in report["checks"]}
    have_criu4 = os.access("/usr/local/sbin/criu", os.X_OK)
    if not have_criu4:
        pytest.skip("CRIU 4 not built yet (scripts/setup.sh)")
    assert checks["CRIU"]["status"] == "pass" and checks["criu check"]["status"] == "pass"
    assert report["cpu"] == {"ready": True, "reason": ""}
    assert r.returncode == 0
    gpu = report["gpu"]
    assert gpu["ready"] is False
    if not os.path.exists("/dev/nvidiactl"):
        assert "no NVIDIA driver: libcuda.so.1 cannot be loaded" in gpu["reason"]
    text = subprocess.run([str(VENV_BIN / "kybernate"), "doctor"], capture_output=True, text=True, timeout=120)
    assert "CPU checkpoint: ready\n" in text.stdout
    assert re.search(r"^GPU checkpoint: not available \(.+\)$", text.stdout, re.M)


# ---- the operator command against containerd ids (ctr users) ----------------------------------------
# /tmp/hold parks it between writes (no /tmp/count open in a dump that a restore into a fresh rootfs
# could not reopen): see checkpoint_support.hold_counter
COUNTER = "i=0; while :; do while [ -e /tmp/hold ]; do sleep 0.05; done; i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done"


def kyb(cd: Containerd, *args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run([str(VENV_BIN / "kybernate"), "--address", cd.address, "--namespace", cd.namespace,
                           *args], capture_output=True, text=True, timeout=timeout, env=cd.env)


def count(cd: Containerd, cid: str) -> int:
    r = cd.ctr("tasks", "exec", "--exec-id", f"cat-{time.monotonic_ns()}", cid, "cat", "/tmp/count", check=False)
    return int(r.stdout.strip()) if r.returncode == 0 and r.stdout.strip() else -1


def wait_until(pred, timeout: float = 20) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.1)
    return True


def test_kybernate_checkpoint_and_ps_by_containerd_id(containerd, container_id, tmp_path):
    """`ctr task checkpoint` drops --image-path/--exit for non-runc runtimes; `kybernate checkpoint`
    hands them to the shim through containerd's Tasks API, on 1.6, 1.7 and 2.1 alike."""
    cd = containerd
    cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, BUSYBOX_REF, container_id, "sh", "-c", COUNTER)
    assert wait_until(lambda: count(cd, container_id) >= 10)

    ps = kyb(cd, "ps", "--json")
    assert ps.returncode == 0, ps.stderr
    rows = {r["id"]: r for r in json.loads(ps.stdout)}
    assert rows[container_id]["status"] == "running" and rows[container_id]["namespace"] == cd.namespace

    image = tmp_path / "ckpt"
    r = kyb(cd, "checkpoint", container_id, "--image-path", str(image))
    assert r.returncode == 0, r.stdout + r.stderr
    assert (image / "inventory.img").exists() and f"checkpoint of {cd.namespace}/{container_id}: {image}" in r.stdout
    assert ", sealed)" in r.stdout and (image / "kybernate-seal.json").is_file(), r.stdout
    before = count(cd, container_id)
    assert wait_until(lambda: count(cd, container_id) > before, 10), "leave-running: it must go on counting"

    r = kyb(cd, "checkpoint", container_id, "--image-path", str(image))
    assert r.returncode == 1 and "is not an empty directory" in r.stderr, "an existing image is never overwritten"

    # by default into the node's checkpoint store, in the container's scope; restore finds the newest there
    cd.ctr("tasks", "exec", "--exec-id", "hold", container_id, "touch", "/tmp/hold")  # parked: see COUNTER
    assert stands_still(lambda: count(cd, container_id)), "the counter did not stop at /tmp/hold"
    r = kyb(cd, "checkpoint", container_id, "--exit")
    assert r.returncode == 0, r.stdout + r.stderr
    scope = cd.checkpoint_store / cd.namespace / "_" / container_id
    images = [d for d in scope.iterdir() if (d / "inventory.img").exists()]
    assert len(images) == 1 and f": {images[0]} (" in r.stdout, (r.stdout, images)
    assert "the task has exited" in r.stdout and f"restore with: kybernate -n {cd.namespace} restore " in r.stdout
    assert all(stat.S_IMODE(d.stat().st_mode) == 0o700 for d in (cd.checkpoint_store, scope, images[0]))
    assert wait_until(lambda: "STOPPED" in cd.ctr("tasks", "ls").stdout or
                      container_id not in cd.ctr("tasks", "ls").stdout, 15)

    r = kyb(cd, "checkpoint", container_id, "--image-path", str(tmp_path / "again"))
    assert r.returncode == 1 and "is not running" in r.stderr

    r = kyb(cd, "restore", container_id, "--ctr", str(cd.install.ctr))
    assert r.returncode == 0, r.stdout + r.stderr
    assert count(cd, container_id) >= before
    annotation = json.loads(cd.ctr("containers", "info", container_id).stdout)["Spec"]["annotations"]
    assert annotation["kybernate.io/restore-from"] == f"{container_id}/{images[0].name}"   # a name in the scope


def test_kybernate_checkpoint_refuses_unknown_and_foreign_containers(containerd, container_id, tmp_path):
    cd = containerd
    r = kyb(cd, "checkpoint", "no-such-container", "--image-path", str(tmp_path / "x"))
    assert r.returncode == 1 and "no container 'no-such-container'" in r.stderr
    cd.ctr("run", "-d", "--runtime", "io.containerd.runc.v2", BUSYBOX_REF, container_id, "sleep", "60")
    r = kyb(cd, "checkpoint", container_id, "--image-path", str(tmp_path / "y"))
    assert r.returncode == 1 and "is run by io.containerd.runc.v2, not by kybernate" in r.stderr
    assert not (tmp_path / "y").exists()


def test_a_half_image_left_by_a_killed_shim_is_listed_and_skipped(containerd, container_id, tmp_path):
    """The shim killed mid-checkpoint leaves a half image (issue #14): `kybernate checkpoints` lists it
    as abandoned, doctor warns, `kybernate restore` skips it for the newest complete checkpoint, and
    `kybernate checkpoints prune` removes it (and only it)."""
    import signal
    import threading

    from .checkpoint_support import api_checkpoint

    cd = containerd
    hold = ("x=$(head -c 200000000 /dev/zero | tr '\\0' a); i=0; "
            "while :; do while [ -e /tmp/hold ]; do sleep 0.05; done; i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done")
    cd.ctr("run", "-d", "--runtime", "io.containerd.kybernate.v1", BUSYBOX_REF, container_id, "sh", "-c", hold)
    assert wait_until(lambda: count(cd, container_id) > 2, 60), "the container never started counting"
    cd.ctr("tasks", "exec", "--exec-id", "hold", container_id, "touch", "/tmp/hold")  # parked: see COUNTER
    assert stands_still(lambda: count(cd, container_id)), "the counter did not stop at /tmp/hold"
    r = kyb(cd, "checkpoint", container_id)  # a complete one first, leave running
    assert r.returncode == 0, r.stdout + r.stderr
    scope = cd.checkpoint_store / cd.namespace / "_" / container_id
    complete = [d for d in scope.iterdir()]
    assert len(complete) == 1
    half = scope / "20991231T235959Z"  # sorts after the complete one: the newest
    failure = {}

    def dump() -> None:
        try:
            api_checkpoint(cd, container_id, image_path=str(half), timeout=120)
        except Exception as exc:  # noqa: BLE001 - the shim dies under it
            failure["error"] = exc

    worker = threading.Thread(target=dump)
    worker.start()
    assert wait_until(lambda: (half / "kybernate-in-progress.json").exists(), 30), "the dump never started"
    shim_pid = json.loads((half / "kybernate-in-progress.json").read_text())["pid"]  # the shim writing it
    assert shim_pid in cd.shim_pids()
    time.sleep(0.05)  # CRIU under way, not done: a 200 MB dump takes longer (it did finish within 0.3 s once)
    os.kill(shim_pid, signal.SIGKILL)
    worker.join(150)
    assert "error" in failure, "the checkpoint RPC cannot succeed once its shim is killed"

    ls = kyb(cd, "checkpoints", "--json")
    assert ls.returncode == 0, ls.stderr
    rows = {os.path.basename(r["path"]): r for r in json.loads(ls.stdout)}
    assert rows[half.name]["status"] == "abandoned", (shim_pid, os.path.exists(f"/proc/{shim_pid}"), rows[half.name])
    assert rows[complete[0].name]["status"] == "complete", rows
    assert "abandoned" in kyb(cd, "checkpoints").stdout
    doctor = kyb(cd, "doctor", "--json")
    store_check = [c for c in json.loads(doctor.stdout)["checks"] if c["name"] == "checkpoint store"]
    assert store_check and store_check[0]["status"] == "warn" and half.name in store_check[0]["detail"], doctor.stdout

    cd.ctr("tasks", "kill", "-s", "SIGKILL", container_id, check=False)
    wait_until(lambda: container_id not in cd.ctr("tasks", "ls", "-q").stdout or
               "STOPPED" in cd.ctr("tasks", "ls").stdout, 15)
    r = kyb(cd, "restore", container_id, "--ctr", str(cd.install.ctr))
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"skipping {half}: abandoned" in r.stderr and f"from {complete[0]}" in r.stdout, (r.stdout, r.stderr)

    pruned = kyb(cd, "checkpoints", "prune")
    assert pruned.returncode == 0 and f"removed {half}" in pruned.stdout, pruned.stdout + pruned.stderr
    assert not half.exists() and complete[0].is_dir()
