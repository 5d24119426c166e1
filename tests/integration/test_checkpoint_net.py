"""Checkpoint of a container holding an established TCP connection (containerd 1.6, 1.7, 2.1).

The container joins a network namespace of ours (`ctr run --with-ns network:/var/run/netns/NAME`)
with a veth pair to the host and link-local addresses on the pair only, so the traffic stays between
the two ends. A TCP peer on the host side; in the container busybox `nc ... -e /bin/cat` holds the
connection and echoes what it gets.

CRIU refuses an established connection unless asked (open_tcp / --tcp-established): the refused
checkpoint must leave the container running with its connection working. ctr has no flag for
open_tcp, so the tests ask through containerd's Tasks API (CheckpointOptions.open_tcp), for both
runtimes; for kybernate also through the container annotation kybernate.io/checkpoint-tcp-established.
"""
from __future__ import annotations

import grpc
import pytest

from criu import validate_image_dir

from .checkpoint_support import (RESTORE_ANNOTATION, TCP_ANNOTATION, NetPair, TcpPeer, api_checkpoint,
                                 freezer_state, remove, rpc_error_text, task_pid, task_status,
                                 tcp_client_container, wait_until)
from .harness import BUSYBOX_REF, KYBERNATE_RUNTIME


def _connection_works(peer: TcpPeer, word: str) -> None:
    assert peer.roundtrip(word) == word, f"no echo of {word!r} through the container's connection"


def test_tcp_connection_checkpoint_and_restore(containerd, runtime_name, container_id, tmp_path):
    cd, cid = containerd, container_id
    with NetPair() as net, tcp_client_container(cd, cid, runtime_name, net) as peer:
        _connection_works(peer, "hello")

        # 1. without open_tcp CRIU refuses: the container keeps running, thawed, connection intact
        with pytest.raises(grpc.RpcError) as refused:
            api_checkpoint(cd, cid, image_path=str(tmp_path / "refused"))
        if runtime_name == KYBERNATE_RUNTIME:
            text = rpc_error_text(refused.value)
            assert f"checkpoint container {cid}" in text, text
            assert "Connected TCP socket, consider using --tcp-established option" in text, text
            assert not (tmp_path / "refused").exists()
        assert task_status(cd, cid) == "RUNNING"
        assert freezer_state(task_pid(cd, cid)) == "THAWED"
        _connection_works(peer, "still-there")

        image = tmp_path / "image"
        if runtime_name != KYBERNATE_RUNTIME:
            # 2. runc.v2: with open_tcp, leave running; the connection goes on (no restore from a
            # directory through ctr for runc.v2)
            api_checkpoint(cd, cid, image_path=str(image), open_tcp=True)
            validate_image_dir(image)
            _connection_works(peer, "after-checkpoint")
            remove(cd, cid)
            return

        # 2. kybernate: with open_tcp and exit; the connection is held (no FIN reaches the peer)
        api_checkpoint(cd, cid, image_path=str(image), open_tcp=True, exit=True)
        validate_image_dir(image)
        assert wait_until(lambda: task_status(cd, cid) == "STOPPED", 10)
        assert not peer.peer_closed(), "the checkpointed connection was closed"
        remove(cd, cid)

        # 3. restore in a new container in the same network namespace: the same connection works;
        # the restore takes tcp-established from the image's record of the checkpoint
        restored = f"{cid}-r"
        try:
            cd.ctr("run", "-d", "--runtime", KYBERNATE_RUNTIME, "--with-ns", f"network:{net.path}",
                   "--annotation", f"{RESTORE_ANNOTATION}={image}", "--annotation", f"{TCP_ANNOTATION}=true",
                   BUSYBOX_REF, restored, "nc", net.host_ip, str(peer.port), "-e", "/bin/cat")
            assert task_status(cd, restored) == "RUNNING"
            _connection_works(peer, "after-restore")

            # 4. the annotation asks for tcp-established where ctr cannot: plain `ctr task checkpoint`
            # of the restored container succeeds (leave running) and the connection goes on
            cd.ctr("tasks", "checkpoint", restored, timeout=120)
            _connection_works(peer, "after-second-checkpoint")
            assert task_status(cd, restored) == "RUNNING"
        finally:
            remove(cd, restored)
