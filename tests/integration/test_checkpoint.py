"""Checkpoint of CPU containers through the shim, on containerd 1.6, 1.7 and 2.1, with containerd's
runc shim (io.containerd.runc.v2) beside ours for comparison where it supports the same thing.

A counter writes its value into its rootfs (/tmp/count, read from the host through the task's bundle)
and to stdout. "Continues" means: after a restore the first value is the one after the checkpointed
value, never a fresh start from 1.
"""
from __future__ import annotations

import json
import secrets

import grpc
import pytest

from criu import validate_image_dir
from criu.images import read_completion

from .checkpoint_support import (EXIT_ANNOTATION, RESTORE_ANNOTATION, EventWatch, api_checkpoint,
                                 bundle_dir, counting_past, freezer_state, log_counts, read_count,
                                 remove, rpc_error_text, run_counter, task_pid, task_status, wait_until)
from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME, RUNC_RUNTIME


def _counting(cd, cid, at_least: int = 5) -> int:
    value = counting_past(cd, cid, at_least - 1)
    assert value is not None, f"the counter of {cid} did not reach {at_least}: {cd.log_tail(20)}"
    return value


def _thawed_and_running(cd, cid) -> None:
    assert task_status(cd, cid) == "RUNNING"
    assert freezer_state(task_pid(cd, cid)) == "THAWED"
    now = read_count(cd, cid)
    assert counting_past(cd, cid, now, 10) is not None, f"{cid} stopped counting at {now}"


def test_container_checkpoint_and_restore_continue_counting(containerd, runtime_name, container_id):
    """containerd's own flow: `ctr c checkpoint --task --rw` (leave running) then, after the task is
    gone, `ctr c restore --live --rw`: the restored counter continues from the checkpointed value."""
    cd, cid = containerd, container_id
    ref = f"kybtest/{cid}:checkpoint"
    run_counter(cd, cid, runtime_name)
    before = _counting(cd, cid)
    with EventWatch(cd) as events:
        cd.ctr("containers", "checkpoint", "--task", "--rw", cid, ref, timeout=120)
        at_checkpoint = read_count(cd, cid)
        assert at_checkpoint >= before
        # leave-running is the default: still counting, not frozen
        _thawed_and_running(cd, cid)
        if runtime_name == KYBERNATE_RUNTIME:
            # containerd's runc shim publishes no /tasks/checkpointed; ours does
            assert events.wait("/tasks/checkpointed", cid), events.lines
    assert ref in cd.ctr("images", "ls", "-q").stdout.split()
    remove(cd, cid)
    try:
        cd.ctr("containers", "restore", "--live", "--rw", cid, ref, timeout=120)
        assert wait_until(lambda: task_status(cd, cid) == "RUNNING", 10), cd.ctr("tasks", "ls").stdout
        first = wait_until(lambda: (lambda n: n if n > 0 else None)(read_count(cd, cid)), 10)
        # the rw layer came back with the count at checkpoint time; the process goes on from there
        assert first is not None and first >= at_checkpoint, (first, at_checkpoint)
        assert counting_past(cd, cid, first, 10) is not None, "the restored counter does not count"
    finally:
        remove(cd, cid)
        cd.ctr("images", "rm", ref, check=False)
    if runtime_name == KYBERNATE_RUNTIME:
        # the restored task's daemon, a fork of the warm template, imported nothing of its own on the
        # way through Create, Start and Delete (each import would sit on an RPC's critical path): it
        # says so when it shuts down (shim.binary.template.PRELOAD, shim.binary.daemon.report_late_imports)
        lines = wait_until(lambda: _late_import_lines(cd, cid), 10)
        assert lines and all(" 0 modules imported after the fork" in line for line in lines), lines


def _late_import_lines(cd, cid) -> list[str]:
    return [line for line in cd.log_text().splitlines()
            if "modules imported after the fork" in line and f" id={cid} " in line]


def _runtime_config(tmp_path, **keys) -> str:
    """A TOML file for `ctr run --runtime-config-path` (runtimeoptions.v1.Options{config_path})."""
    path = tmp_path / f"runtime-{secrets.token_hex(3)}.toml"
    path.write_text("".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items()))
    return str(path)


