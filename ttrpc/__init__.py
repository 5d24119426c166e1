"""ttrpc for asyncio: containerd's lightweight RPC protocol, stdlib only.

See README.md. The wire layer (`framing`, `messages`, `wire`) is sans-IO; `Server`, `Client` and
`BlockingClient` are thin transports around it.
"""
from .blocking import BlockingClient
from .client import Client
from .codes import Code
from .errors import ConnectionClosed, MessageTooLarge, ProtocolError, TTRPCError
from .framing import MAX_MESSAGE_LENGTH, Frame, FrameDecoder, FrameType, encode_frame
from .server import Server
from .service import RequestContext, Service

__all__ = [
    "BlockingClient", "Client", "Code", "ConnectionClosed", "Frame", "FrameDecoder", "FrameType",
    "MAX_MESSAGE_LENGTH", "MessageTooLarge", "ProtocolError", "RequestContext", "Server", "Service",
    "TTRPCError", "encode_frame",
]
