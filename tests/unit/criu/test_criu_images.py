"""Image dir stats, validation by CRIU's magic numbers, and the completion marker."""
import json
import os
import struct

import pytest

from criu import (COMPLETE_MARKER, CriuImageError, clear_complete, image_stats, is_complete,
                  mark_complete, read_completion, remove_incomplete, validate_image_dir)
from criu.images import IMG_COMMON_MAGIC, INVENTORY_MAGIC, PSTREE_MAGIC


def fake_image(d, pages=(4096, 8192)):
    d.mkdir(parents=True, exist_ok=True)
    (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC) + b"\x08\x02")
    (d / "pstree.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, PSTREE_MAGIC) + b"\0" * 10)
    (d / "core-1.img").write_bytes(struct.pack("<II", IMG_COMMON_MAGIC, 0x55053847) + b"\0" * 100)
    for i, size in enumerate(pages, 1):
        (d / f"pages-{i}.img").write_bytes(b"\xaa" * size)
    return d


def test_stats(tmp_path):
    d = fake_image(tmp_path / "img")
    st = image_stats(d)
    assert st.pages_files == 2 and st.page_bytes == 4096 + 8192
    assert st.files == 5
    assert st.total_bytes == 6 + 18 + 108 + 4096 + 8192


def test_stats_do_not_follow_parent_link(tmp_path):
    parent = fake_image(tmp_path / "parent", pages=(1 << 20,))
    d = fake_image(tmp_path / "img", pages=(4096,))
    os.symlink(parent, d / "parent")
    assert image_stats(d).page_bytes == 4096


def test_valid(tmp_path):
    assert validate_image_dir(fake_image(tmp_path / "img")).pages_files == 2


@pytest.mark.parametrize("setup,reason", [
    (lambda d: None, "missing"),
    (lambda d: d.write_text("x"), "not-a-directory"),
    (lambda d: d.mkdir(), "empty"),
    (lambda d: (d.mkdir(), (d / "dump.log").write_text("x")), "not-criu"),
    (lambda d: (d.mkdir(), (d / "inventory.img").write_bytes(b"\0\0")), "corrupt"),
    (lambda d: (d.mkdir(), (d / "inventory.img").write_bytes(struct.pack("<I", IMG_COMMON_MAGIC))),
     "corrupt"),
    (lambda d: (d.mkdir(), (d / "inventory.img").write_bytes(struct.pack("<I", INVENTORY_MAGIC))),
     "incomplete"),
])
def test_invalid(tmp_path, setup, reason):
    d = tmp_path / "img"
    setup(d)
    with pytest.raises(CriuImageError) as ei:
        validate_image_dir(d)
    assert ei.value.reason == reason and ei.value.path == str(d)
    assert str(d) in str(ei.value)


def test_corrupt_pstree(tmp_path):
    d = fake_image(tmp_path / "img")
    (d / "pstree.img").write_bytes(b"garbage!")
    with pytest.raises(CriuImageError, match="pstree.img is corrupt") as ei:
        validate_image_dir(d)
    assert ei.value.reason == "corrupt"


def test_marker_roundtrip(tmp_path):
    d = fake_image(tmp_path / "img")
    assert not is_complete(d)
    mark_complete(d, {"container": "c1", "criu": "4.1.1"})
    assert is_complete(d)
    doc = read_completion(d)
    assert doc["meta"] == {"container": "c1", "criu": "4.1.1"}
    assert doc["stats"]["page_bytes"] == 4096 + 8192
    assert sorted(p.name for p in d.iterdir() if p.name.startswith(".")) == []
    clear_complete(d)
    assert not is_complete(d)
    clear_complete(d)  # idempotent


def test_marker_garbage_or_no_inventory_is_not_complete(tmp_path):
    d = fake_image(tmp_path / "img")
    (d / COMPLETE_MARKER).write_text("{not json")
    assert not is_complete(d)
    (d / COMPLETE_MARKER).write_text(json.dumps({"version": 99}))
    assert not is_complete(d)
    mark_complete(d)
    (d / "inventory.img").unlink()
    assert not is_complete(d)


def test_remove_incomplete_spares_marked(tmp_path):
    good = fake_image(tmp_path / "good")
    mark_complete(good)
    assert remove_incomplete(good) is False and good.exists()
    bad = fake_image(tmp_path / "bad")
    assert remove_incomplete(bad) is True and not bad.exists()
    assert remove_incomplete(tmp_path / "absent") is False
