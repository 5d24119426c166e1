"""The real CRIU on this host: dump and restore a sleeping process, read the real logs.

Runs only when a CRIU binary is found and ``criu check`` passes (the system CRIU 3.17 fails it on
recent kernels; scripts/build-criu.sh installs CRIU 4 into /usr/local/sbin).
"""
import os
import subprocess
import time
from pathlib import Path

import pytest

from criu.logs import BENIGN_ERRORS
from criu import (CriuError, criu_check, criu_version, find_criu, first_error, image_stats,
                  describe_failure, is_complete, locate_log, mark_complete, validate_image_dir)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def criu_any():
    """Any CRIU that runs: enough to see its real error output."""
    if os.geteuid() != 0:
        pytest.skip("real CRIU needs root")
    try:
        return find_criu()
    except CriuError as e:
        pytest.skip(f"no CRIU: {e}")


@pytest.fixture(scope="module")
def criu_bin(criu_any):
    path = criu_any
    ok, text = criu_check(path)
    if not ok:
        last = text.strip().splitlines()[-1] if text.strip() else "(no output)"
        pytest.skip(f"`{path} check` fails (CRIU {'.'.join(map(str, criu_version(path)))}): {last}")
    return path


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_dump_and_restore_sleeping_process(criu_bin, tmp_path):
    img = tmp_path / "img"
    img.mkdir()
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    restored = None
    try:
        time.sleep(0.2)
        r = subprocess.run([str(criu_bin), "dump", "-t", str(proc.pid), "-D", str(img), "-o",
                            "dump.log", "-v4", "--shell-job"], capture_output=True, text=True, timeout=60)
        log = locate_log("dump", None, img)
        assert r.returncode == 0, first_error(log) if log else r.stderr
        assert log == img / "dump.log"
        assert "Dumping finished successfully" in log.read_text(errors="replace")
        assert first_error(log) is None             # benign pr_err lines (RLIMIT_NOFILE) are skipped
        assert proc.wait(timeout=10) != 0          # CRIU killed it after the dump; reaped: pid free again
        stats = validate_image_dir(img)
        assert stats.pages_files >= 1 and stats.page_bytes > 0 and stats.total_bytes > stats.page_bytes
        assert stats == image_stats(img)
        mark_complete(img, {"pid": proc.pid})
        assert is_complete(img)

        r = subprocess.run([str(criu_bin), "restore", "-D", str(img), "-o", "restore.log", "-v4",
                            "-d", "--shell-job"], capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, first_error(img / "restore.log") or r.stderr
        assert "Restore finished successfully" in (img / "restore.log").read_text(errors="replace")
        assert first_error(img / "restore.log") is None
        restored = proc.pid                          # CRIU restores the same pid
        assert _alive(restored)
        assert Path(f"/proc/{restored}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"

        # Restoring again while the pid is taken fails; the real restore.log error is quoted.
        r = subprocess.run([str(criu_bin), "restore", "-D", str(img), "-o", "restore-again.log",
                            "-d", "--shell-job"], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
        err = first_error(img / "restore-again.log")
        assert err is not None and "Error (" in err
        msg = describe_failure("restore", configured=img / "restore-again.log")
        assert err.splitlines()[0] in msg and "restore-again.log" in msg
        print(msg)
    finally:
        for pid in (proc.pid, restored):
            if pid and _alive(pid):
                os.kill(pid, 9)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_real_error_is_quoted(criu_any, tmp_path):
    """Also runs with a CRIU that fails `criu check`: then the error quoted is that failure."""
    img = tmp_path / "img"
    img.mkdir()
    # A pid that existed and is gone: reaped child.
    p = subprocess.Popen(["true"])
    p.wait()
    r = subprocess.run([str(criu_any), "dump", "-t", str(p.pid), "-D", str(img), "-o", "dump.log",
                        "--shell-job"], capture_output=True, text=True, timeout=60)
    assert r.returncode != 0
    log_lines = (img / "dump.log").read_text(errors="replace").splitlines()
    first = next(l for l in log_lines if "Error (" in l and not any(b in l for b in BENIGN_ERRORS))
    err = first_error(img / "dump.log")
    assert err is not None
    assert first.endswith(err.splitlines()[0])       # the line, quoted without its timestamp
    print(err)
    with pytest.raises(Exception):
        validate_image_dir(img)          # only a log in there: not a CRIU image


def test_real_criu_accepts_our_config_file(criu_bin, tmp_path):
    """CRIU parses the file we hand to runc: log-file moves the log, libdir and flags are accepted."""
    from criu import write_runc_criu_config
    img, plugins = tmp_path / "img", tmp_path / "plugins"
    img.mkdir()
    plugins.mkdir()
    log = tmp_path / "from-config.log"
    conf = write_runc_criu_config(tmp_path / "criu-runc.conf", plugin_dir=plugins, log_file=log,
                                  extra_options=["tcp-established", "file-locks", "shell-job",
                                                 ("manage-cgroups", None), "verbosity=4"])
    proc = subprocess.Popen(["sleep", "1000"], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(0.2)
        r = subprocess.run([str(criu_bin), "dump", "-t", str(proc.pid), "-D", str(img), "--config",
                            str(conf)], capture_output=True, text=True, timeout=60)
        assert log.is_file(), r.stderr
        text = log.read_text(errors="replace")
        assert r.returncode == 0, first_error(log)
        assert "Dumping finished successfully" in text
        assert not (img / "dump.log").exists()
        validate_image_dir(img)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_real_criu_rejects_spaces_in_values(criu_bin, tmp_path):
    """Why write_runc_criu_config refuses whitespace: CRIU 4.1.1 rejects quoted values with a space
    depending on where the space falls (this one fails; ``"/tmp/a b.log"`` happens to pass)."""
    conf = tmp_path / "c.conf"
    conf.write_text(f'log-file "{tmp_path}/a b.log"\n')
    r = subprocess.run([str(criu_bin), "check", "--config", str(conf)], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode != 0 and "Unsupported configuration file format" in r.stdout + r.stderr


def test_a_truncated_or_padded_page_image_is_refused_before_criu_runs(criu_bin, tmp_path):
    """CRIU 4.1.1's restorer spins for ever on a page image cut short (issue #14): the sizes the
    pagemaps record are checked first. A real dump of a process with 12 MiB of private memory."""
    import shutil

    from criu import CriuImageError
    from criu.images import expected_page_bytes

    img = tmp_path / "img"
    img.mkdir()
    code = ("import os, time; b = bytearray(12 << 20); b[::4096] = b'x' * (3 << 10); "
            "os.write(1, b'ready'); os.close(1); time.sleep(1000)")
    proc = subprocess.Popen(["python3", "-c", code], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        assert proc.stdout.read() == b"ready"  # its memory is touched before the dump
        proc.stdout.close()
        r = subprocess.run([str(criu_bin), "dump", "-t", str(proc.pid), "-D", str(img), "--shell-job"],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
    finally:
        proc.kill()
        proc.wait()
    expected = expected_page_bytes(img)
    assert expected and sum(expected.values()) >= 12 << 20
    for name, size in expected.items():
        assert (img / name).stat().st_size == size
    validate_image_dir(img)  # whole: accepted
    biggest = max(expected, key=expected.get)
    for cut in (36864, 0, expected[biggest] + 4096):
        bad = tmp_path / f"bad-{cut}"
        shutil.copytree(img, bad)
        os.truncate(bad / biggest, cut)
        with pytest.raises(CriuImageError) as info:
            validate_image_dir(bad)
        assert info.value.reason == "truncated" and biggest in str(info.value)
    bad = tmp_path / "missing"
    shutil.copytree(img, bad)
    (bad / biggest).unlink()
    with pytest.raises(CriuImageError) as info:
        validate_image_dir(bad)
    assert "is missing" in str(info.value)


def test_the_completion_marker_catches_a_page_image_changed_after_the_checkpoint(tmp_path):
    from criu import CriuImageError
    from criu.images import check_page_images

    img = tmp_path / "img"
    img.mkdir()
    (img / "pages-1.img").write_bytes(b"\0" * 8192)
    mark_complete(img)
    check_page_images(img)
    os.truncate(img / "pages-1.img", 4096)
    with pytest.raises(CriuImageError) as info:
        check_page_images(img)
    assert "recorded 8192" in str(info.value)
