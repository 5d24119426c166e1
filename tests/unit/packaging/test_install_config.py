"""The installer's config.toml merge: other runtimes and settings kept, v1/v2/v3 schemas, idempotence,
backups, malformed files refused with the line number, and a clean uninstall."""
import os
import re
import stat
import tomllib

import pytest

from installer_module import PACKAGING, load

ki = load()

C16, C17, C21 = (1, 6, 20), (1, 7, 24), (2, 1, 9)
DEFAULT = ki.RuntimeSettings()

V2_CONFIG = """\
version = 2
root = "/var/lib/containerd"
oom_score = -999

[grpc]
  address = "/run/containerd/containerd.sock"

[plugins]
  [plugins."io.containerd.grpc.v1.cri"]
    sandbox_image = "registry.k8s.io/pause:3.9"
    [plugins."io.containerd.grpc.v1.cri".containerd]
      default_runtime_name = "runc"
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.runc.options]
          SystemdCgroup = true
      [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia]
        runtime_type = "io.containerd.runc.v2"
        [plugins."io.containerd.grpc.v1.cri".containerd.runtimes.nvidia.options]
          BinaryName = "/usr/bin/nvidia-container-runtime"
          SystemdCgroup = true
  [plugins."io.containerd.internal.v1.opt"]
    path = "/opt/containerd"  # trailing comment kept
"""

V3_CONFIG = """\
version = 3
root = "/var/lib/containerd"

[plugins.'io.containerd.cri.v1.images'.pinned_images]
  sandbox = "registry.k8s.io/pause:3.10"

[plugins.'io.containerd.cri.v1.runtime'.containerd]
  default_runtime_name = "runc"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[plugins.'io.containerd.cri.v1.runtime'.containerd.runtimes.runc.options]
  SystemdCgroup = false
"""

V1_CONFIG = """\
root = "/var/lib/containerd"
[plugins.cri]
  sandbox_image = "k8s.gcr.io/pause:3.2"
[plugins.cri.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"
"""


def entry(parsed, schema):
    cur = parsed
    for k in ki.runtime_path(schema):
        cur = cur[k]
    return cur


def without_ours(parsed, schema):
    return ki._remove(parsed, ki.runtime_path(schema))


# ---- merge: text level --------------------------------------------------------------------------
def test_v2_merge_keeps_other_runtimes_and_settings():
    r = ki.merge_config(V2_CONFIG, C17, DEFAULT)
    assert r.changed and r.schema == 2
    before, after = tomllib.loads(V2_CONFIG), tomllib.loads(r.text)
    assert without_ours(after, 2) == before
    rt = after["plugins"]["io.containerd.grpc.v1.cri"]["containerd"]["runtimes"]
    assert set(rt) == {"runc", "nvidia", "kybernate"}
    assert rt["nvidia"]["options"]["BinaryName"] == "/usr/bin/nvidia-container-runtime"
    k = rt["kybernate"]
    assert k["runtime_type"] == "io.containerd.kybernate.v1"
    assert k["pod_annotations"] == ["kybernate.io/*"]
    assert k["container_annotations"] == ["kybernate.io/*"]
    assert k["options"] == {"BinaryName": "", "SystemdCgroup": False}
    # The operator's text, comments included, is untouched: ours is appended after it.
    assert r.text.startswith(V2_CONFIG)
    assert "# trailing comment kept" in r.text


def test_v3_merge_uses_the_cri_runtime_plugin_of_containerd_2():
    r = ki.merge_config(V3_CONFIG, C21, DEFAULT)
    assert r.schema == 3
    after = tomllib.loads(r.text)
    assert entry(after, 3)["runtime_type"] == "io.containerd.kybernate.v1"
    assert "io.containerd.grpc.v1.cri" not in after["plugins"]
    assert without_ours(after, 3) == tomllib.loads(V3_CONFIG)
    assert '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kybernate]' in r.text


def test_v2_file_on_containerd_2_keeps_its_schema_and_says_it_is_migrated():
    r = ki.merge_config(V2_CONFIG, C21, DEFAULT)
    assert r.schema == 2
    assert any("migrates" in n for n in r.notes)