def test_checkpoint_with_exit_stops_the_task_and_restores(containerd, runtime_name, container_id, tmp_path):
    """exit: the task stops after the checkpoint and its TaskExit is published. runc.v2 gets it from
    `ctr task checkpoint --exit --image-path`; ctr drops both for kybernate, which takes them from the
    annotation kybernate.io/checkpoint-exit and the runtime option CriuImagePath (config file)."""
    cd, cid = containerd, container_id
    log = tmp_path / "before.log"
    if runtime_name == KYBERNATE_RUNTIME:
        images = tmp_path / "images"
        cfg = _runtime_config(tmp_path, CriuImagePath=str(images))
        run_counter(cd, cid, runtime_name, "--annotation", f"{EXIT_ANNOTATION}=true",
                    "--runtime-config-path", cfg, log=log)
        args = ("tasks", "checkpoint", cid)
    else:
        image = tmp_path / "image"
        run_counter(cd, cid, runtime_name, log=log)
        args = ("tasks", "checkpoint", "--exit", "--image-path", str(image), cid)
    _counting(cd, cid)
    with EventWatch(cd) as events:
        cd.ctr(*args, timeout=120)
        exits = events.wait("/tasks/exit", cid)
        assert exits, f"no TaskExit for {cid}: {events.lines}"
        assert '"exit_status":137' in exits[0].replace(" ", ""), exits  # CRIU kills the dumped tasks
    assert wait_until(lambda: task_status(cd, cid) == "STOPPED", 10), cd.ctr("tasks", "ls").stdout
    last_before = log_counts(log)[-1]
    frozen_value = read_count(cd, cid)
    assert counting_past(cd, cid, frozen_value, 1) is None, "the task still counts after checkpoint --exit"

    if runtime_name == KYBERNATE_RUNTIME:
        found = [d for d in images.rglob("inventory.img")]
        assert len(found) == 1, f"one image under {images}: {found}"
        image = found[0].parent
        assert image.parent == images / cd.namespace / "_" / cid, image   # the store's layout
        assert read_completion(image) is not None, "a successful checkpoint is marked complete"
    validate_image_dir(image)
    cd.ctr("tasks", "delete", cid)
    cd.ctr("containers", "delete", cid)
    if runtime_name != KYBERNATE_RUNTIME:
        return  # ctr has no restore from an image directory for runc.v2

    # restore into a new task of the same id, its stdout to a new log
    log2 = tmp_path / "after.log"
    try:
        run_counter(cd, cid, runtime_name, "--annotation", f"{RESTORE_ANNOTATION}={image}", log=log2)
        first_after = wait_until(lambda: (log_counts(log2) or [None])[0], 10)
        print(f"counter: last value before checkpoint {last_before}, first after restore {first_after}")
        assert first_after == last_before + 1, (last_before, first_after, log2.read_text()[:200])
        assert counting_past(cd, cid, first_after, 10) is not None
    finally:
        remove(cd, cid)


def test_checkpoint_of_a_paused_container(containerd, runtime_name, container_id, tmp_path):
    """Tasks.Checkpoint of a paused task (ctr cannot: it pauses first, and a paused task refuses a
    second pause): the task stays paused; resumed, it goes on; restored, it runs (not frozen)."""
    cd, cid = containerd, container_id
    run_counter(cd, cid, runtime_name)
    _counting(cd, cid)
    cd.ctr("tasks", "pause", cid)
    assert wait_until(lambda: task_status(cd, cid) == "PAUSED", 5)
    paused_at = read_count(cd, cid)
    image = tmp_path / "image"
    api_checkpoint(cd, cid, image_path=str(image))
    validate_image_dir(image)
    assert task_status(cd, cid) == "PAUSED"
    assert freezer_state(task_pid(cd, cid)) == "FROZEN"
    assert counting_past(cd, cid, paused_at, 0.5) is None, "a paused task counted"
    cd.ctr("tasks", "resume", cid)
    assert counting_past(cd, cid, paused_at, 10) is not None, "resumed after checkpoint, it must count"
    remove(cd, cid)
    if runtime_name != KYBERNATE_RUNTIME:
        return
    try:
        run_counter(cd, cid, runtime_name, "--annotation", f"{RESTORE_ANNOTATION}={image}")
        assert wait_until(lambda: task_status(cd, cid) == "RUNNING", 10)
        first = wait_until(lambda: (lambda n: n if n > 0 else None)(read_count(cd, cid)), 10)
        assert first is not None and first >= paused_at
        assert counting_past(cd, cid, first, 10) is not None, "restored from a paused checkpoint: frozen?"
        assert freezer_state(task_pid(cd, cid)) == "THAWED"
    finally:
        remove(cd, cid)


# A TCP connection over the container's own loopback (nc server and client), and the counter.
TCP_COUNTER = ("nc -ll -p 7000 -e /bin/cat & sleep 0.3; sleep 100000 | nc 127.0.0.1 7000 >/dev/null & "
               "i=0; while :; do i=$((i+1)); echo $i > /tmp/count; sleep 0.1; done")


