"""containerd_toml: our runtime merged into config.toml text and taken out again. Other runtimes and
settings kept, v1/v2/v3 schemas, idempotence, malformed files refused with the line number."""
import tomllib

import pytest

from config_samples import C16, C17, C21, DEFAULT, V1_CONFIG, V2_CONFIG, V3_CONFIG, entry, without_ours
from installer_module import PACKAGING, load_toml

ct = load_toml()


# ---- merge: text level --------------------------------------------------------------------------
def test_v2_merge_keeps_other_runtimes_and_settings():
    r = ct.merge_config(V2_CONFIG, C17, DEFAULT)
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
    r = ct.merge_config(V3_CONFIG, C21, DEFAULT)
    assert r.schema == 3
    after = tomllib.loads(r.text)
    assert entry(after, 3)["runtime_type"] == "io.containerd.kybernate.v1"
    assert "io.containerd.grpc.v1.cri" not in after["plugins"]
    assert without_ours(after, 3) == tomllib.loads(V3_CONFIG)
    assert '[plugins."io.containerd.cri.v1.runtime".containerd.runtimes.kybernate]' in r.text


def test_v2_file_on_containerd_2_keeps_its_schema_and_says_it_is_migrated():
    r = ct.merge_config(V2_CONFIG, C21, DEFAULT)
    assert r.schema == 2
    assert any("migrates" in n for n in r.notes)


def test_file_without_version_is_version_1():
    r = ct.merge_config(V1_CONFIG, C16, DEFAULT)
    assert r.schema == 1
    after = tomllib.loads(r.text)
    assert after["plugins"]["cri"]["containerd"]["runtimes"]["kybernate"]["runtime_type"] == ct.RUNTIME_TYPE
    assert without_ours(after, 1) == tomllib.loads(V1_CONFIG)
    assert any("version 1" in n for n in r.notes)


@pytest.mark.parametrize("containerd,schema", [(C16, 2), (C17, 2), (C21, 3)])
def test_missing_file_gets_the_version_of_the_containerd(containerd, schema):
    r = ct.merge_config(None, containerd, DEFAULT)
    parsed = tomllib.loads(r.text)
    assert parsed["version"] == schema
    assert entry(parsed, schema)["runtime_type"] == ct.RUNTIME_TYPE
    assert ct.CREATED_NOTE in r.text


def test_comment_only_file_gets_a_version_line_and_keeps_its_comments():
    text = "# managed by hand\n\n"
    r = ct.merge_config(text, C17, DEFAULT)
    assert r.text.startswith(text)
    assert tomllib.loads(r.text)["version"] == 2
    assert ct.CREATED_NOTE not in r.text
    assert ct.unmerge_config(r.text) == (text, True)


def test_merge_is_idempotent():
    once = ct.merge_config(V2_CONFIG, C17, DEFAULT)
    twice = ct.merge_config(once.text, C17, DEFAULT)
    assert twice.text == once.text and not twice.changed
    assert once.text.count(ct.BLOCK_BEGIN) == 1


def test_changed_settings_replace_the_block_in_place():
    first = ct.merge_config(V2_CONFIG, C17, DEFAULT).text
    wanted = ct.RuntimeSettings(binary_name="/usr/local/sbin/runc", systemd_cgroup=True,
                                extra_options=(("CriuImagePath", "/var/lib/kybernate/ckpt"),))
    second = ct.merge_config(first, C17, wanted)
    assert second.changed
    assert second.text.count(ct.BLOCK_BEGIN) == 1
    opts = entry(tomllib.loads(second.text), 2)["options"]
    assert opts == {"BinaryName": "/usr/local/sbin/runc", "SystemdCgroup": True,
                    "CriuImagePath": "/var/lib/kybernate/ckpt"}
    assert ct.unmerge_config(second.text)[0] == V2_CONFIG


def test_operator_edits_after_the_block_survive_a_reinstall():
    merged = ct.merge_config(V2_CONFIG, C17, DEFAULT).text
    edited = merged + '\n[plugins."io.containerd.grpc.v1.cri".registry]\n  config_path = "/etc/containerd/certs.d"\n'
    again = ct.merge_config(edited, C17, DEFAULT)
    assert not again.changed
    parsed = tomllib.loads(ct.unmerge_config(edited)[0])
    assert parsed["plugins"]["io.containerd.grpc.v1.cri"]["registry"]["config_path"] == "/etc/containerd/certs.d"


def test_systemd_cgroup_auto_follows_the_runc_runtime():
    r = ct.merge_config(V2_CONFIG, C17, DEFAULT, systemd_auto=True)
    assert entry(tomllib.loads(r.text), 2)["options"]["SystemdCgroup"] is True
    assert any("SystemdCgroup = true" in n for n in r.notes)
    r3 = ct.merge_config(V3_CONFIG, C21, DEFAULT, systemd_auto=True)
    assert entry(tomllib.loads(r3.text), 3)["options"]["SystemdCgroup"] is False


