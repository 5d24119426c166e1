"""The committed proto/ modules are exactly what scripts/gen-proto.sh makes from the .proto files."""

from __future__ import annotations

import difflib
import importlib
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PROTO = REPO / "proto"
GENERATED = ("*_pb2.py", "*_pb2_grpc.py")


def _generated(root: Path) -> dict[str, bytes]:
    out = {}
    for pattern in GENERATED:
        for p in (root / "proto").rglob(pattern):
            if "__pycache__" not in p.parts:
                out[str(p.relative_to(root))] = p.read_bytes()
    return out


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("regen")
    res = subprocess.run(["bash", str(REPO / "scripts/gen-proto.sh"), str(out)],
                         capture_output=True, text=True, cwd=REPO)
    assert res.returncode == 0, f"gen-proto.sh failed:\n{res.stdout}\n{res.stderr}"
    return out


def test_committed_modules_match_a_fresh_generation(regenerated):
    fresh = _generated(regenerated)
    committed = _generated(REPO)
    assert fresh, "gen-proto.sh generated nothing"
    missing = sorted(set(fresh) - set(committed))
    stale = sorted(set(committed) - set(fresh))
    assert not missing, f"not generated/committed, run `make proto`: {missing}"
    assert not stale, f"modules without a .proto (stale), run `make proto`: {stale}"
    changed = []
    for name in sorted(fresh):
        if fresh[name] != committed[name]:
            diff = difflib.unified_diff(committed[name].decode(errors="replace").splitlines(),
                                        fresh[name].decode(errors="replace").splitlines(),
                                        "committed/" + name, "fresh/" + name, lineterm="", n=1)
            changed.append("\n".join(list(diff)[:20]))
    assert not changed, "committed modules differ from a fresh `make proto`:\n" + "\n".join(changed)


def test_every_proto_has_its_module_and_every_dir_is_a_package():
    protos = sorted(PROTO.rglob("*.proto"))
    assert protos
    for p in protos:
        assert p.with_name(p.stem + "_pb2.py").exists(), f"{p} has no generated module"
    for d in [PROTO, *(p for p in PROTO.rglob("*") if p.is_dir() and p.name != "__pycache__")]:
        assert (d / "__init__.py").exists(), f"{d} is not a package"


def test_generation_detects_a_changed_proto(tmp_path):
    """The drift check is not vacuous: a changed .proto gives a different module."""
    work = tmp_path / "tree"
    (work / "scripts").mkdir(parents=True)
    (work / "scripts/gen-proto.sh").write_bytes((REPO / "scripts/gen-proto.sh").read_bytes())
    src = PROTO / "containerd/types/mount.proto"
    dst = work / "proto/containerd/types/mount.proto"
    dst.parent.mkdir(parents=True)
    dst.write_text(src.read_text().replace("repeated string options = 4;", "repeated string options = 5;"))
    env_py = REPO / ".venv/bin/python"
    res = subprocess.run(["bash", str(work / "scripts/gen-proto.sh"), str(tmp_path / "out")],
                         capture_output=True, text=True, env={"PY": str(env_py), "PATH": "/usr/bin:/bin"})
    assert res.returncode == 0, res.stderr
    changed = (tmp_path / "out/proto/containerd/types/mount_pb2.py").read_bytes()
    assert changed != (PROTO / "containerd/types/mount_pb2.py").read_bytes()


def test_every_generated_module_imports():
    names = sorted(str(p.relative_to(REPO).with_suffix("")).replace("/", ".")
                   for pattern in GENERATED for p in PROTO.rglob(pattern) if "__pycache__" not in p.parts)
    for name in names:
        importlib.import_module(name)
