"""Seal witnesses (shim.checkpoint.witness): a restore skips re-hashing only files this node hashed,
unchanged since (same inode, size, ctime); any change sends it back to hashing every byte."""
from __future__ import annotations

import json
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
    doc = json.loads(text)
    doc["files"]["pages-1.img"][1] += 1  # another inode
    path.write_text(json.dumps(doc))
    assert not S.verify(str(image), KEY, WHO, witness=witness).witnessed


def test_pieces_hashed_while_the_image_grows_are_used_and_give_the_same_seal(tmp_path, monkeypatch):
    """PieceHasher takes the whole pieces of pages-*.img as they are written; the seal made with them
    equals one made from scratch, and reads only the rest."""
    monkeypatch.setattr(S, "PIECE_BYTES", 1 << 20)
    d = tmp_path / "img"
    d.mkdir()
    (d / "inventory.img").write_bytes(b"inv")
    early = S.PieceHasher(str(d), interval_s=0.005).start()
    data = os.urandom((5 << 20) + 123)
    with open(d / "pages-1.img", "wb") as f:  # written front to back, as CRIU does
        for i in range(0, len(data), 256 << 10):
            f.write(data[i:i + (256 << 10)])
            f.flush()
            time.sleep(0.003)
    time.sleep(0.05)
    known = early.stop()
    assert {k[3] for k in known if k[0] == "pages-1.img"} == {0, 1, 2, 3, 4}  # the 5 whole pieces
    read = []
    real = S._hash_piece
    monkeypatch.setattr(S, "_hash_piece", lambda fd, e, i, n: read.append((e.name, i)) or real(fd, e, i, n))
    with_early = json.loads(Path(S.seal(str(d), KEY, WHO, known=known)).read_text())
    assert sorted(read) == [("inventory.img", 0), ("pages-1.img", 5)]  # only what was not taken early
    plain = json.loads(Path(S.seal(str(d), KEY, WHO)).read_text())
    assert with_early["body"]["files"] == plain["body"]["files"]
    S.verify(str(d), KEY, WHO)


def test_an_early_digest_of_another_inode_is_not_used(tmp_path, monkeypatch):
    monkeypatch.setattr(S, "PIECE_BYTES", 1 << 20)
    d = tmp_path / "img"
    d.mkdir()
    (d / "pages-1.img").write_bytes(os.urandom(2 << 20))
    st = os.stat(d / "pages-1.img")
    forged = {("pages-1.img", st.st_dev, st.st_ino + 1, 0): "00" * 32}
    S.seal(str(d), KEY, WHO, known=forged)
    S.verify(str(d), KEY, WHO)  # the forged digest was not taken: the seal matches the bytes
