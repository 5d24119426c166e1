"""ttrpc's envelope messages (package `ttrpc` in request.proto, and google.rpc.Status) as frozen
dataclasses with `encode()` / `decode()`.

Field numbers: Request{service=1, method=2, payload=3, timeout_nano=4, metadata=5},
KeyValue{key=1, value=2}, Response{status=1, payload=2}, Status{code=1, message=2, details=3},
Any{type_url=1, value=2}. Unknown fields are skipped (forward compatibility); a known field with the
wrong wire type or bad UTF-8 is a ProtocolError. Proto3 defaults are left out on encoding.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from . import wire
from .codes import Code
from .wire import LENGTH_DELIMITED, VARINT


@dataclass(frozen=True)
class KeyValue:
    key: str
    value: str

    def encode(self) -> bytes:
        out = b""
        if self.key:
            out += wire.encode_string_field(1, self.key)
        if self.value:
            out += wire.encode_string_field(2, self.value)
        return out

    @classmethod
    def decode(cls, data: bytes) -> "KeyValue":
        key = value = ""
        for number, wire_type, raw in wire.iter_fields(data):
            if number == 1:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                key = wire.as_text(number, raw)
            elif number == 2:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                value = wire.as_text(number, raw)
        return cls(key, value)


@dataclass(frozen=True)
class AnyMessage:
    """google.protobuf.Any, for Status.details; kept opaque since ttrpc never interprets it."""

    type_url: str
    value: bytes = b""

    def encode(self) -> bytes:
        out = b""
        if self.type_url:
            out += wire.encode_string_field(1, self.type_url)
        if self.value:
            out += wire.encode_bytes_field(2, self.value)
        return out

    @classmethod
    def decode(cls, data: bytes) -> "AnyMessage":
        type_url, value = "", b""
        for number, wire_type, raw in wire.iter_fields(data):
            if number == 1:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                type_url = wire.as_text(number, raw)
            elif number == 2:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                value = raw
        return cls(type_url, value)


@dataclass(frozen=True)
class Status:
    code: int = Code.OK
    message: str = ""
    details: tuple[AnyMessage, ...] = ()

    def encode(self) -> bytes:
        out = b""
        if self.code:
            out += wire.encode_varint_field(1, int(self.code))
        if self.message:
            out += wire.encode_string_field(2, self.message)
        for detail in self.details:
            out += wire.encode_bytes_field(3, detail.encode())
        return out

    @classmethod
    def decode(cls, data: bytes) -> "Status":
        code, message, details = 0, "", []
        for number, wire_type, raw in wire.iter_fields(data):
            if number == 1:
                wire.expect(number, wire_type, VARINT, raw)
                code = wire.to_int32(raw)
            elif number == 2:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                message = wire.as_text(number, raw)
            elif number == 3:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                details.append(AnyMessage.decode(raw))
        return cls(code, message, tuple(details))


@dataclass(frozen=True)
class Request:
    service: str
    method: str
    payload: bytes = b""
    timeout_nano: int = 0
    metadata: tuple[KeyValue, ...] = ()

    def encode(self) -> bytes:
        out = b""
        if self.service:
            out += wire.encode_string_field(1, self.service)
        if self.method:
            out += wire.encode_string_field(2, self.method)
        if self.payload:
            out += wire.encode_bytes_field(3, self.payload)
        if self.timeout_nano:
            out += wire.encode_varint_field(4, self.timeout_nano)
        for pair in self.metadata:
            out += wire.encode_bytes_field(5, pair.encode())
        return out

    @classmethod
    def decode(cls, data: bytes) -> "Request":
        service = method = ""
        payload = b""
        timeout_nano = 0
        metadata = []
        for number, wire_type, raw in wire.iter_fields(data):
            if number == 1:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                service = wire.as_text(number, raw)
            elif number == 2:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                method = wire.as_text(number, raw)
            elif number == 3:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                payload = raw
            elif number == 4:
                wire.expect(number, wire_type, VARINT, raw)
                timeout_nano = wire.to_int64(raw)
            elif number == 5:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                metadata.append(KeyValue.decode(raw))
        return cls(service, method, payload, timeout_nano, tuple(metadata))


@dataclass(frozen=True)
class Response:
    status: Status = field(default_factory=Status)
    payload: bytes = b""

    def encode(self) -> bytes:
        # Always present, as Go's server sends it: some decoders treat a missing status as odd.
        out = wire.encode_bytes_field(1, self.status.encode())
        if self.payload:
            out += wire.encode_bytes_field(2, self.payload)
        return out

    @classmethod
    def decode(cls, data: bytes) -> "Response":
        status, payload = Status(), b""
        for number, wire_type, raw in wire.iter_fields(data):
            if number == 1:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                status = Status.decode(raw)
            elif number == 2:
                wire.expect(number, wire_type, LENGTH_DELIMITED, raw)
                payload = raw
        return cls(status, payload)
