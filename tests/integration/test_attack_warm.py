"""Attack: reach the warm template and have it spawn something as host root (issue 13).

Played as an attacker would: a root container on the host network (stock runc-v2 runtime, default
capabilities) looks for the template in /proc/net/unix, under its old abstract name and under its
new path, and asks it for a `delete` whose `-bundle` is a directory in the container's own rootfs
with a kybernate.json naming the container's script as the OCI runtime (the old template ran it as
host root). Then the same requests come from the host, from root processes that are not the shim
(this test's python, a static binary). Nothing may be spawned: the marker the script would write
never appears, the foreign host peers are refused with an audit line, and the template still forks
daemons for containerd's own `start` afterwards.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest

from shim.binary import warm
from shim.binary._digest import sha256
from shim.binary.flags import Flags

from .harness import KYBERNATE_RUNTIME, SHIM_BINARY, Containerd

CLIENT_C = r"""
/* attack NAME REQUEST...: connect to the unix socket NAME ('@x' = abstract), send each REQUEST file
 * framed as the warm template reads it (4-byte big-endian length, body, one fd: a listening socket),
 * print what happened. */
#include <errno.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/time.h>
#include <sys/un.h>
#include <unistd.h>

static int target(const char *name, struct sockaddr_un *a) {
    memset(a, 0, sizeof(*a));
    a->sun_family = AF_UNIX;
    size_t n = strlen(name);
    if (n >= sizeof(a->sun_path)) n = sizeof(a->sun_path) - 1;
    memcpy(a->sun_path, name, n);
    if (name[0] == '@') { a->sun_path[0] = 0; return offsetof(struct sockaddr_un, sun_path) + n; }
    return sizeof(*a);
}

int main(int argc, char **argv) {
    for (int i = 2; i < argc; i++) {
        struct sockaddr_un a;
        socklen_t len = target(argv[1], &a);
        int c = socket(AF_UNIX, SOCK_STREAM, 0);
        if (connect(c, (struct sockaddr *)&a, len) < 0) {
            printf("target %s: connect: %s\n", argv[1], strerror(errno));
            return 0;
        }
        printf("target %s: connected\n", argv[1]);
        FILE *f = fopen(argv[i], "rb");
        static char buf[65536];
        size_t body = f ? fread(buf + 4, 1, sizeof(buf) - 4, f) : 0;
        buf[0] = body >> 24; buf[1] = body >> 16; buf[2] = body >> 8; buf[3] = body;
        int l = socket(AF_UNIX, SOCK_STREAM, 0);
        struct sockaddr_un la = {.sun_family = AF_UNIX};
        bind(l, (struct sockaddr *)&la, sizeof(sa_family_t));  /* autobind */
        listen(l, 1);
        char ctl[CMSG_SPACE(sizeof(int))];
        struct iovec iov = {buf, body + 4};
        struct msghdr m = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = ctl, .msg_controllen = sizeof(ctl)};
        struct cmsghdr *cm = CMSG_FIRSTHDR(&m);
        cm->cmsg_level = SOL_SOCKET; cm->cmsg_type = SCM_RIGHTS; cm->cmsg_len = CMSG_LEN(sizeof(int));
        memcpy(CMSG_DATA(cm), &l, sizeof(int));
        if (sendmsg(c, &m, MSG_NOSIGNAL) < 0) printf("target %s: send: %s\n", argv[1], strerror(errno));
        struct timeval tv = {10, 0};
        setsockopt(c, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
        char reply[4096];
        ssize_t r = recv(c, reply, sizeof(reply) - 1, 0);
        reply[r > 0 ? r : 0] = 0;
        printf("target %s: reply: %s\n", argv[1], r > 0 ? reply : "(none)");
        close(c);
        close(l);
    }
    return 0;
}
"""

RUN_SH = """#!/bin/sh
# what an attacker in a --net-host container does: find the template, connect, ask.
# $1: the digest in this containerd's template names (the machine may run other engineers' shims:
# an attack test touches its own target only); then more names to try.
digest=$1
shift
echo "== /proc/net/unix"
grep "$digest" /proc/net/unix
for name in $(awk -v d="$digest" 'index($0, d) {print $NF}' /proc/net/unix) "$@"; do
    /attack/client "$name" /attack/request.old /attack/request.new
