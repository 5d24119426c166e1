"""The rootfs diff (shim.checkpoint.rootfs_diff): captured from a real overlay mount's upper dir,
applied beneath another rootfs (files, directories, links, deletions, opaque dirs), and refused
where an archive would reach out of the rootfs."""
from __future__ import annotations

import io
import os
import subprocess
import tarfile
from pathlib import Path

import pytest

from shim.checkpoint import rootfs_diff

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root (overlay mount)")


@pytest.fixture
def overlay(tmp_path):
    lower, upper, work, merged = (tmp_path / n for n in ("lower", "upper", "work", "merged"))
    for d in (lower, upper, work, merged):
        d.mkdir()
    (lower / "etc").mkdir()
    (lower / "etc" / "keep").write_text("image")
    (lower / "etc" / "gone").write_text("image")
    (lower / "data").mkdir()
    (lower / "data" / "old").write_text("image")
    subprocess.run(["mount", "-t", "overlay", "overlay", "-o",
                    f"lowerdir={lower},upperdir={upper},workdir={work}", str(merged)], check=True)
    yield lower, merged
    subprocess.run(["umount", str(merged)], check=False)


def _tree(root: Path) -> dict:
    out = {}
    for p in sorted(root.rglob("*")):
        rel = str(p.relative_to(root))
        out[rel] = ("link:" + os.readlink(p)) if p.is_symlink() else ("dir" if p.is_dir() else p.read_text())
    return out


def test_what_the_container_wrote_is_applied_to_a_fresh_rootfs(overlay, tmp_path):
    lower, merged = overlay
    (merged / "tmp").mkdir()
    (merged / "tmp" / "count").write_text("42")
    (merged / "etc" / "gone").unlink()
    (merged / "etc" / "link").symlink_to("/etc/keep")
    os.chmod(merged / "tmp" / "count", 0o640)
    subprocess.run(["rm", "-rf", str(merged / "data")], check=True)
    (merged / "data").mkdir()        # a directory made anew over the image's one: opaque
    (merged / "data" / "new").write_text("mine")
    image = tmp_path / "image"
    image.mkdir()
    assert rootfs_diff.upper_dir(str(merged)) == str(tmp_path / "upper")
    assert rootfs_diff.capture(str(merged), str(image)) >= 4
    fresh = tmp_path / "fresh"
    subprocess.run(["cp", "-a", str(lower), str(fresh)], check=True)
    rootfs_diff.apply(str(image), str(fresh))
    assert _tree(fresh) == _tree(merged)
    assert os.stat(fresh / "tmp" / "count").st_mode & 0o777 == 0o640


def test_a_rootfs_that_is_no_overlay_has_no_diff(tmp_path):
    image = tmp_path / "image"
    image.mkdir()
    assert rootfs_diff.capture(str(tmp_path), str(image)) is None
    assert not (image / rootfs_diff.ARCHIVE_NAME).exists()
    assert rootfs_diff.apply(str(image), str(tmp_path)) == 0


def _archive(image: Path, *members) -> None:
    image.mkdir(exist_ok=True)
    with tarfile.open(image / rootfs_diff.ARCHIVE_NAME, "w") as tar:
        for info, data in members:
            tar.addfile(info, io.BytesIO(data) if data is not None else None)


def _file(name, data=b"x"):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    return info, data


@pytest.mark.parametrize("name", ["../escape", "/abs", "a/../../escape"])
def test_names_that_leave_the_rootfs_are_refused(tmp_path, name):
    root = tmp_path / "root"
    root.mkdir()
    _archive(tmp_path / "image", _file(name))
    with pytest.raises(rootfs_diff.RootfsDiffError):
        rootfs_diff.apply(str(tmp_path / "image"), str(root))
    assert not (tmp_path / "escape").exists()


def test_a_link_in_the_rootfs_never_leads_out_of_it(tmp_path):
    root = tmp_path / "root"
    outside = tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (root / "etc").symlink_to(str(outside))          # absolute: means <root>/<outside> to the container
    link = tarfile.TarInfo("sneaky")
    link.type, link.linkname = tarfile.SYMTYPE, str(outside)
    _archive(tmp_path / "image", _file("etc/passwd", b"pwned"), (link, None), _file("sneaky/x", b"pwned"))
    rootfs_diff.apply(str(tmp_path / "image"), str(root))
    assert list(outside.iterdir()) == []
    assert (root / str(outside).lstrip("/") / "passwd").read_bytes() == b"pwned"   # inside the rootfs


def test_devices_are_left_out(tmp_path):
    root = tmp_path / "root"
    root.mkdir()
    dev = tarfile.TarInfo("dev/evil")
    dev.type, dev.devmajor, dev.devminor = tarfile.CHRTYPE, 1, 3
    _archive(tmp_path / "image", (dev, None))
    rootfs_diff.apply(str(tmp_path / "image"), str(root))
    assert not (root / "dev" / "evil").exists()