def test_file_without_version_is_version_1():
    r = ki.merge_config(V1_CONFIG, C16, DEFAULT)
    assert r.schema == 1
    after = tomllib.loads(r.text)
    assert after["plugins"]["cri"]["containerd"]["runtimes"]["kybernate"]["runtime_type"] == ki.RUNTIME_TYPE
    assert without_ours(after, 1) == tomllib.loads(V1_CONFIG)
    assert any("version 1" in n for n in r.notes)


@pytest.mark.parametrize("containerd,schema", [(C16, 2), (C17, 2), (C21, 3)])
def test_missing_file_gets_the_version_of_the_containerd(containerd, schema):
    r = ki.merge_config(None, containerd, DEFAULT)
    parsed = tomllib.loads(r.text)
    assert parsed["version"] == schema
    assert entry(parsed, schema)["runtime_type"] == ki.RUNTIME_TYPE
    assert ki.CREATED_NOTE in r.text


def test_comment_only_file_gets_a_version_line_and_keeps_its_comments():
    text = "# managed by hand\n\n"
    r = ki.merge_config(text, C17, DEFAULT)
    assert r.text.startswith(text)
    assert tomllib.loads(r.text)["version"] == 2
    assert ki.CREATED_NOTE not in r.text
    assert ki.unmerge_config(r.text) == (text, True)


def test_merge_is_idempotent():
    once = ki.merge_config(V2_CONFIG, C17, DEFAULT)
    twice = ki.merge_config(once.text, C17, DEFAULT)
    assert twice.text == once.text and not twice.changed
    assert once.text.count(ki.BLOCK_BEGIN) == 1


def test_changed_settings_replace_the_block_in_place():
    first = ki.merge_config(V2_CONFIG, C17, DEFAULT).text
    wanted = ki.RuntimeSettings(binary_name="/usr/local/sbin/runc", systemd_cgroup=True,
                                extra_options=(("CriuImagePath", "/var/lib/kybernate/ckpt"),))
    second = ki.merge_config(first, C17, wanted)
    assert second.changed
    assert second.text.count(ki.BLOCK_BEGIN) == 1
    opts = entry(tomllib.loads(second.text), 2)["options"]
    assert opts == {"BinaryName": "/usr/local/sbin/runc", "SystemdCgroup": True,
                    "CriuImagePath": "/var/lib/kybernate/ckpt"}
    assert ki.unmerge_config(second.text)[0] == V2_CONFIG


def test_operator_edits_after_the_block_survive_a_reinstall():
    merged = ki.merge_config(V2_CONFIG, C17, DEFAULT).text
    edited = merged + '\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
    again = ki.merge_config(edited, C17, DEFAULT)
    assert not again.changed
    parsed = tomllib.loads(ki.unmerge_config(edited)[0])
    assert parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_systemd_cgroup_auto_follows_the_runc_runtime():
    r = ki.merge_config(V2_CONFIG, C17, DEFAULT, systemd_auto=True)
    assert entry(tomllib.loads(r.text), 2)["options"]["SystemdCgroup"] is True
    assert any("SystemdCgroup = true" in n for n in r.notes)
    r3 = ki.merge_config(V3_CONFIG, C21, DEFAULT, systemd_auto=True)
    assert entry(tomllib.loads(r3.text), 3)["options"]["SystemdCgroup"] is False


def test_disabled_cri_plugin_is_reported():
    r = ki.merge_config('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n', C17, DEFAULT)
    assert any("CRI plugin is disabled" in n for n in r.notes)


# ---- refusals -----------------------------------------------------------------------------------
def test_malformed_config_is_refused_with_its_line_number():
    bad = 'version = 2\nroot = "/var/lib/containerd"\n\n[plugins."io.containerd.grpc.v1.cri"\n  x = 1\n'
    with pytest.raises(ki.ConfigError) as exc:
        ki.merge_config(bad, C17, DEFAULT, source="/etc/containerd/config.toml")
    assert exc.value.line == 4
    assert "/etc/containerd/config.toml is not valid TOML at line 4" in str(exc.value)