done
echo "== done"
"""


@pytest.fixture(scope="module")
def client(tmp_path_factory) -> Path:
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc is None:
        pytest.skip("no C compiler for the attacker's static client")
    d = tmp_path_factory.mktemp("attack-client")
    (d / "client.c").write_text(CLIENT_C)
    subprocess.run([gcc, "-static", "-O2", "-o", str(d / "client"), str(d / "client.c")], check=True,
                   capture_output=True, timeout=120)
    return d / "client"


def _old_request(argv: list[str], cwd: str, env: dict[str, str]) -> bytes:
    """The request the template took before issue 13: argv, cwd and the environment, from the peer."""
    parts = [b"KYBWARM1", cwd.encode(), str(len(argv)).encode(), *[a.encode() for a in argv],
             *[f"{k}={v}".encode() for k, v in env.items()]]
    return b"\0".join(parts)


def _evil_bundle(script_host_path: str, marker: Path) -> dict[str, tuple[bytes, int]]:
    """The files of a bundle whose kybernate.json names a script as the OCI runtime (the old template
    ran `delete` with it as host root); the script writes `marker`."""
    return {
        "kybernate.json": (json.dumps({"binary": script_host_path, "root": str(marker) + "-root"}).encode(), 0o644),
        "runtime.sh": (f"#!/bin/sh\necho pwned by $0 \"$@\" >> {marker}\n".encode(), 0o755),
        "config.json": (b"{}", 0o644),
    }


def _requests(cd: Containerd, bundle: str, script: str, cwd: str) -> tuple[bytes, bytes]:
    old = _old_request([str(SHIM_BINARY), "-namespace", cd.namespace, "-address", cd.address, "-id", "pwn",
                        "-bundle", bundle, "delete"], cwd,
                       {"PATH": "/usr/bin:/bin", "KYBERNATE_RUNTIME": script, "LD_PRELOAD": f"{bundle}/x.so"})
    new = warm.encode_request(Flags(namespace=cd.namespace, id="pwn", address=cd.address), bundle,
                              {"TTRPC_ADDRESS": cd.ttrpc_address, "GRPC_ADDRESS": cd.address})
    return old, new


def _wait_for_template(cd: Containerd, path: str, timeout: float = 60) -> None:
    """A kybernate container starts cold and leaves a template behind for the next one."""
    cid = f"warmup-{secrets.token_hex(3)}"
    cd.ctr("run", "--rm", "--runtime", KYBERNATE_RUNTIME, "docker.io/kybernate/busybox:test", cid, "true",
           timeout=120)
    deadline = time.monotonic() + timeout
    while not (os.path.exists(path) and warm.template_coming(path)):
        assert time.monotonic() < deadline, f"no warm template at {path}"
        time.sleep(0.1)
    time.sleep(0.5)  # its socket is bound after the preload; connectable from here on


def _pids_with(*words: str) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    args = [a.decode(errors="replace") for a in f.read().split(b"\0") if a]
            except OSError:
                continue
            if all(w in args for w in words):
                out.append(int(d))
    return out


def _audit_lines(path: str) -> list[str]:
    try:
        text = Path(warm.log_path(path)).read_text()
    except FileNotFoundError:
        return []
    return [line for line in text.splitlines() if "logger=kybernate.audit" in line]


def _ask_from_host(path: str, body: bytes) -> str:
    """Connect as this test's python (host root, not the shim) and send `body` with a socket."""
    handed = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    handed.bind("")
    handed.listen(1)
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        c.settimeout(10)
        c.connect(path)
        try:
            socket.send_fds(c, [len(body).to_bytes(4, "big") + body], [handed.fileno()])
        except BrokenPipeError:
            pass  # refused before it read: the answer is still there
        return c.recv(4096).decode()
    finally:
        c.close()
        handed.close()