def test_disabled_cri_plugin_is_reported():
    r = ct.merge_config('version = 2\ndisabled_plugins = ["io.containerd.grpc.v1.cri"]\n', C17, DEFAULT)
    assert any("CRI plugin is disabled" in n for n in r.notes)


# ---- refusals -----------------------------------------------------------------------------------
def test_malformed_config_is_refused_with_its_line_number():
    bad = 'version = 2\nroot = "/var/lib/containerd"\n\n[plugins."io.containerd.grpc.v1.cri"\n  x = 1\n'
    with pytest.raises(ct.ConfigError) as exc:
        ct.merge_config(bad, C17, DEFAULT, source="/etc/containerd/config.toml")
    assert exc.value.line == 4
    assert "/etc/containerd/config.toml is not valid TOML at line 4" in str(exc.value)


def test_malformed_value_line_number():
    bad = "version = 2\n\n[grpc]\n  address = /run/containerd/containerd.sock\n"
    with pytest.raises(ct.ConfigError) as exc:
        ct.merge_config(bad, C17, DEFAULT)
    assert exc.value.line == 4


def test_version_3_on_containerd_1_is_refused():
    with pytest.raises(ct.ConfigError, match="version 3.*containerd is 1.7.24"):
        ct.merge_config(V3_CONFIG, C17, DEFAULT)


def test_unknown_version_is_refused():
    with pytest.raises(ct.ConfigError, match="unknown config version 7"):
        ct.merge_config("version = 7\n", C21, DEFAULT)


def test_hand_written_kybernate_entry_is_not_overwritten():
    text = V2_CONFIG + ('[plugins."io.containerd.grpc.v1.cri".containerd.runtimes.kybernate]\n'
                        '  runtime_type = "io.containerd.kybernate.v1"\n')
    with pytest.raises(ct.ConfigError) as exc:
        ct.merge_config(text, C17, DEFAULT)
    assert exc.value.line == len(V2_CONFIG.splitlines()) + 1
    assert "outside the kybernate block" in str(exc.value)


def test_inline_runtimes_table_is_refused_not_broken():
    text = ('version = 2\n[plugins."io.containerd.grpc.v1.cri".containerd]\n'
            '  runtimes = { runc = { runtime_type = "io.containerd.runc.v2" } }\n')
    with pytest.raises(ct.ConfigError, match="invalid TOML"):
        ct.merge_config(text, C17, DEFAULT)


def test_damaged_markers_are_refused():
    merged = ct.merge_config(V2_CONFIG, C17, DEFAULT).text
    damaged = merged.replace(ct.BLOCK_END + "\n", "")
    with pytest.raises(ct.ConfigError, match="markers are damaged"):
        ct.merge_config(damaged, C17, DEFAULT)
    with pytest.raises(ct.ConfigError, match="markers are damaged"):
        ct.unmerge_config(damaged)


# ---- unmerge ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text,containerd", [(V2_CONFIG, C17), (V3_CONFIG, C21), (V1_CONFIG, C16),
                                             ("", C17), ("\n", C21)])
def test_unmerge_restores_the_original_text(text, containerd):
    merged = ct.merge_config(text, containerd, DEFAULT).text
    assert ct.unmerge_config(merged) == (text, True)


def test_unmerge_of_a_created_file_deletes_it():
    merged = ct.merge_config(None, C21, DEFAULT).text
    assert ct.unmerge_config(merged) == (None, True)


def test_unmerge_without_block_changes_nothing():
    assert ct.unmerge_config(V2_CONFIG) == (V2_CONFIG, False)




@pytest.mark.parametrize("name,schema", [("config-v2.toml", 2), ("config-v3.toml", 3)])
def test_snippets_are_what_the_installer_writes(name, schema):
    snippet = tomllib.loads((PACKAGING / "containerd" / name).read_text())
    assert snippet == tomllib.loads(ct.render_entry(schema, DEFAULT))
    assert entry(snippet, schema)["runtime_type"] == "io.containerd.kybernate.v1"



def test_created_file_keeps_its_version_when_the_operator_adds_to_it():
    created = ct.merge_config(None, C21, DEFAULT).text
    assert created.startswith("version = 3\n")
    edited = created + '\n[plugins."io.containerd.cri.v1.images".pinned_images]\n  sandbox = "pause:1"\n'
    again = ct.merge_config(edited, C21, DEFAULT)
    assert again.schema == 3 and not again.changed
    rest, changed = ct.unmerge_config(edited)
    assert changed and tomllib.loads(rest)["version"] == 3
    assert tomllib.loads(rest)["plugins"]["io.containerd.cri.v1.images"]["pinned_images"]["sandbox"] == "pause:1"


def test_version_1_file_on_containerd_2_is_refused():
    # containerd 2.1 drops CRI runtimes of a version 1 file (seen with `containerd config dump`).
    with pytest.raises(ct.ConfigError, match="config migrate"):
        ct.merge_config(V1_CONFIG, C21, DEFAULT)
