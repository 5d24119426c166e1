"""The installer's steps: config.toml written with a backup and its mode kept, a clean uninstall,
links and prefix that are not ours left alone, containerd's version, the restart, the manifests."""
import os
import re
import shutil
import stat
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from config_samples import C17, C21, DEFAULT, V2_CONFIG, entry
from installer_module import PACKAGING, REPO, load, load_toml

ki = load()
ct = load_toml()


# ---- file level: backup, mode, uninstall --------------------------------------------------------
def options(tmp_path, config, **kw):
    base = dict(prefix=tmp_path / "opt", config=config, bin_dir=tmp_path / "bin", source=None,
                wheelhouse=None, python="python3", containerd_binary="containerd",
                containerd_version="1.7", settings=DEFAULT, systemd_auto=True, restart=False,
                restart_command="true", dry_run=False, force_reinstall=False, skip_config=False)
    base.update(kw)
    return ki.Options(**base)


def test_install_config_keeps_a_backup_and_the_file_mode(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(V2_CONFIG)
    cfg.chmod(0o600)
    rep = ki.Reporter()
    assert ki.install_config(options(tmp_path, cfg), C17, rep)
    backup = tmp_path / "config.toml.kybernate-backup"
    assert backup.read_text() == V2_CONFIG
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600
    assert entry(tomllib.loads(cfg.read_text()), 2)["options"]["SystemdCgroup"] is True
    # second run: nothing written (same mtime), backup untouched
    mtime = cfg.stat().st_mtime_ns
    assert not ki.install_config(options(tmp_path, cfg), C17, ki.Reporter())
    assert cfg.stat().st_mtime_ns == mtime
    assert "unchanged:" in capsys.readouterr().out
    # uninstall: back to the original, byte for byte, and the backup is gone
    assert ki.uninstall_config(options(tmp_path, cfg), ki.Reporter())
    assert cfg.read_text() == V2_CONFIG and not backup.exists()
    assert stat.S_IMODE(cfg.stat().st_mode) == 0o600


def test_uninstall_keeps_the_backup_when_the_operator_changed_the_file(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(V2_CONFIG)
    ki.install_config(options(tmp_path, cfg), C17, ki.Reporter())
    cfg.write_text(cfg.read_text().replace("oom_score = -999", "oom_score = -500"))
    ki.uninstall_config(options(tmp_path, cfg), ki.Reporter())
    assert "oom_score = -500" in cfg.read_text() and ct.BLOCK_BEGIN not in cfg.read_text()
    assert (tmp_path / "config.toml.kybernate-backup").read_text() == V2_CONFIG


def test_created_config_is_removed_on_uninstall(tmp_path):
    cfg = tmp_path / "etc" / "config.toml"
    ki.install_config(options(tmp_path, cfg, containerd_version="2.1"), C21, ki.Reporter())
    assert tomllib.loads(cfg.read_text())["version"] == 3
    assert not (cfg.parent / "config.toml.kybernate-backup").exists()
    ki.uninstall_config(options(tmp_path, cfg), ki.Reporter())
    assert not cfg.exists()


def test_trailing_newline_less_file_comes_back_byte_for_byte(tmp_path):
    cfg = tmp_path / "config.toml"
    cfg.write_text(V2_CONFIG.rstrip("\n"))
    ki.install_config(options(tmp_path, cfg), C17, ki.Reporter())
    ki.uninstall_config(options(tmp_path, cfg), ki.Reporter())
    assert cfg.read_text() == V2_CONFIG.rstrip("\n")
    assert not (tmp_path / "config.toml.kybernate-backup").exists()


def test_dry_run_changes_nothing_and_shows_the_diff(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text(V2_CONFIG)
    assert ki.install_config(options(tmp_path, cfg, dry_run=True), C17, ki.Reporter(dry_run=True))
    out = capsys.readouterr().out
    assert cfg.read_text() == V2_CONFIG
    assert not (tmp_path / "config.toml.kybernate-backup").exists()
    assert "+  runtime_type = \"io.containerd.kybernate.v1\"" in out
    assert "would: add" in out


def test_main_refuses_a_malformed_config_before_touching_anything(tmp_path, capsys):
    cfg = tmp_path / "config.toml"
    cfg.write_text("version = 2\n[plugins\n")
    rc = ki.main(["--prefix", str(tmp_path / "opt"), "--config", str(cfg), "--bin-dir", str(tmp_path / "bin"),
                  "--containerd-version", "1.7", "--source", str(tmp_path)])
    err = capsys.readouterr().err
    assert rc == 1
    assert "not valid TOML at line 2" in err
    assert not (tmp_path / "opt").exists() and not (tmp_path / "bin").exists()
    assert cfg.read_text() == "version = 2\n[plugins\n"


def test_uninstall_leaves_foreign_links_and_files(tmp_path, capsys):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "kybernate").write_text("#!/bin/sh\n")
    os.symlink("/somewhere/else", bin_dir / "containerd-shim-kybernate-v1")
    opts = options(tmp_path, tmp_path / "config.toml", bin_dir=bin_dir, skip_config=True)
    ki.uninstall(opts, ki.Reporter())
    assert (bin_dir / "kybernate").exists() and (bin_dir / "containerd-shim-kybernate-v1").is_symlink()
    assert "leaving" in capsys.readouterr().out


def test_install_refuses_to_replace_a_foreign_binary(tmp_path):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "containerd-shim-kybernate-v1").write_text("#!/bin/sh\n")
    with pytest.raises(ki.InstallError, match="not a link made by this installer"):
        ki.install_links(options(tmp_path, tmp_path / "c.toml", bin_dir=bin_dir), ki.Reporter())


def test_uninstall_refuses_a_prefix_venv_that_is_not_one(tmp_path):
    (tmp_path / "opt" / "venv").mkdir(parents=True)
    with pytest.raises(ki.InstallError, match="not a virtual environment"):
        ki.uninstall_prefix(options(tmp_path, tmp_path / "c.toml"), ki.Reporter())
    assert (tmp_path / "opt" / "venv").exists()


# ---- versions, snippets, manifests --------------------------------------------------------------
@pytest.mark.parametrize("text,expected", [
    ("containerd github.com/containerd/containerd 1.6.20~ds1 1.6.20~ds1-1+deb12u3", (1, 6, 20)),
    ("containerd github.com/containerd/containerd 1.7.24~ds1 1.7.24~ds1-6+deb13u1", (1, 7, 24)),
    ("containerd github.com/containerd/containerd/v2 2.1.9+unknown ", (2, 1, 9)),
    ("containerd containerd.io v1.7.2 0cae528dd6cb557f7201036e9f43420650207b58", (1, 7, 2)),
])
def test_parse_containerd_version(text, expected):
    assert ki.parse_containerd_version(text) == expected


def test_parse_containerd_version_refuses_garbage():
    with pytest.raises(ki.InstallError):
        ki.parse_containerd_version("containerd: command not found")


def test_runtimeclass_manifest_names_the_handler():
    text = (PACKAGING / "kubernetes" / "runtimeclass.yaml").read_text()
    assert re.search(r"^kind: RuntimeClass$", text, re.M)
    assert re.search(r"^handler: kybernate$", text, re.M)
    assert re.search(r"^apiVersion: node.k8s.io/v1$", text, re.M)


def test_daemonset_mounts_the_host_paths_the_installer_needs():
    text = (PACKAGING / "kubernetes" / "installer-daemonset.yaml").read_text()
    for path in ("/opt", "/etc/containerd", "/usr/local/bin"):
        assert re.search(rf"^\s+path: {re.escape(path)}$", text, re.M), path
    assert "kind: DaemonSet" in text and "hostPID: true" in text



def test_restart_runs_only_when_the_config_changed(tmp_path):
    marker = tmp_path / "restarted"
    cfg = tmp_path / "config.toml"
    cfg.write_text(V2_CONFIG)
    opts = options(tmp_path, cfg, restart=True, restart_command=f"touch {marker}")
    ki.restart_containerd(opts, ki.Reporter(), ki.install_config(opts, C17, ki.Reporter()))
    assert marker.exists()
    marker.unlink()
    ki.restart_containerd(opts, ki.Reporter(), ki.install_config(opts, C17, ki.Reporter()))
    assert not marker.exists()


def test_failing_restart_command_is_an_error(tmp_path):
    opts = options(tmp_path, tmp_path / "c.toml", restart=True, restart_command="false")
    with pytest.raises(ki.InstallError, match="restarting containerd"):
        ki.restart_containerd(opts, ki.Reporter(), True)


# ---- the installer's own files: what it needs before Kybernate is installed ------------------------
def test_the_installer_writes_with_the_projects_one_atomic_writer():
    assert Path(ki.atomic_write.__code__.co_filename) == REPO / "fsutil" / "atomic.py"


def _image_layout(root: Path, with_fsutil: bool = True) -> Path:
    """The files the installer image copies (packaging/Containerfile), in the checkout's layout."""
    (root / "packaging").mkdir(parents=True)
    for name in ("install.sh", "kybernate_install.py", "containerd_toml.py"):
        shutil.copy2(PACKAGING / name, root / "packaging" / name)
    if with_fsutil:
        shutil.copytree(REPO / "fsutil", root / "fsutil", ignore=shutil.ignore_patterns("__pycache__"))
    return root / "packaging" / "kybernate_install.py"


def _run_installer(script: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    python = getattr(sys, "_base_executable", None) or sys.executable   # a Python without Kybernate
    cfg = tmp_path / "etc" / "config.toml"
    return subprocess.run([python, "-s", "-E", str(script), "--prefix", str(tmp_path / "opt"), "--config",
                           str(cfg), "--bin-dir", str(tmp_path / "bin"), "--containerd-version", "2.1",
                           "--source", str(REPO), *args],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)


def test_the_installer_runs_from_the_image_layout_with_a_bare_python(tmp_path):
    script = _image_layout(tmp_path / "payload")
    r = _run_installer(script, tmp_path, "--skip-config", "--uninstall")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "done: nothing to change" in r.stdout
    # a config step that writes: through fsutil/atomic.py of the payload
    r = _run_installer(script, tmp_path, "--dry-run")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "would: create" in r.stdout and not (tmp_path / "etc").exists()


def test_the_installer_without_fsutil_says_what_is_missing(tmp_path):
    script = _image_layout(tmp_path / "payload", with_fsutil=False)
    r = _run_installer(script, tmp_path, "--uninstall")
    assert r.returncode == 1
    assert f"{tmp_path / 'payload' / 'fsutil' / 'atomic.py'} is missing" in r.stderr
    assert "Traceback" not in r.stderr


def test_the_image_copies_every_package_and_every_installer_file():
    containerfile = (PACKAGING / "Containerfile").read_text()
    setup = (REPO / "setup.cfg").read_text()
    include = setup.split("[options.packages.find]")[1].split("[")[0]
    packages = {line.strip() for line in include.splitlines()
                if line.strip() and "=" not in line and "*" not in line}
    assert packages >= {"shim", "criu", "kybernate", "fsutil"}
    for pkg in sorted(packages):
        assert re.search(rf"^COPY {pkg} {pkg}$", containerfile, re.M), f"the wheel stage misses {pkg}/"
    for name in ("install.sh", "kybernate_install.py", "containerd_toml.py"):
        assert re.search(rf"^COPY .*packaging/{name}\b.* /kybernate/packaging/$", containerfile, re.M), name
    assert re.search(r"^COPY fsutil/__init__.py fsutil/atomic.py /kybernate/fsutil/$", containerfile, re.M)
    entrypoint = (PACKAGING / "kubernetes" / "installer-entrypoint.sh").read_text()
    assert '"$payload/packaging/install.sh"' in entrypoint


# ---- the seal key --------------------------------------------------------------------------------
@pytest.mark.skipif(os.geteuid() != 0, reason="the key must be root's: needs root")
def test_the_seal_key_is_made_once_root_only_and_never_replaced(tmp_path, capsys):
    key = tmp_path / "etc" / "kybernate" / "seal.key"
    ki.install_seal_key(options(tmp_path, None, seal_key=key, dry_run=True), ki.Reporter(dry_run=True))
    assert not key.exists() and "would: create the seal key" in capsys.readouterr().out
    rep = ki.Reporter()
    ki.install_seal_key(options(tmp_path, None, seal_key=key), rep)
    st = key.stat()
    assert rep.changes and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    text = key.read_text()
    assert len(text.strip()) == 64 and int(text, 16) >= 0
    # the shim takes it as it is
    from shim.checkpoint.seal import load_key
    assert load_key(str(key)) == text.strip().encode()
    # a second run, or a cluster key the operator put there, is left as it is
    rep = ki.Reporter()
    ki.install_seal_key(options(tmp_path, None, seal_key=key), rep)
    assert not rep.changes and key.read_text() == text
    key.chmod(0o644)
    rep = ki.Reporter()
    ki.install_seal_key(options(tmp_path, None, seal_key=key), rep)
    assert not rep.changes and key.read_text() == text and "chmod 600" in capsys.readouterr().out