def test_a_host_network_root_container_cannot_reach_the_warm_template(containerd: Containerd, client: Path):
    cd = containerd
    token = secrets.token_hex(3)
    template = warm.template_socket(cd.address, str(SHIM_BINARY))
    old_digest = sha256(f"kybernate-warm\0{cd.address}\0{SHIM_BINARY}".encode()).hexdigest()
    old_abstract = f"@kybernate-warm-{old_digest[:40]}"
    _wait_for_template(cd, template)
    template_pids = _pids_with("-address", cd.address, "warm")
    assert len(template_pids) == 1
    audit_before = len(_audit_lines(template))

    cid = f"attacker-{token}"
    marker = Path("/run") / f"kybattack-{token}.marker"
    rootfs = cd.state / "io.containerd.runtime.v2.task" / cd.namespace / cid / "rootfs"
    evil_host = rootfs / "evil"  # where the container's /evil is, seen from the host
    old, new = _requests(cd, str(evil_host), str(evil_host / "runtime.sh"), str(evil_host))
    files = {f"/evil/{name}": spec for name, spec in _evil_bundle(str(evil_host / "runtime.sh"), marker).items()}
    files.update({"/attack/client": client, "/attack/run.sh": RUN_SH, "/attack/request.old": old,
                  "/attack/request.new": new})
    ref = cd.import_image(f"docker.io/kybernate/attacker:{token}", extra_files=files)
    try:
        r = cd.ctr("run", "--rm", "--net-host", ref, cid, "/attack/run.sh", old_digest[:40], old_abstract,
                   template, check=False, timeout=120)
        out = r.stdout + r.stderr
        assert r.returncode == 0 and "== done" in out, out
        # the attacker finds the template's path: the network namespace lists it ...
        assert template in out.split("== /proc/net/unix", 1)[1].split("target", 1)[0], out
        # ... and cannot connect: the path is not in its mount namespace, the abstract name is unbound
        assert f"target {template}: connect: No such file or directory" in out, out
        assert f"target {old_abstract}: connect: Connection refused" in out, out
        assert "connected" not in out, out
        assert not marker.exists(), marker.read_text()
        assert not _pids_with("-id", "pwn")
        # nothing reached the template: no audit line, and it is the same template
        assert len(_audit_lines(template)) == audit_before
        assert _pids_with("-address", cd.address, "warm") == template_pids
    finally:
        cd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
        cd.ctr("containers", "delete", cid, check=False, timeout=30)
        cd.ctr("images", "rm", ref, check=False, timeout=30)
        for p in (marker, Path(str(marker) + "-root")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()


def test_host_root_processes_that_are_not_the_shim_get_nothing_spawned(containerd: Containerd, client: Path,
                                                                        tmp_path: Path):
    cd = containerd
    token = secrets.token_hex(3)
    template = warm.template_socket(cd.address, str(SHIM_BINARY))
    _wait_for_template(cd, template)
    audit_before = len(_audit_lines(template))
    marker = Path("/run") / f"kybattack-{token}.marker"
    evil = tmp_path / "evil"
    evil.mkdir()
    for name, (data, mode) in _evil_bundle(str(evil / "runtime.sh"), marker).items():
        (evil / name).write_bytes(data)
        (evil / name).chmod(mode)
    old, new = _requests(cd, str(evil), str(evil / "runtime.sh"), str(evil))
    try:
        # this test's python: root, the host's mount namespace, the shim's interpreter, not the shim
        for body in (old, new):
            reply = _ask_from_host(template, body)
            assert reply.startswith(f"refused: peer='pid {os.getpid()} uid 0"), reply
            assert f"its command line does not run the shim binary {SHIM_BINARY}" in reply, reply
        # a static binary run by root on the host: not even the shim's interpreter
        (tmp_path / "request.old").write_bytes(old)
        (tmp_path / "request.new").write_bytes(new)
        r = subprocess.run([str(client), template, str(tmp_path / "request.old"), str(tmp_path / "request.new")],
                           capture_output=True, text=True, timeout=60)
        replies = [line for line in r.stdout.splitlines() if ": reply: " in line]
        assert len(replies) == 2, r.stdout
        assert all("refused: peer='pid" in line and "not this shim's interpreter" in line for line in replies), r.stdout
        time.sleep(1)  # had anything been forked, it would have run by now
        assert not marker.exists(), marker.read_text()
        assert not _pids_with("-id", "pwn")
        audit = _audit_lines(template)[audit_before:]
        assert len(audit) == 4, audit
        assert all("AUDIT refused" in line and "key=peer" in line and "(nothing was started)" in line
                   for line in audit), audit
        # the template is still there and still forks containerd's own shims (the speed-up stays)
        cid = f"after-{token}"
        cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "docker.io/kybernate/busybox:test", cid,
               "sleep", "30", timeout=120)
        try:
            bundle = cd.state / "io.containerd.runtime.v2.task" / cd.namespace / cid
            shim_pid = int((bundle / "shim.pid").read_text())
            deadline = time.monotonic() + 10
            while True:  # a forked daemon shows `SHIM_BINARY -namespace ...`; an exec'd one starts with python
                with open(f"/proc/{shim_pid}/cmdline", "rb") as f:
                    first = f.read().split(b"\0")[0].decode()
                if first == str(SHIM_BINARY) or time.monotonic() > deadline:
                    break
                time.sleep(0.05)
            assert first == str(SHIM_BINARY), f"the shim for {cid} was not forked by the template: {first}"
        finally:
            cd.ctr("tasks", "kill", "-s", "SIGKILL", cid, check=False, timeout=15)
            cd.ctr("tasks", "delete", "-f", cid, check=False, timeout=30)
            cd.ctr("containers", "delete", cid, check=False, timeout=30)
    finally:
        for p in (marker, Path(str(marker) + "-root")):
            if p.is_dir():
                shutil.rmtree(p, ignore_errors=True)
            elif p.exists():
                p.unlink()
