"""gRPC status codes, which ttrpc carries unchanged in google.rpc.Status.

containerd maps these numbers to its errdefs (NotFound, AlreadyExists, ...), so a shim must use the
same numbers as gRPC for ctr and the CRI plugin to recognise the error kind.
"""
from __future__ import annotations

import enum


class Code(enum.IntEnum):
    OK = 0
    CANCELLED = 1
    UNKNOWN = 2
    INVALID_ARGUMENT = 3
    DEADLINE_EXCEEDED = 4
    NOT_FOUND = 5
    ALREADY_EXISTS = 6
    PERMISSION_DENIED = 7
    RESOURCE_EXHAUSTED = 8
    FAILED_PRECONDITION = 9
    ABORTED = 10
    OUT_OF_RANGE = 11
    UNIMPLEMENTED = 12
    INTERNAL = 13
    UNAVAILABLE = 14
    DATA_LOSS = 15
    UNAUTHENTICATED = 16

    @classmethod
    def from_wire(cls, value: int) -> "Code":
        """A peer may send a code we do not know; gRPC's rule is to treat it as UNKNOWN."""
        try:
            return cls(value)
        except ValueError:
            return cls.UNKNOWN
