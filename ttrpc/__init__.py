"""ttrpc for asyncio: containerd's lightweight RPC protocol, stdlib only.

See README.md. The wire layer (`framing`, `messages`, `wire`) is sans-IO; `Server`, `Client` and
`BlockingClient` are thin transports around it.

The names below are loaded on first use (PEP 562), so that ``import ttrpc.wire`` (the protobuf
field reader the shim's `start` path and CRIU image checks share) does not pull in asyncio and the
server: a few milliseconds instead of over a hundred on the hot path of every ``ctr run``.
"""
from importlib import import_module

_WHERE = {
    "BlockingClient": ".blocking", "Client": ".client", "Code": ".codes",
    "ConnectionClosed": ".errors", "MessageTooLarge": ".errors", "ProtocolError": ".errors", "TTRPCError": ".errors",
    "MAX_MESSAGE_LENGTH": ".framing", "Frame": ".framing", "FrameDecoder": ".framing", "FrameType": ".framing",
    "encode_frame": ".framing", "Server": ".server", "RequestContext": ".service", "Service": ".service",
}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'ttrpc' has no attribute {name!r}")
    value = getattr(import_module(module, __name__), name)
    globals()[name] = value
    return value


def __dir__():
    return sorted(set(globals()) | set(_WHERE))
