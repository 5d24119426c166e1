"""The `kybernate` operator command: lazy imports, targets, doctor's verdicts (with fake binaries and a
fake CUDA driver), progress display, ps rendering, containerd config inspection."""
import io
import json
import os
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from kybernate import OperatorError, containerd_config, doctor
from kybernate.checkpoint import Progress, Target, human, parse_target, tree_size
from kybernate.containerd_api import _namespace_names, target as grpc_target
from kybernate.ps import Row, _cuda_cell, nvidia_smi_usage, pod_of, render

from installer_module import load_toml

ct = load_toml()   # what the node installer writes into config.toml


def script(path: Path, body: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body)
    path.chmod(path.stat().st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
    return path


# ---- the command line ------------------------------------------------------------------------------
def test_help_imports_neither_grpc_protobuf_nor_cffi():
    code = ("import sys\nfrom kybernate.cli import main\n"
            "for argv in (['--help'], ['doctor', '--help'], ['checkpoint', '--help']):\n"
            "    try:\n        main(argv)\n    except SystemExit:\n        pass\n"
            "print(sorted({m.split('.')[0] for m in sys.modules} & {'grpc', 'google', 'cffi', 'psutil', 'proto'}))")
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().splitlines()[-1] == "[]"
    assert "checkpoint" in out.stdout and "--image-path" in out.stdout
    assert time.monotonic() - t0 < 5


def test_console_script_help():
    exe = Path(sys.executable).parent / "kybernate"
    if not exe.exists():
        pytest.skip("the kybernate console script is not installed in this venv (pip install -e .)")
    out = subprocess.run([str(exe), "--help"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "doctor" in out.stdout and "restore" in out.stdout


@pytest.mark.parametrize("text,expected", [
    ("c1", Target(namespace="default", id="c1")),
    ("prod/web", Target(namespace="k8s.io", pod_namespace="prod", pod="web")),
    ("prod/web/app", Target(namespace="k8s.io", pod_namespace="prod", pod="web", container="app")),
])
def test_parse_target(text, expected):
    assert parse_target(text, "default") == expected


@pytest.mark.parametrize("bad", ["", "a/", "/b", "a/b/c/d", "a//c"])
def test_parse_target_refuses(bad):
    with pytest.raises(OperatorError) as exc:
        parse_target(bad, "default")
    assert exc.value.exit_code == 2


def test_bad_target_exits_2_with_the_reason(capsys):
    from kybernate.cli import main
    assert main(["checkpoint", "a/b/c/d"]) == 2
    assert "expected a containerd container id or NAMESPACE/POD[/CONTAINER]" in capsys.readouterr().err


def test_unreachable_containerd_is_one_sentence(tmp_path, capsys):
    from kybernate.cli import main
    rc = main(["--address", str(tmp_path / "nothing.sock"), "ps"])
    err = capsys.readouterr().err
    assert rc == 1 and "cannot reach containerd at" in err and "Traceback" not in err


def test_grpc_target_forms():
    assert grpc_target("/run/containerd/containerd.sock") == "unix:///run/containerd/containerd.sock"
    assert grpc_target("unix:///run/x.sock") == "unix:///run/x.sock"


def test_namespace_list_decoding():
    def ns(name: bytes, labels: bytes = b"") -> bytes:
        inner = b"\x0a" + bytes([len(name)]) + name + labels
        return b"\x0a" + bytes([len(inner)]) + inner
    label = b"\x12\x06\x0a\x01k\x12\x01v"   # map entry k=v, field 2
    assert _namespace_names(ns(b"default") + ns(b"k8s.io", label)) == ["default", "k8s.io"]
    assert _namespace_names(b"") == []


# ---- doctor -------------------------------------------------------------------------------------------
V17 = "containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1"


class FakeDriver:
    def __init__(self, version=12080, supported=True):
        self.path = "/fake/libcuda.so.1"
        self.version = version
        self.supported = supported

    def driver_version(self):
        return self.version

    def require_checkpoint_api(self):
        from cuda_bindings import DriverTooOld
        if not self.supported:
            raise DriverTooOld("the CUDA checkpoint API (cuCheckpointProcess*)", 12080, self.version,
                               ("cuCheckpointProcessLock",))

    def device_count(self):
        return 2


def missing_driver():
    from cuda_bindings import DriverMissing
    raise DriverMissing("libcuda.so.1", "libcuda.so.1: cannot open shared object file")


@pytest.fixture
def node(tmp_path):
    """A fake node: bin dir with containerd, runc, criu, shim, nvidia-container-runtime; a config."""
    bin_dir = tmp_path / "bin"
    script(bin_dir / "containerd", f'echo "{V17}"\n')
    script(bin_dir / "runc", 'echo "runc version 1.1.5"\n')
    script(bin_dir / "criu", 'case "$1" in --version) echo "Version: 4.1.1";; check) echo "Looks good."; exit 0;;'
                             ' --help) echo "  -L|--libdir           path to a plugin directory (by default '
                             f'{tmp_path}/criu-default/)";; esac\n')
    script(bin_dir / "containerd-shim-kybernate-v1", 'echo "containerd-shim-kybernate-v1:"; '
                                                     'echo "  Version:  0.1.0"\n')
    script(bin_dir / "nvidia-container-runtime", "exit 0\n")
    plugins = tmp_path / "criu-plugins"
    plugins.mkdir()
    (plugins / "cuda_plugin.so").write_bytes(b"\x7fELF")
    cgroup = tmp_path / "cgroup"
    config = tmp_path / "config.toml"
    config.write_text(ct.merge_config("version = 2\n", (1, 7, 24), ct.RuntimeSettings()).text)
    env = doctor.DoctorEnv(config=str(config), address=str(tmp_path / "no.sock"), path=str(bin_dir),
                           criu_plugin_dirs=[str(plugins)], euid=0, cuda_driver=FakeDriver,
                           check_daemon=False)
    env.tmp = tmp_path
    return env


def names(result):
    return {c.name: c for c in result.checks}


def test_doctor_all_good(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    monkeypatch.setattr(doctor, "check_cgroup", lambda env: doctor.Check("cgroups", doctor.PASS, "v2"))
    r = doctor.run_checks(node)
    c = names(r)
    assert c["containerd"].detail.startswith("1.7.24")
    assert c["runtime in containerd config"].status == "pass"
    assert c["shim binary"].status == "pass" and "version 0.1.0" in c["shim binary"].detail
    assert c["CRIU"].detail.startswith("4.1.1") and c["criu check"].status == "pass"
    assert c["CUDA checkpoint API"].detail.endswith("2 GPU(s)")
    assert "not in CRIU's default plugin dir" in c["CRIU CUDA plugin"].detail
    assert (r.cpu_ready, r.gpu_ready, r.containerd_ready) == (True, True, True)
    assert r.exit_code == 0
    assert r.summary_lines() == ["CPU checkpoint: ready", "GPU checkpoint: ready", "containerd runtime: configured"]


def test_doctor_old_criu_means_cpu_not_ready_and_exit_1(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    script(Path(node.path) / "criu", 'case "$1" in --version) echo "Version: 3.17.1";; check) echo ok;; esac\n')
    r = doctor.run_checks(node)
    assert not r.cpu_ready and r.exit_code == 1
    assert "CRIU 3.17.1" in r.cpu_reason and "older than 4" in r.cpu_reason
    assert not r.gpu_ready and r.gpu_reason == "CPU checkpoint not ready"
    text = doctor.render(r)
    assert "[FAIL] CRIU: 3.17.1" in text and "fix: build and install CRIU 4" in text
    assert "CPU checkpoint: not ready (CRIU 3.17.1" in text


def test_doctor_failing_criu_check(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    script(Path(node.path) / "criu", 'case "$1" in --version) echo "Version: 4.1.1";; check) '
                                     'echo "Error (criu/cr-check.c:1234): Kernel lacks something"; exit 1;; esac\n')
    r = doctor.run_checks(node)
    assert not r.cpu_ready and "check` fails" in r.cpu_reason
    assert "Kernel lacks something" in names(r)["criu check"].detail


def test_doctor_without_root_does_not_run_criu_check(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    monkeypatch.setattr(doctor, "check_cgroup", lambda env: doctor.Check("cgroups", doctor.PASS, "v2"))
    node.euid = 1000
    r = doctor.run_checks(node)
    assert names(r)["criu check"].status == "warn" and r.cpu_ready


def test_doctor_without_driver_gpu_not_available_for_that_reason(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    monkeypatch.setattr(doctor, "check_cgroup", lambda env: doctor.Check("cgroups", doctor.PASS, "v2"))
    node.cuda_driver = missing_driver
    r = doctor.run_checks(node)
    assert r.cpu_ready and not r.gpu_ready
    assert r.gpu_reason == "no NVIDIA driver: libcuda.so.1 cannot be loaded"
    assert "GPU checkpoint: not available (no NVIDIA driver: libcuda.so.1 cannot be loaded)" in r.summary_lines()
    assert r.exit_code == 0


def test_doctor_old_driver(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    node.cuda_driver = lambda: FakeDriver(version=12040, supported=False)
    r = doctor.run_checks(node)
    assert "driver API 12.4 lacks the checkpoint API (needs 12.8)" in r.gpu_reason


def test_doctor_missing_plugin_and_toolkit_do_not_block_gpu_checkpoint(node, monkeypatch):
    """The shim checkpoints CUDA itself before CRIU runs: CRIU's CUDA plugin is optional, and
    nvidia-container-runtime only gives containers their GPUs, so both are reported, neither blocks."""
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    os.unlink(Path(node.path) / "nvidia-container-runtime")
    node.criu_plugin_dirs = [str(node.tmp / "empty")]
    r = doctor.run_checks(node)
    checks = names(r)
    assert checks["CRIU CUDA plugin"].status == "info" and "not needed" in checks["CRIU CUDA plugin"].detail
    assert checks["nvidia-container-runtime"].status == "warn"
    assert r.gpu_ready and r.cpu_ready


def test_doctor_config_problems(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    cfg = Path(node.config)
    cfg.write_text("version = 2\n[plugins\n")
    c = names(doctor.run_checks(node))["runtime in containerd config"]
    assert c.status == "fail" and "at line 2" in c.detail
    cfg.write_text("version = 2\n")
    r = doctor.run_checks(node)
    assert not r.containerd_ready and f"no kybernate runtime in {cfg}" in r.containerd_reason
    assert r.cpu_ready or "cgroups" in r.cpu_reason     # the config does not decide CPU readiness
    cfg.write_text(ct.merge_config(None, (2, 1, 0), ct.RuntimeSettings()).text)
    checks = doctor.run_checks(node).checks
    assert any(c.name == "containerd config version" and c.status == "fail" for c in checks)
    cfg.unlink()
    assert "does not exist" in names(doctor.run_checks(node))["runtime in containerd config"].detail


def test_doctor_warns_when_annotations_do_not_pass(node, monkeypatch):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    Path(node.config).write_text('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kyb]\n'
                                 '  runtime_type = "io.containerd.kybernate.v1"\n')
    checks = doctor.run_checks(node).checks
    assert any(c.name == "annotations passed to the shim" and c.status == "warn" for c in checks)
    assert any(c.name == "RuntimeClass handler" and "'kyb'" in c.detail for c in checks)


def test_doctor_json_and_text_output(node, monkeypatch, capsys):
    monkeypatch.setattr(doctor, "SYSTEM_DIRS", ())
    monkeypatch.setattr(doctor, "DoctorEnv", lambda **kw: node)

    class Args:
        config, address, containerd, criu, json = node.config, node.address, "containerd", None, True
    rc = doctor.main(Args)
    data = json.loads(capsys.readouterr().out)
    assert rc == (0 if data["cpu"]["ready"] else 1)
    assert {"checks", "cpu", "gpu", "containerd"} <= set(data)


def test_cgroup_layout_of_this_machine():
    layout, desc = doctor.cgroup_layout("/sys/fs/cgroup")
    assert layout in ("v1", "v2", "hybrid") and "/sys/fs/cgroup" in desc


def test_criu_default_plugin_dir_from_help(node):
    assert doctor.criu_default_plugin_dir(str(Path(node.path) / "criu")) == f"{node.tmp}/criu-default"


# ---- containerd config inspection ----------------------------------------------------------------------
def test_inspect_finds_entries_in_imports_and_misplaced_ones(tmp_path):
    conf_d = tmp_path / "conf.d"
    conf_d.mkdir()
    (conf_d / "kybernate.toml").write_text(ct.render_entry(3, ct.RuntimeSettings()))
    main = tmp_path / "config.toml"
    main.write_text('version = 3\nimports = ["conf.d/*.toml"]\n' + ct.render_entry(2, ct.RuntimeSettings()))
    report = containerd_config.inspect(main)
    assert report.schema == 3
    assert [e.file for e in report.entries] == [str(conf_d / "kybernate.toml")]
    assert report.entries[0].annotations_pass
    assert len(report.misplaced) == 1 and "io.containerd.grpc.v1.cri" in report.misplaced[0]


# ---- progress, ps ------------------------------------------------------------------------------------
def test_progress_shows_the_image_growing(tmp_path):
    out = io.StringIO()
    target = tmp_path / "img"
    target.mkdir()

    def work():
        for i in range(4):
            (target / f"pages-{i}.img").write_bytes(b"x" * 300_000)
            time.sleep(0.12)
        return "done"

    p = Progress("checkpoint x", target, stream=out, interval=0.02, log_every=0.1)
    assert p.run(work) == "done"
    assert len(p.lines) >= 2
    units = {"B": 1, "KiB": 1024, "MiB": 1024 ** 2, "GiB": 1024 ** 3}
    sizes = [float(n) * units[u] for n, u in (line.split("image ")[1].split() for line in p.lines)]
    assert sizes == sorted(sizes) and sizes[-1] > sizes[0]
    assert p.seconds >= 0.4


def test_progress_reraises_the_error_of_the_work(tmp_path):
    with pytest.raises(ValueError, match="boom"):
        Progress("x", tmp_path, stream=io.StringIO(), interval=0.01).run(lambda: (_ for _ in ()).throw(ValueError("boom")))


def test_quiet_progress_still_waits_for_the_work(tmp_path):
    """-q hides the progress line and nothing else: the call returns only when the work did."""
    out = io.StringIO()
    finished = threading.Event()

    def slow_rpc():
        time.sleep(1.3)  # several display intervals
        finished.set()
        return "checkpointed"

    p = Progress("checkpoint x", tmp_path, stream=out, interval=0.05, log_every=0.1, enabled=False)
    assert p.run(slow_rpc) == "checkpointed"
    assert finished.is_set() and p.seconds >= 1.3
    assert out.getvalue() == "" and p.lines == []


def test_checkpoint_quiet_returns_after_the_checkpoint_rpc(tmp_path, monkeypatch, capsys):
    """`kybernate checkpoint -q` against a containerd whose Checkpoint takes 1.5 s and writes the image
    at its end: the command waits for it and reports the whole image."""
    import struct
    from types import SimpleNamespace

    from criu.images import IMG_COMMON_MAGIC, INVENTORY_MAGIC, PSTREE_MAGIC
    from kybernate import RUNTIME_TYPE, SEAL_MANIFEST
    from kybernate import checkpoint as ck
    from kybernate.cli import main
    from proto.containerd.types.task import task_pb2

    calls = []

    class SlowContainerd:
        def __init__(self, address):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def container(self, namespace, cid):
            return SimpleNamespace(runtime=SimpleNamespace(name=RUNTIME_TYPE))

        def task(self, namespace, cid):
            return SimpleNamespace(status=task_pb2.RUNNING, pid=42)

        def checkpoint(self, namespace, cid, options, timeout=None):
            from proto.anyutil import unpack
            from proto.containerd.runc.v1 import options_pb2

            image = Path(unpack(options, options_pb2.CheckpointOptions).image_path)
            time.sleep(1.5)
            image.mkdir(parents=True)   # the shim makes the image dir (and removes it if the checkpoint fails)
            (image / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
            (image / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC))
            (image / SEAL_MANIFEST).write_text("{}")  # the shim seals it (else kybernate warns on stderr)
            calls.append(time.monotonic())

    monkeypatch.setattr(ck, "Containerd", SlowContainerd)
    image = tmp_path / "image"
    t0 = time.monotonic()
    assert main(["checkpoint", "c1", "-q", "--image-path", str(image)]) == 0
    assert len(calls) == 1 and time.monotonic() - t0 >= 1.5
    out, err = capsys.readouterr()
    assert f"checkpoint of default/c1: {image}" in out and err == ""


def test_human_and_tree_size(tmp_path):
    assert human(512) == "512 B" and human(1536) == "1.5 KiB" and human(3 * 1024 ** 3) == "3.0 GiB"
    (tmp_path / "a").write_bytes(b"1" * 10)
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "b").write_bytes(b"2" * 5)
    assert tree_size(tmp_path) == 15 and tree_size(tmp_path / "a") == 10


def test_ps_rendering():
    rows = [Row("k8s.io", "a" * 64, "prod/web/app", "running", 42, [42, 43], [
                {"pid": 42, "name": "python", "state": "running", "driver_answer": "running"},
                {"pid": 43, "name": "python", "state": "checkpointed", "driver_answer": "checkpointed"}], "", 1024),
            Row("default", "c1", "", "stopped", 0, [], None, "no driver", None)]
    text = render(rows)
    lines = text.splitlines()
    assert lines[0].split() == ["NAMESPACE", "CONTAINER", "POD", "STATUS", "PID", "PROCS", "CUDA", "VRAM"]
    assert "aaaaaaaaaaaaa " in lines[1] and "1 checkpointed,1 running" in lines[1] and "1024 MiB" in lines[1]
    assert "n/a (no driver)" in lines[2]
    assert _cuda_cell(Row("n", "i", "", "running", 1, [1], [], "", None)) == "none"
    assert pod_of({"io.kubernetes.pod.namespace": "ns", "io.kubernetes.pod.name": "p"}) == "ns/p"


def test_nvidia_smi_usage_parses_and_sums(tmp_path):
    smi = script(tmp_path / "nvidia-smi", 'echo "101, 2000"; echo "101, 48"; echo "202, 10"\n')
    assert nvidia_smi_usage(lambda name: str(smi)) == {101: 2048, 202: 10}
    assert nvidia_smi_usage(lambda name: None) is None
    bad = script(tmp_path / "bad-smi", "exit 9\n")
    assert nvidia_smi_usage(lambda name: str(bad)) is None


def test_checkpoint_says_whether_the_shim_sealed_the_image(tmp_path, monkeypatch, capsys):
    """An unsealed image (the node has no seal key) is reported as such, with a warning on stderr: a
    node that requires seals refuses to restore it."""
    import struct
    from types import SimpleNamespace

    from criu.images import IMG_COMMON_MAGIC, INVENTORY_MAGIC, PSTREE_MAGIC
    from kybernate import RUNTIME_TYPE, SEAL_MANIFEST
    from kybernate import checkpoint as ck
    from kybernate.cli import main
    from proto.containerd.types.task import task_pb2

    sealed = {"yes": True}

    class FakeContainerd:
        def __init__(self, address):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def container(self, namespace, cid):
            return SimpleNamespace(runtime=SimpleNamespace(name=RUNTIME_TYPE))

        def task(self, namespace, cid):
            return SimpleNamespace(status=task_pb2.RUNNING, pid=42)

        def checkpoint(self, namespace, cid, options, timeout=None):
            from proto.anyutil import unpack
            from proto.containerd.runc.v1 import options_pb2

            image = Path(unpack(options, options_pb2.CheckpointOptions).image_path)
            image.mkdir(parents=True)   # the shim makes the image dir
            (image / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\0" * 12)
            (image / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC))
            if sealed["yes"]:
                (image / SEAL_MANIFEST).write_text("{}")

    monkeypatch.setattr(ck, "Containerd", FakeContainerd)
    assert main(["checkpoint", "c1", "-q", "--image-path", str(tmp_path / "a")]) == 0
    out, err = capsys.readouterr()
    assert ", sealed)" in out and err == ""
    sealed["yes"] = False
    assert main(["checkpoint", "c1", "-q", "--image-path", str(tmp_path / "b")]) == 0
    out, err = capsys.readouterr()
    assert "NOT sealed)" in out and "is not sealed" in err and "refuses to restore it" in err


# ---- checkpoint/restore in the node's store ----------------------------------------------------------
def test_default_image_dir_is_in_the_containers_scope_and_left_for_the_shim_to_make(tmp_path):
    from kybernate.checkpoint import default_image_dir
    from shim.policy.store import Scope

    store = tmp_path / "store"
    image = default_image_dir(str(store), Scope("k8s.io", "prod", ("trainer", "train")))
    assert image.parent == store / "k8s.io" / "prod" / "trainer" / "train" and not image.exists()
    for d in (store, store / "k8s.io", store / "k8s.io" / "prod", image.parent):
        assert d.stat().st_mode & 0o777 == 0o700, d
    plain = default_image_dir(str(store), Scope("default", "", ("c1",)))
    assert plain.parent == store / "default" / "_" / "c1"


def test_restore_name_is_relative_to_the_scope_or_the_path_itself(tmp_path):
    from kybernate.checkpoint import restore_name
    from shim.policy.store import Scope

    store = str(tmp_path / "store")
    scope = Scope("default", "", ("c2",))         # the restored container's own scope: <store>/default/_
    assert restore_name(Path(store, "default", "_", "c1", "ck"), store, scope) == "c1/ck"
    assert restore_name(Path(store, "other", "_", "c1", "ck"), store, scope) == f"{store}/other/_/c1/ck"
    assert restore_name(Path("/mnt/ck"), store, scope) == "/mnt/ck"
    cri = Scope("k8s.io", "prod", ("trainer-2", "train"))
    assert restore_name(Path(store, "k8s.io", "prod", "trainer", "train", "ck"), store, cri) == "trainer/train/ck"