def test_malformed_value_line_number():
    bad = "version = 2\n\n[grpc]\n  address = /run/containerd/containerd.sock\n"
    with pytest.raises(ki.ConfigError) as exc:
        ki.merge_config(bad, C17, DEFAULT)
    assert exc.value.line == 4


def test_version_3_on_containerd_1_is_refused():
    with pytest.raises(ki.ConfigError, match="version 3.*containerd is 1.7.24"):
        ki.merge_config(V3_CONFIG, C17, DEFAULT)


def test_unknown_version_is_refused():
    with pytest.raises(ki.ConfigError, match="unknown config version 7"):
        ki.merge_config("version = 7\n", C21, DEFAULT)


def test_hand_written_kybernate_entry_is_not_overwritten():
    text = V2_CONFIG + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate]\n'
                        '  runtime_type = "io.containerd.kybernate.v1"\n')
    with pytest.raises(ki.ConfigError) as exc:
        ki.merge_config(text, C17, DEFAULT)
    assert exc.value.line == len(V2_CONFIG.splitlines()) + 1
    assert "outside the kybernate block" in str(exc.value)


def test_inline_runtimes_table_is_refused_not_broken():
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n')
    with pytest.raises(ki.ConfigError, match="invalid TOML"):
        ki.merge_config(text, C17, DEFAULT)


def test_damaged_markers_are_refused():
    merged = ki.merge_config(V2_CONFIG, C17, DEFAULT).text
    damaged = merged.replace(ki.BLOCK_END + "\n", "")
    with pytest.raises(ki.ConfigError, match="markers are damaged"):
        ki.merge_config(damaged, C17, DEFAULT)
    with pytest.raises(ki.ConfigError, match="markers are damaged"):
        ki.unmerge_config(damaged)


# ---- unmerge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,containerd", [(V2_CONFIG, C17), (V3_CONFIG, C21), (V1_CONFIG, C16),
                                             ("", C17), ("\n", C21)])
def test_unmerge_restores_the_original_text(text, containerd):
    merged = ki.merge_config(text, containerd, DEFAULT).text
    assert ki.unmerge_config(merged) == (text, True)


def test_unmerge_of_a_created_file_deletes_it():
    merged = ki.merge_config(None, C21, DEFAULT).text
    assert ki.unmerge_config(merged) == (None, True)


def test_unmerge_without_block_changes_nothing():
    assert ki.unmerge_config(V2_CONFIG) == (V2_CONFIG, False)


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
    assert "oom_score = -500" in cfg.read_text() and ki.BLOCK_BEGIN not in cfg.read_text()
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


@pytest.mark.parametrize("name,schema", [("config-v2.toml", 2), ("config-v3.toml", 3)])
def test_snippets_are_what_the_installer_writes(name, schema):
    snippet = tomllib.loads((PACKAGING / "containerd" / name).read_text())
    assert snippet == tomllib.loads(ki.render_entry(schema, DEFAULT))
    assert entry(snippet, schema)["runtime_type"] == "io.containerd.kybernate.v1"


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


def test_created_file_keeps_its_version_when_the_operator_adds_to_it():
    created = ki.merge_config(None, C21, DEFAULT).text
    assert created.startswith("version = 3\n")
    edited = created + '\n[plugins."io.containerd.cri.v1.images".pinned_images]\n  sandbox = "pause:1"\n'
    again = ki.merge_config(edited, C21, DEFAULT)
    assert again.schema == 3 and not again.changed
    rest, changed = ki.unmerge_config(edited)
    assert changed and tomllib.loads(rest)["version"] == 3
    assert tomllib.loads(rest)["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "pause:1"


def test_version_1_file_on_containerd_2_is_refused():
    # containerd 2.1 drops CRI runtimes of a version 1 file (seen with `containerd config dump`).
    with pytest.raises(ki.ConfigError, match="config migrate"):
        ki.merge_config(V1_CONFIG, C21, DEFAULT)


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
