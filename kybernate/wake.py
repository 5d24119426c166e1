"""`kybernate wake TARGET` and `kybernate broker serve`: the operator's side of the node broker.

`wake` resolves TARGET as `checkpoint` does (a containerd id in namespace -n, or NAMESPACE/POD[/CONTAINER]
through the CRI plugin), then asks the node's broker over its control socket to make it resident:
the broker parks idle containers first where the GPU lacks room, or answers why it cannot.
"""
from __future__ import annotations

import logging
import sys

from . import OperatorError


def _socket(args) -> str:
    if getattr(args, "socket", None):
        return args.socket
    from shim.policy.node import NodeConfig, NodeConfigError
    try:
        return NodeConfig.load().broker_socket
    except NodeConfigError as exc:
        raise OperatorError(str(exc)) from None


def wake(args) -> int:
    from broker import BrokerError
    from broker.control import call

    from .checkpoint import parse_target, resolve
    from .containerd_api import Containerd

    target = parse_target(args.target, args.namespace or "default")
    with Containerd(args.address) as client:
        target, _ = resolve(client, target)
    try:
        result = call(_socket(args), {"op": "wake", "namespace": target.namespace, "id": target.id},
                      timeout=args.timeout or 300.0)
    except BrokerError as exc:
        raise OperatorError(f"{target}: {exc}", 3 if exc.code == "no-room" else 1) from None
    if args.json:
        import json
        print(json.dumps(result, indent=2))
    elif result.get("already_resident"):
        print(f"{target}: already resident")
    else:
        evicted = result.get("evicted") or []
        print(f"{target}: woken in {result['latency_s']:.3f} s, {result['bytes'] / (1 << 30):.2f} GiB back on "
              f"the GPU" + (f" (parked to make room: {', '.join(evicted)})" if evicted else ""))
    return 0


def serve(args) -> int:
    import asyncio

    from broker import BrokerError
    from broker.main import serve as serve_broker
    from shim.policy.node import NodeConfig, NodeConfigError

    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        node = NodeConfig.load()
    except NodeConfigError as exc:
        raise OperatorError(str(exc)) from None
    try:
        asyncio.run(serve_broker(args.address, node, readings_file=args.gpu_readings))
    except BrokerError as exc:
        raise OperatorError(str(exc)) from None
    except Exception as exc:   # noqa: BLE001 - containerd unreachable, NVML missing: one sentence
        raise OperatorError(f"broker: {exc}") from None
    return 0
