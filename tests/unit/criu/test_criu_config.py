"""The CRIU config file runc hands to CRIU, and the org.criu.config annotation."""
import json

import pytest

from criu import (CRIU_CONFIG_ANNOTATION, RUNC_DEFAULT_CONFIG, annotate_bundle, criu_config_of,
                  render_criu_config, set_criu_config_annotation, write_runc_criu_config)
from criu.config import parse_criu_config


def test_render_lines_without_dashes(tmp_path):
    p = write_runc_criu_config(tmp_path / "c.conf", plugin_dir="/usr/local/lib/criu",
                               log_file="/run/k/dump.log",
                               extra_options=["tcp-established", "--enable-external-masters",
                                              "ext-mount-map auto", ("manage-cgroups", None)])
    lines = [l for l in p.read_text().splitlines() if not l.startswith("#")]
    assert lines == ["libdir /usr/local/lib/criu", "log-file /run/k/dump.log", "tcp-established",
                     "enable-external-masters", "ext-mount-map auto", "manage-cgroups"]
    assert oct(p.stat().st_mode & 0o777) == "0o644"


def test_empty_value_and_roundtrip():
    text = render_criu_config(log_file="/run/k/dump.log", extra_options=[("lsm-profile", "")])
    assert 'lsm-profile ""' in text
    assert parse_criu_config(text) == [("log-file", "/run/k/dump.log"), ("lsm-profile", "")]


@pytest.mark.parametrize("bad", [("log-file", "a\nb"), ("", "x"), ("two words", None),
                                 ("log-file", "/tmp/a b.log"), ("log-file", "/tmp/x#y.log"),
                                 ("lsm-profile", 'x"y'), "log-file /a b"])
def test_bad_options_refused(bad):
    with pytest.raises(ValueError):
        render_criu_config(extra_options=[bad])


def test_empty_config_is_just_a_comment():
    assert parse_criu_config(render_criu_config()) == []


def test_annotation_set_update_remove():
    spec = {"ociVersion": "1.0.2"}
    set_criu_config_annotation(spec, "/b/criu-runc.conf")
    assert spec["annotations"] == {CRIU_CONFIG_ANNOTATION: "/b/criu-runc.conf"}
    assert criu_config_of(spec) == "/b/criu-runc.conf"
    spec["annotations"]["other"] = "kept"
    set_criu_config_annotation(spec, "/c.conf")
    assert spec["annotations"] == {CRIU_CONFIG_ANNOTATION: "/c.conf", "other": "kept"}
    set_criu_config_annotation(spec, None)
    assert spec["annotations"] == {"other": "kept"}
    assert criu_config_of(spec) == RUNC_DEFAULT_CONFIG
    # runc: an empty annotation means "no config file at all", not the default.
    assert criu_config_of({"annotations": {CRIU_CONFIG_ANNOTATION: ""}}) == ""


def test_annotate_bundle_in_place(tmp_path):
    spec = {"ociVersion": "1.0.2", "process": {"args": ["sh"]}, "annotations": None}
    (tmp_path / "config.json").write_text(json.dumps(spec))
    (tmp_path / "config.json").chmod(0o600)
    annotate_bundle(tmp_path, tmp_path / "criu-runc.conf")
    got = json.loads((tmp_path / "config.json").read_text())
    assert got["process"] == {"args": ["sh"]}
    assert got["annotations"] == {CRIU_CONFIG_ANNOTATION: str(tmp_path / "criu-runc.conf")}
    assert (tmp_path / "config.json").stat().st_mode & 0o777 == 0o600
    assert [p.name for p in tmp_path.iterdir()] == ["config.json"]  # no temp file left behind
