"""A container's GPU settings from its annotations (untrusted: each is checked, a bad one refused
with its key and value, and an audit line)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

from ttrpc.codes import Code

from shim.policy.audit import refuse

LOCK_TIMEOUT_ANNOTATION = "kybernate.io/cuda-lock-timeout-ms"
PAUSE_ANNOTATION = "kybernate.io/gpu-pause"  # "release" (default) or "keep"
GPU_MAP_ANNOTATION = "kybernate.io/gpu-map"  # OLD_UUID=NEW_UUID,... for a restore onto other GPUs
DEFAULT_LOCK_TIMEOUT_MS = 10_000  # cuda_bindings' default; 0 would wait forever inside a long kernel


def parse_gpu_map(text: str) -> dict[str, str]:
    """'OLD=NEW,OLD2=NEW2' (UUIDs as nvidia-smi prints them) -> {OLD: NEW}."""
    pairs: dict[str, str] = {}
    for item in text.split(","):
        if not item.strip():
            continue
        old, sep, new = item.partition("=")
        if not sep or not old.strip() or not new.strip():
            raise ValueError(f"expected OLD_UUID=NEW_UUID[,...], got {item!r}")
        pairs[old.strip()] = new.strip()
    return pairs


@dataclass(frozen=True)
class GpuSettings:
    lock_timeout_ms: int = DEFAULT_LOCK_TIMEOUT_MS
    release_on_pause: bool = True
    gpu_map: Optional[dict] = None

    @classmethod
    def from_spec(cls, spec: Mapping, container_id: str) -> "GpuSettings":
        """From config.json's annotations, at Create; a malformed one refuses the Create
        (InvalidArgument naming the key and value, and an audit line)."""
        annotations = spec.get("annotations") if isinstance(spec, Mapping) else None
        annotations = annotations if isinstance(annotations, Mapping) else {}

        def refuse_(key: str, why: str):
            return refuse(Code.INVALID_ARGUMENT, container_id, key, annotations.get(key), why)

        timeout = DEFAULT_LOCK_TIMEOUT_MS
        raw = annotations.get(LOCK_TIMEOUT_ANNOTATION)
        if raw not in (None, ""):
            try:
                timeout = int(str(raw).strip())
            except ValueError:
                raise refuse_(LOCK_TIMEOUT_ANNOTATION, "not an integer number of milliseconds") from None
            if not 0 < timeout <= 0xFFFFFFFF:
                raise refuse_(LOCK_TIMEOUT_ANNOTATION, "must be between 1 and 4294967295 ms "
                                                      "(0, wait forever, is not allowed)")
        mode = str(annotations.get(PAUSE_ANNOTATION) or "release").strip().lower()
        if mode not in ("release", "keep"):
            raise refuse_(PAUSE_ANNOTATION, "expected 'keep' or 'release'")
        gpu_map = None
        raw = annotations.get(GPU_MAP_ANNOTATION)
        if raw:
            try:
                gpu_map = parse_gpu_map(str(raw))
            except ValueError as exc:
                raise refuse_(GPU_MAP_ANNOTATION, str(exc)) from None
        return cls(timeout, mode == "release", gpu_map or None)

