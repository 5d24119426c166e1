"""shim.checkpoint.profile: a checkpoint's or restore's stages in order, also when one fails."""
from __future__ import annotations

import pytest

from shim.checkpoint.profile import StageProfile


def test_stages_in_order_and_a_failing_one_is_kept():
    p = StageProfile("checkpoint", "c1")
    with p.stage("gpu.before"):
        pass
    with pytest.raises(RuntimeError):
        with p.stage("runc.checkpoint"):
            raise RuntimeError("CRIU failed")
    p.add_criu({"memwrite_s": 1.5})
    assert [n for n, _ in p.stages] == ["gpu.before", "runc.checkpoint"]
    d = p.as_dict()
    assert d["operation"] == "checkpoint" and d["criu"] == {"memwrite_s": 1.5}
    line = p.line()
    assert line.startswith("container c1: checkpoint profile: total=") and "runc.checkpoint=" in line
    assert '"memwrite_s":1.5' in line
