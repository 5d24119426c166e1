"""Pack and unpack ``google.protobuf.Any`` the way containerd does.

containerd's typeurl registry marshals protobuf messages into an Any whose ``type_url`` is the bare
full message name (``containerd.runc.v1.Options``), not the ``type.googleapis.com/<name>`` form that
``Any.Pack`` writes. We write the bare form and accept both (and any ``<prefix>/<name>``) on input.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf import any_pb2
from google.protobuf.message import DecodeError, Message

__all__ = ["pack", "unpack", "type_name", "is_type", "TypeMismatch", "DecodeError"]

M = TypeVar("M", bound=Message)


class TypeMismatch(TypeError):
    """The Any holds a different message type than the one asked for."""


def type_name(any_msg: any_pb2.Any) -> str:
    """The full message name an Any's type_url names (its prefix, if any, removed)."""
    return any_msg.type_url.rpartition("/")[2]


def pack(msg: Message) -> any_pb2.Any:
    """An Any holding ``msg`` with containerd's bare type URL (the message's full name)."""
    return any_pb2.Any(type_url=msg.DESCRIPTOR.full_name, value=msg.SerializeToString())


def is_type(any_msg: any_pb2.Any, cls: type[Message]) -> bool:
    """Whether ``any_msg`` holds a ``cls`` (bare or prefixed type URL)."""
    return type_name(any_msg) == cls.DESCRIPTOR.full_name


def unpack(any_msg: any_pb2.Any, cls: type[M]) -> M:
    """Decode ``any_msg`` as ``cls``.

    Raises ``TypeMismatch`` when the type URL names another message and
    ``google.protobuf.message.DecodeError`` when the value does not parse.
    """
    if not is_type(any_msg, cls):
        raise TypeMismatch(
            f"Any holds {any_msg.type_url or '<empty type_url>'!r}, not {cls.DESCRIPTOR.full_name!r}"
        )
    out = cls()
    out.ParseFromString(any_msg.value)
    return out

