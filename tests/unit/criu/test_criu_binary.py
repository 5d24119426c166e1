"""find_criu / criu_version / require_criu4 / criu_check against fake CRIU binaries."""
import stat
from pathlib import Path

import pytest

from criu import CriuError, criu_check, criu_version, find_criu, parse_version, require_criu4


def fake_criu(d: Path, version_text: str, check_rc: int = 0, check_text: str = "Looks good.") -> Path:
    d.mkdir(parents=True, exist_ok=True)
    p = d / "criu"
    p.write_text("#!/bin/sh\n"
                 f'if [ "$1" = "--version" ]; then printf "%s\\n" "{version_text}"; exit 0; fi\n'
                 f'if [ "$1" = "check" ]; then echo "{check_text}"; exit {check_rc}; fi\n'
                 "exit 2\n")
    p.chmod(p.stat().st_mode | stat.S_IXUSR)
    return p


def test_parse_version_forms():
    assert parse_version("Version: 3.17.1\n") == (3, 17, 1)
    assert parse_version("Version: 4.1\nGitID: v4.1-12-gabc\n") == (4, 1, 0)
    assert parse_version("Version: 4.1.1-dirty") == (4, 1, 1)
    with pytest.raises(CriuError):
        parse_version("criu: unrecognized option")


def test_explicit_path_wins_over_path(tmp_path):
    a = fake_criu(tmp_path / "a", "Version: 3.17.1")
    b = fake_criu(tmp_path / "b", "Version: 4.1.1")
    assert find_criu(b, path_env=str(a.parent), extra_dirs=()) == b


def test_explicit_missing_is_an_error_not_a_fallback(tmp_path):
    fake_criu(tmp_path / "a", "Version: 4.1.1")
    with pytest.raises(CriuError, match="CriuPath"):
        find_criu(tmp_path / "nope" / "criu", path_env=str(tmp_path / "a"), extra_dirs=())


def test_path_order_then_fallback_dirs(tmp_path):
    a = fake_criu(tmp_path / "a", "Version: 4.0")
    b = fake_criu(tmp_path / "b", "Version: 4.1")
    assert find_criu(path_env=f"{tmp_path / 'empty'}:{b.parent}:{a.parent}", extra_dirs=()) == b
    # Not on PATH at all: found in the fallback dirs (containerd's PATH often lacks sbin).
    assert find_criu(path_env="/nonexistent", extra_dirs=(str(a.parent),)) == a


def test_not_executable_is_skipped(tmp_path):
    a = fake_criu(tmp_path / "a", "Version: 4.1")
    a.chmod(0o644)
    b = fake_criu(tmp_path / "b", "Version: 4.1")
    assert find_criu(path_env=f"{a.parent}:{b.parent}", extra_dirs=()) == b


def test_not_found_message_says_how_to_get_it(tmp_path):
    with pytest.raises(CriuError, match="scripts/build-criu.sh"):
        find_criu(path_env=str(tmp_path), extra_dirs=(str(tmp_path / "x"),))


def test_version_and_require(tmp_path):
    old = fake_criu(tmp_path / "old", "Version: 3.17.1")
    new = fake_criu(tmp_path / "new", "Version: 4.1.1")
    assert criu_version(old) == (3, 17, 1)
    assert require_criu4(new) == (4, 1, 1)
    with pytest.raises(CriuError) as ei:
        require_criu4(old)
    msg = str(ei.value)
    assert "3.17.1" in msg and str(old) in msg and "4.x" in msg and "scripts/build-criu.sh" in msg


def test_version_of_broken_binary(tmp_path):
    p = tmp_path / "criu"
    p.write_text("#!/bin/sh\necho boom; exit 3\n")
    p.chmod(0o755)
    with pytest.raises(CriuError, match="exited 3"):
        criu_version(p)
    with pytest.raises(CriuError):
        criu_version(tmp_path / "absent")


def test_criu_check(tmp_path):
    good = fake_criu(tmp_path / "g", "Version: 4.1", 0, "Looks good.")
    bad = fake_criu(tmp_path / "b", "Version: 3.17.1", 1, "Error (criu/vdso.c:613): vdso: Failed")
    assert criu_check(good) == (True, "Looks good.")
    ok, text = criu_check(bad)
    assert not ok and "vdso" in text
    ok, text = criu_check(tmp_path / "absent")
    assert not ok and "absent" in text
