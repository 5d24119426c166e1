"""The tier tests' fixtures: a real registry (tests/registry_support.py) per test module, a node
config with tiers in the test's tmp dir, and a fake checkpoint image (files shaped like CRIU's)."""
from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest

from tests.registry_support import FaultProxy, LocalRegistry, unavailable_reason


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    reason = unavailable_reason()
    if reason:
        pytest.skip(reason)
    reg = LocalRegistry(tmp_path_factory.mktemp("reg")).start()
    yield reg
    reg.stop()


@pytest.fixture
def proxy(registry):
    p = FaultProxy(registry).start()
    yield p
    p.stop()


def make_image(path: Path, pages: bytes = b"", files: dict | None = None) -> Path:
    """A checkpoint-shaped directory: an inventory, a pages file, a few small files."""
    path.mkdir(parents=True, mode=0o700)
    (path / "inventory.img").write_bytes(b"\x16\x31\x31\x58" + os.urandom(60))
    (path / "pages-1.img").write_bytes(pages or os.urandom(3 << 20))
    (path / "core-1.img").write_bytes(os.urandom(5000))
    (path / "kybernate-complete.json").write_text('{"version": 1}')
    for name, data in (files or {}).items():
        (path / name).write_bytes(data)
    return path


@pytest.fixture
def tier_node(tmp_path, registry):
    """A NodeConfig with ram and disk tiers in tmp_path and the test registry (plain http, Basic)."""
    from shim.policy.node import NodeConfig

    def make(**over):
        values = dict(checkpoint_store=str(tmp_path / "disk"), store_ram_dir=str(tmp_path / "ram"),
                      store_state_dir=str(tmp_path / "state"), store_registry=registry.reference(f"kyb/t{hashlib.sha1(str(tmp_path).encode()).hexdigest()[:12]}"),
                      store_registry_plain_http=True, store_credentials_file=str(registry.credentials_file),
                      store_chunk_mib=1, store_parallel_transfers=4, store_min_idle_s=0)
        values.update(over)
        for d in ("disk", "ram"):
            (tmp_path / d).mkdir(mode=0o700, exist_ok=True)
        return NodeConfig(**values)
    return make
