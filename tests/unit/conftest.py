"""Unit tests never read the machine's node config (/etc/kybernate): every test gets its own, through
KYBERNATE_CONFIG, naming a seal key of its own, a checkpoint store of its own and pytest's base temp
dir as the restore root (where tests put their images, as the integration harness does)
(`node_config`). A test that wants other settings calls ``node_config.write(...)``."""
from __future__ import annotations

import os
from pathlib import Path

import pytest


class NodeConfigFiles:
    """A node config file and a seal key in a test's tmp dir (root-owned when tests run as root, as
    shim.policy.node and shim.checkpoint.seal require)."""

    def __init__(self, root: Path, restore_root: Path):
        self.root = root
        self.path = root / "kybernate-node.toml"
        self.key_path = root / "seal.key"
        self.store = root / "store"
        self.restore_root = restore_root

    def write(self, require_seal: bool = True, key: bool = True, **checkpoint: object) -> "NodeConfigFiles":
        """The config (and, with key, a fresh key file, mode 0600); extra [checkpoint] settings as TOML values."""
        if key and not self.key_path.exists():
            fd = os.open(self.key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            os.write(fd, os.urandom(32).hex().encode() + b"\n")
            os.close(fd)
        elif not key and self.key_path.exists():
            self.key_path.unlink()
        lines = ["[checkpoint]", f"store = {_toml(str(self.store))}",
                 f"restore_roots = {_toml([str(self.restore_root)])}", f'seal_key_file = "{self.key_path}"',
                 f"require_seal = {'true' if require_seal else 'false'}"]
        lines += [f"{k} = {_toml(v)}" for k, v in checkpoint.items()]
        self.path.write_text("\n".join(lines) + "\n")
        os.chmod(self.path, 0o644)
        return self

    @property
    def key(self) -> bytes:
        return self.key_path.read_bytes().strip()


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return str(value)


@pytest.fixture(autouse=True)
def node_config(tmp_path_factory, monkeypatch) -> NodeConfigFiles:
    files = NodeConfigFiles(tmp_path_factory.mktemp("node"), tmp_path_factory.getbasetemp())
    files.write()
    monkeypatch.setenv("KYBERNATE_CONFIG", str(files.path))
    return files
