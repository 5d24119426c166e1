"""criu.stats: CRIU's stats files and log clock, read into the stage profile's CRIU numbers."""
from __future__ import annotations

import struct

from criu.stats import IMG_SERVICE_MAGIC, STATS_MAGIC, log_clock, parse_stats, read_stats, summary


def _varint(n: int) -> bytes:
    out = b""
    while True:
        b = n & 0x7F
        n >>= 7
        out += bytes([b | (0x80 if n else 0)])
        if not n:
            return out


def _msg(fields: dict[int, int]) -> bytes:
    return b"".join(_varint(k << 3) + _varint(v) for k, v in fields.items())


def _stats_file(which: int, fields: dict[int, int]) -> bytes:
    inner = _msg(fields)
    body = _varint(which << 3 | 2) + _varint(len(inner)) + inner
    return struct.pack("<III", IMG_SERVICE_MAGIC, STATS_MAGIC, len(body)) + body


def test_dump_stats_are_read_by_field_number():
    data = _stats_file(1, {1: 1500, 2: 2_000_000, 3: 1_900_000, 4: 1_800_000, 5: 600_000, 7: 524_288})
    got = parse_stats(data)
    assert got["freezing_us"] == 1500 and got["frozen_us"] == 2_000_000
    assert got["memwrite_us"] == 1_800_000 and got["pages_written"] == 524_288


def test_restore_stats_and_summary(tmp_path):
    (tmp_path / "stats-restore").write_bytes(_stats_file(2, {3: 250, 4: 3_000_000, 5: 262_144}))
    (tmp_path / "restore.log").write_text(
        "(00.000100) Version: 4.1.1\n"
        "(00.050000) pie: 7: Preadv 0x7f0000000000:4096... (3 iovs)\n"
        "pie: 7: no stamp here\n"
        "(02.550000) pie: 7: `- returned 1073741824\n"
        "(02.600000) Restore finished successfully. Tasks resumed.\n")
    numbers = summary("restore", tmp_path, tmp_path / "restore.log")
    assert numbers["restore_s"] == 3.0 and numbers["forking_s"] == 0.00025
    assert numbers["page_bytes"] == 262_144 * 4096
    assert numbers["page_read_s"] == 2.5 and numbers["criu_s"] == 2.6


def test_what_is_not_a_stats_file_gives_nothing(tmp_path):
    assert parse_stats(b"") == {}
    assert parse_stats(struct.pack("<III", 0x54564319, STATS_MAGIC, 0)) == {}
    assert parse_stats(_stats_file(2, {3: 1})[:-1]) == {}  # truncated
    assert read_stats(tmp_path, "dump") == {}
    (tmp_path / "target").write_bytes(_stats_file(1, {1: 5}))
    (tmp_path / "stats-dump").symlink_to(tmp_path / "target")
    assert read_stats(tmp_path, "dump") == {}  # never followed
    assert log_clock(tmp_path / "missing.log") == {}
