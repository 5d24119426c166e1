"""`kybernate broker serve`: the node broker's process (DaemonSet or systemd).

Settings come from the node config's [broker] section (`shim.policy.node.NodeConfig`, trusted); the
containerd address from the command line. One broker per state dir (flock on STATE_DIR/broker.lock):
a second one exits at once saying which pid holds it. SIGTERM/SIGINT stop it cleanly: fronts closed,
nothing paused or resumed on the way out (a parked container stays parked, its record kept, and the
next broker picks it up).
"""
from __future__ import annotations

import asyncio
import errno
import fcntl
import logging
import os
import signal
from typing import Optional

from . import BrokerError
from .service import Broker, BrokerConfig

log = logging.getLogger("kybernate.broker")


def config_from(node) -> BrokerConfig:
    return BrokerConfig(poll_s=node.broker_poll_s, min_idle_s=node.broker_min_idle_s,
                        silent_wake_s=node.broker_silent_wake_s, wake_timeout_s=node.broker_wake_timeout_s,
                        pause_timeout_s=node.broker_wake_timeout_s)


def take_lock(state_dir: str) -> int:
    os.makedirs(state_dir, mode=0o700, exist_ok=True)
    path = os.path.join(state_dir, "broker.lock")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.read(fd, 32).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise BrokerError(f"another broker (pid {holder}) serves {state_dir}", "unavailable") from None
        raise
    os.ftruncate(fd, 0)
    os.write(fd, f"{os.getpid()}\n".encode())
    return fd


async def serve(address: str, node, readings_file: Optional[str] = None) -> None:
    from .containerd import Containerd
    from .control import ControlServer
    from .notify import KubeEvents, Metrics, Notifier
    from .readings import open_readings
    from .records import Records

    lock = take_lock(node.broker_state_dir)
    readings = open_readings(readings_file)
    containerd = Containerd(address)
    metrics = None
    if node.broker_metrics_address:
        metrics = Metrics()
        metrics.serve(node.broker_metrics_address)
        log.info("metrics on http://%s/metrics", node.broker_metrics_address)
    kube = KubeEvents.in_cluster() if node.broker_kube_events else None
    if kube is not None:
        log.info("Kubernetes pod events through %s", kube.api)
    broker = Broker(containerd, readings, Records(node.broker_state_dir), Notifier(containerd, metrics, kube),
                    config_from(node))
    control = ControlServer(broker, node.broker_socket)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    runner = loop.create_task(broker.run(), name="broker")
    try:
        started = loop.create_task(broker.started.wait())
        await asyncio.wait({runner, started}, return_when=asyncio.FIRST_COMPLETED)
        started.cancel()
        if runner.done():
            runner.result()     # rebuild failed: raise it
        await control.start()
        log.info("broker serving %s (containerd %s, state %s)", node.broker_socket, address, node.broker_state_dir)
        done, _ = await asyncio.wait({runner, loop.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
        if runner in done and runner.exception() is not None:
            raise runner.exception()
    finally:
        await control.close()
        runner.cancel()
        try:
            await runner
        except BaseException:   # noqa: BLE001 - stopping
            pass
        await broker.close()
        await containerd.close()
        if metrics is not None:
            metrics.close()
        os.close(lock)
