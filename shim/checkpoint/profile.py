"""The stage profile of one checkpoint or restore: where its time went, in order.

Why: a big GPU container's checkpoint or restore takes seconds, spread over owners that each have
their own lever (the CUDA driver, runc, CRIU's page dump / page read, the seal, our own work). Each
later change names the stage it shortens; this record is how it is measured. The seam keeps one per
operation (`stage` around each step; CRIU's own split from `criu.stats`), logs it as one line:

    container ID: checkpoint profile: total=9.612s layer.before=3.601s runc=5.402s ... | criu: ...

and, for a checkpoint, stores it in the completion record (``profile``), where `kybernate` and the
benchmarks read it. No global state: the object lives as long as the operation.
"""
from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from typing import Iterator, Mapping


@dataclass
class StageProfile:
    """Stages in the order they ran (name, seconds) and CRIU's own numbers (``criu``)."""

    operation: str
    container_id: str
    stages: list[tuple[str, float]] = field(default_factory=list)
    criu: dict[str, float] = field(default_factory=dict)
    _started: float = field(default_factory=time.perf_counter, repr=False)

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[None]:
        """Time the block as stage `name` (recorded also when it raises: a failure's profile shows
        where it stopped)."""
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.add(name, time.perf_counter() - t0)

    def add(self, name: str, seconds: float) -> None:
        self.stages.append((name, round(seconds, 6)))

    def add_criu(self, numbers: Mapping[str, float]) -> None:
        self.criu.update(numbers)

    @property
    def total(self) -> float:
        return round(time.perf_counter() - self._started, 6)

    def as_dict(self) -> dict:
        return {"operation": self.operation, "total_s": self.total,
                "stages": [{"stage": n, "seconds": s} for n, s in self.stages], "criu": dict(self.criu)}

    def line(self) -> str:
        parts = [f"total={self.total:.3f}s"] + [f"{n}={s:.3f}s" for n, s in self.stages]
        text = f"container {self.container_id}: {self.operation} profile: " + " ".join(parts)
        if self.criu:
            text += " | criu: " + json.dumps(self.criu, sort_keys=True, separators=(",", ":"))
        return text
