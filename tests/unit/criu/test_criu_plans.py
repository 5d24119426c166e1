"""CheckpointPlan / RestorePlan -> runc argv (flags of runc 1.1.5), built the way the checkpoint seam
(shim/checkpoint/seam.py) builds them: every CheckpointOptions field plus a work dir for a checkpoint;
the recorded CRIU options, the task's terminal and no_pivot_root for a restore."""
import shutil
import subprocess

import pytest

from criu import CheckpointPlan, RestorePlan


def seam_checkpoint(**wanted):
    """As seam.checkpoint: containerd's options OR-ed with the annotations, a work dir always."""
    fields = dict(exit=False, open_tcp=False, external_unix_sockets=False, terminal=False, file_locks=False,
                  empty_namespaces=(), cgroups_mode="")
    fields.update(wanted)
    return CheckpointPlan(container_id="c1", image_path="/img", work_path="/bundle/criu-work", **fields)


def seam_restore(**recorded):
    """As seam.restore: the recorded options, the new task's console socket and no_pivot_root."""
    fields = dict(terminal=False, open_tcp=False, external_unix_sockets=False, file_locks=False,
                  cgroups_mode="", console_socket=None, no_pivot=False)
    fields.update(recorded)
    return RestorePlan(container_id="c1", bundle="/b", image_path="/img", pid_file="/b/init.pid",
                       work_path="/b/criu-work", **fields)


def test_checkpoint_leaves_the_task_running_unless_asked_to_exit():
    plan = seam_checkpoint()
    assert plan.keeps_running
    assert plan.args() == ["checkpoint", "--image-path", "/img", "--work-path", "/bundle/criu-work",
                           "--leave-running", "c1"]
    plan = seam_checkpoint(exit=True)
    assert not plan.keeps_running
    assert plan.args() == ["checkpoint", "--image-path", "/img", "--work-path", "/bundle/criu-work", "c1"]


def test_checkpoint_with_every_option_in_order():
    plan = seam_checkpoint(exit=True, open_tcp=True, external_unix_sockets=True, terminal=True,
                           file_locks=True, empty_namespaces=["network"], cgroups_mode="full")
    assert plan.args() == ["checkpoint", "--image-path", "/img", "--work-path", "/bundle/criu-work",
                           "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                           "--manage-cgroups-mode", "full", "--empty-ns", "network", "c1"]
    assert plan.empty_namespaces == ("network",)   # a list from the options becomes a tuple


def test_empty_ns_repeated():
    args = seam_checkpoint(empty_namespaces=("network", "ipc")).args()
    assert args[args.index("--empty-ns"):-1] == ["--empty-ns", "network", "--empty-ns", "ipc"]


@pytest.mark.parametrize("kw,message", [
    (dict(container_id=""), "bad container id"),
    (dict(container_id="--x"), "bad container id"),
    (dict(image_path=""), "image_path is required"),
    (dict(cgroups_mode="bogus"), "unknown cgroups mode 'bogus'"),
    (dict(empty_namespaces=("",)), "bad namespace name '' for --empty-ns"),
    (dict(empty_namespaces=("-x",)), "bad namespace name '-x' for --empty-ns"),
])
def test_invalid_checkpoint(kw, message):
    base = dict(container_id="c", image_path="/i", work_path="/w")
    base.update(kw)
    with pytest.raises(ValueError, match=message):
        CheckpointPlan(**base)


def test_restore_matches_containerds():
    assert seam_restore().args() == ["restore", "--detach", "--bundle", "/b", "--image-path", "/img",
                                     "--work-path", "/b/criu-work", "--pid-file", "/b/init.pid",
                                     "--no-subreaper", "c1"]


def test_restore_carries_the_recorded_criu_options_and_the_console():
    plan = seam_restore(terminal=True, open_tcp=True, external_unix_sockets=True, file_locks=True,
                        cgroups_mode="soft", console_socket="/s.sock", no_pivot=True)
    assert plan.args() == ["restore", "--detach", "--bundle", "/b", "--image-path", "/img",
                           "--work-path", "/b/criu-work", "--pid-file", "/b/init.pid", "--no-subreaper",
                           "--no-pivot", "--tcp-established", "--ext-unix-sk", "--shell-job", "--file-locks",
                           "--manage-cgroups-mode", "soft", "--console-socket", "/s.sock", "c1"]


@pytest.mark.parametrize("kw,message", [
    (dict(bundle=""), "bundle is required"),
    (dict(pid_file=""), "pid_file is required"),
    (dict(image_path=""), "image_path is required"),
    (dict(cgroups_mode="bogus"), "unknown cgroups mode"),
])
def test_invalid_restore(kw, message):
    base = dict(container_id="c", bundle="/b", image_path="/i", pid_file="/p")
    base.update(kw)
    with pytest.raises(ValueError, match=message):
        RestorePlan(**base)


def test_flags_exist_in_installed_runc():
    """Every flag the seam's plans emit is listed by this host's `runc checkpoint/restore --help`."""
    runc = shutil.which("runc") or "/usr/sbin/runc"
    if not shutil.os.path.exists(runc):
        pytest.skip("runc not installed")
    cp = seam_checkpoint(exit=True, open_tcp=True, external_unix_sockets=True, terminal=True, file_locks=True,
                         cgroups_mode="soft", empty_namespaces=("network",))
    rs = seam_restore(terminal=True, open_tcp=True, external_unix_sockets=True, file_locks=True,
                      cgroups_mode="soft", console_socket="/s", no_pivot=True)
    for sub, args in (("checkpoint", cp.args()), ("restore", rs.args())):
        help_text = subprocess.run([runc, sub, "--help"], capture_output=True, text=True).stdout
        for a in args:
            if a.startswith("--"):
                assert a in help_text, (sub, a)