def test_failed_checkpoint_leaves_the_container_running(containerd, runtime_name, container_id, tmp_path):
    """CRIU refuses an established TCP connection unless open_tcp is set. The refused checkpoint
    leaves the task running and thawed, the error quotes CRIU's first error, no image is claimed as
    good; the same checkpoint with open_tcp then succeeds."""
    cd, cid = containerd, container_id
    cd.ctr("run", "-d", "--runtime", runtime_name, BUSYBOX_REF, cid, "sh", "-c", TCP_COUNTER)
    _counting(cd, cid)
    image = tmp_path / "refused"
    with pytest.raises(grpc.RpcError) as refused:
        api_checkpoint(cd, cid, image_path=str(image))
    text = rpc_error_text(refused.value)
    _thawed_and_running(cd, cid)
    if runtime_name == KYBERNATE_RUNTIME:
        assert text.startswith("UNKNOWN: ") or text.startswith("FAILED_PRECONDITION: "), text
        assert f"checkpoint container {cid}" in text, text
        assert "Connected TCP socket, consider using --tcp-established option" in text, text
        assert not image.exists(), f"the refused image dir is left: {list(image.iterdir())}"
        assert (bundle_dir(cd, cid) / "criu-dump.log").is_file(), "CRIU's log is kept in the bundle"
    # ctr's way fails the same (ctr has no flag for open_tcp)...
    r = cd.ctr("tasks", "checkpoint", cid, check=False, timeout=120)
    assert r.returncode != 0
    _thawed_and_running(cd, cid)
    # ...and with open_tcp it succeeds
    good = tmp_path / "good"
    api_checkpoint(cd, cid, image_path=str(good), open_tcp=True)
    validate_image_dir(good)
    _thawed_and_running(cd, cid)
    if runtime_name == KYBERNATE_RUNTIME:
        assert read_completion(good)["meta"]["options"]["open_tcp"] is True


def test_checkpoint_options_are_validated(containerd, container_id, tmp_path):
    """Options CRIU would choke on are refused before anything runs (InvalidArgument)."""
    cd, cid = containerd, container_id
    run_counter(cd, cid, KYBERNATE_RUNTIME)
    _counting(cd, cid)
    with pytest.raises(grpc.RpcError) as bad:
        api_checkpoint(cd, cid, image_path=str(tmp_path / "x"), cgroups_mode="sideways")
    assert bad.value.code() == grpc.StatusCode.INVALID_ARGUMENT, rpc_error_text(bad.value)
    assert cid in bad.value.details() and "sideways" in bad.value.details()
    assert not (tmp_path / "x").exists()
    _thawed_and_running(cd, cid)


def test_criu_plugin_dir_reaches_criu(containerd, container_id, tmp_path):
    """The node's plugin dir (node config criu.plugin_dir) goes to CRIU through the per-task config
    file named by org.criu.config: a directory holding a broken plugin makes CRIU fail, which proves
    CRIU read it. Without it the file names no libdir (CRIU's built-in default); a container asking
    for one by annotation is refused (test_attack_restore.py)."""
    cd, cid = containerd, container_id
    plugins = tmp_path / "plugins"
    plugins.mkdir()
    (plugins / "broken_plugin.so").write_text("not an ELF file\n")
    with cd.node_config(criu={"plugin_dir": str(plugins)}):
        run_counter(cd, cid, KYBERNATE_RUNTIME)
    _counting(cd, cid)
    spec = json.loads((bundle_dir(cd, cid) / "config.json").read_text())
    conf = spec["annotations"]["org.criu.config"]
    assert f"libdir {plugins}" in open(conf).read().splitlines()
    with pytest.raises(grpc.RpcError) as refused:
        api_checkpoint(cd, cid, image_path=str(tmp_path / "img"))
    assert f"Unable to load {plugins}/broken_plugin.so" in refused.value.details(), rpc_error_text(refused.value)
    _thawed_and_running(cd, cid)
    remove(cd, cid)

    other = f"{cid}-default"
    try:
        run_counter(cd, other, KYBERNATE_RUNTIME)
        spec = json.loads((bundle_dir(cd, other) / "config.json").read_text())
        assert "libdir" not in open(spec["annotations"]["org.criu.config"]).read()
    finally:
        remove(cd, other)


def test_checkpoint_note_keeps_containerd_blobs_distinct(containerd, container_id, tmp_path):
    """When the image goes to a directory of the caller's, containerd (for runtimes other than runc)
    still stores its scratch dir as a blob: our note in it keeps two checkpoints from being the same
    blob ("content sha256:...: already exists" on containerd 1.6/1.7)."""
    cd = containerd
    ids = [f"{container_id}-a", f"{container_id}-b"]
    try:
        for cid in ids:
            run_counter(cd, cid, KYBERNATE_RUNTIME)
        for cid in ids:
            _counting(cd, cid)
            image = tmp_path / cid
            api_checkpoint(cd, cid, image_path=str(image))
            validate_image_dir(image)
            assert read_completion(image)["meta"]["container_id"] == cid
    finally:
        for cid in ids:
            remove(cd, cid)
