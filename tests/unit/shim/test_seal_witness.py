"""Seal witnesses (shim.checkpoint.witness): a restore skips re-hashing only files this node hashed,
unchanged since (same inode, size, ctime); any change sends it back to hashing every byte."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from shim.checkpoint import seal as S
from shim.checkpoint.witness import LOCAL_FS, WitnessDir, fs_type

KEY = b"k" * 32
WHO = {"namespace": "default", "container_id": "c1"}

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="witnesses are root's (owner checks)")


@pytest.fixture
def image(tmp_path) -> Path:
    d = tmp_path / "img"
    d.mkdir()
    (d / "inventory.img").write_bytes(b"inv" * 100)
    (d / "pages-1.img").write_bytes(os.urandom(3 << 20))
    return d


@pytest.fixture
def witness(tmp_path) -> WitnessDir:
    fd = os.open(tmp_path, os.O_RDONLY)
    try:
        if fs_type(fd) not in LOCAL_FS:
            pytest.skip("tmp_path is not on a local filesystem")
    finally:
        os.close(fd)
    return WitnessDir(str(tmp_path / "witness"))


def test_an_image_sealed_here_is_vouched_for_and_not_read_again(image, witness, monkeypatch):
    S.seal(str(image), KEY, WHO, witness=witness)
    assert len(os.listdir(witness.path)) == 1
    hashed = []
    real = S._hash_all
    monkeypatch.setattr(S, "_hash_all", lambda *a, **k: hashed.append(1) or real(*a, **k))
    v = S.verify(str(image), KEY, WHO, witness=witness)
    assert v.witnessed and not hashed
    v = S.verify(str(image), KEY, WHO)  # no witness dir: every byte, as before
    assert not v.witnessed and hashed


def test_a_byte_changed_in_place_is_hashed_and_refused(image, witness):
    S.seal(str(image), KEY, WHO, witness=witness)
    time.sleep(0.01)
    fd = os.open(image / "pages-1.img", os.O_WRONLY)
    try:
        os.pwrite(fd, b"\xff", 12345)  # same size, same inode: only ctime moves
    finally:
        os.close(fd)
    with pytest.raises(S.SealError) as err:
        S.verify(str(image), KEY, WHO, witness=witness)
    assert err.value.file == "pages-1.img" and err.value.reason == "content"


def test_a_file_swapped_for_a_copy_is_hashed_then_vouched_for(image, witness):
    S.seal(str(image), KEY, WHO, witness=witness)
    shutil.copy(image / "pages-1.img", image / "copy")
    os.replace(image / "copy", image / "pages-1.img")  # same bytes, another inode
    v = S.verify(str(image), KEY, WHO, witness=witness)
    assert not v.witnessed  # hashed in full (and matched)
    assert S.verify(str(image), KEY, WHO, witness=witness).witnessed  # noted for the next one


def test_the_same_image_in_another_dir_is_hashed(image, witness, tmp_path):
    S.seal(str(image), KEY, WHO, witness=witness)
    other = tmp_path / "other"
    shutil.copytree(image, other)
    assert not S.verify(str(other), KEY, WHO, witness=witness).witnessed


def test_a_witness_dir_others_may_write_is_not_used(image, witness):
    S.seal(str(image), KEY, WHO, witness=witness)
    os.chmod(witness.path, 0o777)
    assert not S.verify(str(image), KEY, WHO, witness=witness).witnessed


def test_a_forged_witness_file_for_other_inodes_is_not_believed(image, witness):
    S.seal(str(image), KEY, WHO, witness=witness)
    (name,) = os.listdir(witness.path)
    path = Path(witness.path) / name
    text = path.read_text()
    import json
    doc = json.loads(text)
    doc["files"]["pages-1.img"][1] += 1  # another inode
    path.write_text(json.dumps(doc))
    assert not S.verify(str(image), KEY, WHO, witness=witness).witnessed
