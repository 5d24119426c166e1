"""CheckpointPlan / RestorePlan -> runc argv (flags of runc 1.1.5)."""
from types import SimpleNamespace

import pytest

from criu import CheckpointPlan, RestorePlan


def test_defaults_leave_running():
    assert CheckpointPlan("c1", "/img").args() == ["checkpoint", "--image-path", "/img",
                                                  "--leave-running", "c1"]


def test_exit_drops_leave_running_and_all_flags_in_order():
    plan = CheckpointPlan("c1", "/img", work_path="/work", exit=True, open_tcp=True,
                          external_unix_sockets=True, terminal=True, file_locks=True,
                          empty_namespaces=["network"], cgroups_mode="full")
    assert plan.args() == ["checkpoint", "--image-path", "/img", "--work-path", "/work",
                           "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                           "--manage-cgroups-mode", "full", "--empty-ns", "network", "c1"]


def test_empty_ns_repeated():
    args = CheckpointPlan("c", "/i", empty_namespaces=("network", "ipc")).args()
    assert args[args.index("--empty-ns"):-1] == ["--empty-ns", "network", "--empty-ns", "ipc"]


def test_explicit_leave_running_false_and_contradiction():
    assert "--leave-running" not in CheckpointPlan("c", "/i", leave_running=False).args()
    with pytest.raises(ValueError):
        CheckpointPlan("c", "/i", exit=True, leave_running=True)


@pytest.mark.parametrize("kw", [dict(container_id=""), dict(image_path=""),
                                dict(cgroups_mode="bogus"), dict(container_id="--x"),
                                dict(empty_namespaces=("",))])
def test_invalid(kw):
    base = dict(container_id="c", image_path="/i")
    base.update(kw)
    with pytest.raises(ValueError):
        CheckpointPlan(**base)


def test_from_options_like_containerd():
    opts = SimpleNamespace(exit=True, open_tcp=True, external_unix_sockets=False, terminal=False,
                           file_locks=True, empty_namespaces=["network"], cgroups_mode="soft",
                           image_path="", work_path="")
    plan = CheckpointPlan.from_options("c", opts, path="/req/path", work_path="/scratch")
    assert plan.image_path == "/req/path" and plan.work_path == "/scratch"
    assert plan.exit and plan.open_tcp and plan.file_locks and not plan.keeps_running
    assert plan.empty_namespaces == ("network",)
    opts.image_path, opts.work_path = "/opt/img", "/opt/work"
    plan = CheckpointPlan.from_options("c", opts, path="/req/path", work_path="/scratch")
    assert (plan.image_path, plan.work_path) == ("/opt/img", "/opt/work")
    # No options at all (ctr with a non-runc runtime): only the request path.
    plan = CheckpointPlan.from_options("c", None, path="/req")
    assert plan.args() == ["checkpoint", "--image-path", "/req", "--leave-running", "c"]


def test_restore_minimal_matches_containerd():
    plan = RestorePlan("c1", bundle="/b", image_path="/img", pid_file="/b/init.pid", work_path="/w")
    assert plan.args() == ["restore", "--detach", "--bundle", "/b", "--image-path", "/img",
                           "--work-path", "/w", "--pid-file", "/b/init.pid", "--no-subreaper", "c1"]


def test_restore_from_checkpoint_plan_carries_criu_options():
    cp = CheckpointPlan("c1", "/img", open_tcp=True, external_unix_sockets=True, terminal=True,
                        file_locks=True, cgroups_mode="soft", empty_namespaces=("network",))
    r = cp.restore_plan(bundle="/b", pid_file="/p", console_socket="/s.sock")
    assert r.args() == ["restore", "--detach", "--bundle", "/b", "--image-path", "/img",
                        "--pid-file", "/p", "--no-subreaper", "--tcp-established", "--ext-unix-sk",
                        "--shell-job", "--file-locks", "--manage-cgroups-mode", "soft",
                        "--empty-ns", "network", "--console-socket", "/s.sock", "c1"]


def test_restore_requires_bundle_and_pidfile():
    with pytest.raises(ValueError):
        RestorePlan("c", bundle="", image_path="/i", pid_file="/p")
    with pytest.raises(ValueError):
        RestorePlan("c", bundle="/b", image_path="/i", pid_file="")


def test_flags_exist_in_installed_runc():
    """Every flag we emit is listed by this host's `runc checkpoint/restore --help`."""
    import shutil
    import subprocess
    runc = shutil.which("runc") or "/usr/sbin/runc"
    if not shutil.os.path.exists(runc):
        pytest.skip("runc not installed")
    cp = CheckpointPlan("c", "/i", work_path="/w", exit=True, open_tcp=True, external_unix_sockets=True,
                        terminal=True, file_locks=True, cgroups_mode="soft", empty_namespaces=("network",))
    rs = cp.restore_plan(bundle="/b", pid_file="/p", console_socket="/s")
    for sub, args in (("checkpoint", cp.args()), ("restore", rs.args())):
        help_text = subprocess.run([runc, sub, "--help"], capture_output=True, text=True).stdout
        for a in args:
            if a.startswith("--"):
                assert a in help_text, (sub, a)
