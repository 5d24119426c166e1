"""Checkpoint ids: one name for a checkpoint in every tier and on every node.

``20261129T021528Z-3f9a1c2e``: the UTC time of the checkpoint (so names sort by age, as the
store's always did) and 32 random bits (two nodes checkpointing in the same second share a registry
repository). It is a directory name in the tiers and a tag in the registry (the distribution spec
allows ``[A-Za-z0-9_][A-Za-z0-9._-]{0,127}``), and it is what a pod names in kybernate.io/restore-from,
so `ID` is also the check of untrusted input.
"""
from __future__ import annotations

import os
import re
import time
from typing import Optional

ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{8}")


def new_id(now: Optional[float] = None) -> str:
    return time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now)) + "-" + os.urandom(4).hex()


def is_id(text: object) -> bool:
    return isinstance(text, str) and ID.fullmatch(text) is not None
