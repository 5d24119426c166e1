"""first_error and log location on CRIU-format logs."""
from criu import describe_failure, first_error, locate_log
from criu.logs import first_error_in_lines, log_candidates

DUMP_LOG = """\
(00.000050) Version: 4.1.1 (gitid 0)
(00.000082) Would overwrite RPC settings with values from /b/criu-runc.conf
(00.001000) Warn  (criu/kerndat.c:12): something harmless
(00.012345) Error (criu/cr-dump.c:1234): Can't open /proc/4242/status: No such file or directory
(00.012400) Error (criu/cr-dump.c:2093): Dumping FAILED.
(00.012401) Unlock network
(00.012500) Unfreezing tasks into 1
"""


def test_first_error_with_context(tmp_path):
    p = tmp_path / "dump.log"
    p.write_text(DUMP_LOG)
    assert first_error(p) == ("Error (criu/cr-dump.c:1234): Can't open /proc/4242/status: No such file "
                              "or directory\nError (criu/cr-dump.c:2093): Dumping FAILED.\nUnlock network")
    assert first_error(p, context=0) == ("Error (criu/cr-dump.c:1234): Can't open /proc/4242/status: "
                                         "No such file or directory")


def test_no_error_and_missing_file(tmp_path):
    p = tmp_path / "dump.log"
    p.write_text("(00.1) Dumping finished successfully\n")
    assert first_error(p) is None
    assert first_error(tmp_path / "nope.log") is None


def test_pie_prefix_and_no_stamp_and_binary_junk(tmp_path):
    p = tmp_path / "restore.log"
    p.write_bytes(b"(00.1) comm \xff\xfe\n(00.2) pie: 7: Error (criu/pie/restorer.c:9): boom\n"
                  b"Error (criu/crtools.c:260): Could not initialize\n")
    assert first_error(p, context=1) == ("pie: 7: Error (criu/pie/restorer.c:9): boom\n"
                                         "Error (criu/crtools.c:260): Could not initialize")
    assert first_error_in_lines(["Error (x.c:1): early, before the log was set up"]) == \
        "Error (x.c:1): early, before the log was set up"


def test_locate_log_order(tmp_path):
    img, work = tmp_path / "img", tmp_path / "work"
    img.mkdir()
    work.mkdir()
    assert locate_log("checkpoint", work, img) is None
    (img / "dump.log").write_text("x")
    assert locate_log("dump", work, img) == img / "dump.log"      # runc: no work path -> image path
    (work / "dump.log").write_text("x")
    assert locate_log("dump", work, img) == work / "dump.log"
    conf = tmp_path / "mine.log"
    conf.write_text("x")
    assert locate_log("dump", work, img, configured=conf) == conf
    assert log_candidates("restore", work, None) == [work / "restore.log"]


def test_describe_failure(tmp_path):
    assert "no CRIU log found" in describe_failure("restore", tmp_path)
    (tmp_path / "restore.log").write_text(DUMP_LOG)
    msg = describe_failure("restore", tmp_path)
    assert "/proc/4242/status" in msg and str(tmp_path / "restore.log") in msg


def test_benign_errors_are_skipped(tmp_path):
    """CRIU 4.1.1 logs this pr_err on a dump that then succeeds (seen on this host)."""
    p = tmp_path / "dump.log"
    p.write_text("(00.06) Error (criu/util.c:1533): rlimit: Can't setup RLIMIT_NOFILE for self: "
                 "Operation not permitted\n(00.07) Running pre-dump scripts\n"
                 "(00.12) Dumping finished successfully\n")
    assert first_error(p) is None
    assert first_error(p, context=0, ignore=()).startswith("Error (criu/util.c:1533): rlimit")
    with open(p, "a") as f:
        f.write("(00.13) Error (criu/cr-dump.c:9): real cause\n")
    assert first_error(p, context=0) == "Error (criu/cr-dump.c:9): real cause"
