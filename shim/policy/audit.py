"""Refusals of untrusted input: one error sentence for the caller and one audit line for the node.

Every refusal of something a pod, an image or a checkpoint image said goes through `refuse`: the
caller gets a TTRPCError naming the container, the key and the value; the node's log gets a line on
the ``kybernate.audit`` logger with the same facts in a fixed, greppable shape:

    AUDIT refused container=web namespace=k8s.io key=kybernate.io/criu-plugin-dir value='/tmp/x' why=...
"""
from __future__ import annotations

import logging

from ttrpc.codes import Code
from ttrpc.errors import TTRPCError

audit_log = logging.getLogger("kybernate.audit")
MAX_VALUE_CHARS = 200


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= MAX_VALUE_CHARS else text[:MAX_VALUE_CHARS] + "..."


def refuse(code: Code, container_id: str, key: str, value: object, why: str, *, action: str = "create",
           namespace: str = "", detail: str = "") -> TTRPCError:
    """The error to raise for a refused input (InvalidArgument or PermissionDenied, as a rule).
    ``detail``: what the node's audit line adds and the caller must not learn (why a restore source
    was refused: the pod gets one sentence for "missing", "not allowed" and "not an image")."""
    audit_log.warning("AUDIT refused container=%s namespace=%s key=%s value=%s why=%s%s", container_id,
                      namespace or "-", key, _short(value), why, f" detail={detail!r}" if detail else "")
    return TTRPCError(code, f"{action} container {container_id}: {key}={_short(value)}: {why}")


def ignored(container_id: str, key: str, value: object, why: str, namespace: str = "") -> None:
    """An input that is dropped rather than refused (e.g. RESTORE_FROM in an image's env)."""
    audit_log.warning("AUDIT ignored container=%s namespace=%s key=%s value=%s why=%s", container_id,
                      namespace or "-", key, _short(value), why)
