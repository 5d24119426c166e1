"""A ttrpc fuzz run against a live shim, on its unix socket, with a container running in it.

Seeded (KYB_FUZZ_SEED, default 14; the seed is in every failure message and in the terminal
summary) and bounded (about 2000 frames, FUZZ_BUDGET seconds). What is sent:
- well-framed requests on long-lived connections: unknown services and methods, envelopes that are
  not protobuf, garbage payloads and messages of the wrong type for real Task methods (v2 and v3),
  even and reused stream ids, client-streaming flags, Data and Response frames from the client,
  odd metadata and timeouts, payloads of up to the 4 MiB limit; after every batch a State of the
  running container on the same connection must still be answered;
- raw random bytes, declared lengths over the limit (up to 4 GiB), frames cut short in the header or
  the data, each on a connection of its own;
- waves of connections opened together and dropped (reset or closed) with nothing, half a frame,
  or a Wait on the running container in flight.
What must hold: every request that is well framed gets one answer, with the code its case allows
and never INTERNAL; a connection whose framing is broken is closed by the shim (after a
RESOURCE_EXHAUSTED for a declared length over the limit); the shim logs no traceback; afterwards it
answers Connect, State and a new exec, its RSS grew less than RSS_BOUND_MIB, its fd count is back
within FD_SLACK of where it was, and no container, cgroup or event exists for anything but the
running container.

Garbage and wrong-typed messages never carry the running container's id to a method that changes
state (a KillRequest read as something else could signal it); Create and Checkpoint only ever see
garbage that names no bundle or path of this host (they trust containerd with both).
"""
from __future__ import annotations

import asyncio
import collections
import os
import random
import socket
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from google.protobuf import empty_pb2
from proto.containerd.task.v2 import shim_pb2 as api
from ttrpc import Code, wire
from ttrpc.framing import MAX_MESSAGE_LENGTH, Flag, Frame, FrameDecoder, FrameType, encode_frame
from ttrpc.messages import KeyValue, Request, Response

from .test_shim_direct import V2, V3, DirectShim, pack_process
from .test_shim_direct import pytestmark as needs_root_shim_and_busybox

pytestmark = [needs_root_shim_and_busybox, pytest.mark.slow]

SEED = int(os.environ.get("KYB_FUZZ_SEED", "14"))
FUZZ_BUDGET = 90.0          # seconds for the whole plan; a shim that slows down under it fails
RSS_BOUND_MIB = 30.0
FD_SLACK = 3
ANSWER_TIMEOUT = 15.0       # for one batch's answers, or for the shim to close a broken connection
LIVE = "fuzz-live"          # must stay RUNNING and untouched: only read-only methods may name it
VICTIM = "fuzz-victim"      # any method but Wait and Checkpoint may name it: paused, killed, deleted...

# How many of each case (about 2000 frames in all; see the module docstring).
CONNECTIONS, BATCHES, BATCH_SIZE = 10, 5, 20   # 1000 well-framed frames (+50 States) on 10 connections
RAW_BLOBS = 100
RANDOM_FRAMES = 150
HUGE_LENGTHS = 150
TRUNCATED = 300
BIG_PAYLOADS = 10                       # 1..4 MiB of garbage to a real method
CHURN_WAVES, CHURN_WAVE_SIZE = 4, 100

MUTATING = ("Create", "Start", "Delete", "Pause", "Resume", "Checkpoint", "Kill", "Exec", "ResizePty",
            "CloseIO", "Update", "Shutdown")
READ_ONLY = ("State", "Pids", "Stats", "Connect")   # Wait on LIVE would never be answered
NEVER_VICTIM = ("Wait", "Checkpoint")   # a Wait could outlast the batch; a checkpoint is CRIU's time
METHODS = MUTATING + READ_ONLY + ("Wait",)
SERVICES = (V2, V3)
MESSAGE_TYPES = (api.CreateTaskRequest, api.StartRequest, api.DeleteRequest, api.PidsRequest, api.PauseRequest,
                 api.ResumeRequest, api.CheckpointTaskRequest, api.KillRequest, api.ExecProcessRequest,
                 api.ResizePtyRequest, api.CloseIORequest, api.UpdateTaskRequest, api.WaitRequest,
                 api.StatsRequest, api.ConnectRequest, api.ShutdownRequest, api.StateRequest)
# any answer but INTERNAL (a handler that raised what it should have mapped to a code)
ANY_CODE = frozenset(Code) - {Code.INTERNAL}


def _rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


@dataclass
class Tally:
    """What the fuzz saw, for the report and the failure messages."""
    frames: int = 0
    codes: collections.Counter = field(default_factory=collections.Counter)
    by_kind: collections.Counter = field(default_factory=collections.Counter)   # (case, code)
    closed_by_shim: int = 0
    not_run: int = 0                   # cases left out because the time budget was spent
    problems: list[str] = field(default_factory=list)

    def problem(self, text: str) -> None:
        if len(self.problems) < 50:
            self.problems.append(text)


class Fuzzer:
    def __init__(self, rng: random.Random, path: str, dead_paths: Path):
        self.rng = rng
        self.path = path
        self.dead = str(dead_paths)   # a directory that does not exist: any path the fuzz names is in it
        self.tally = Tally()
        self.sweep = [(m, cls) for m in METHODS for cls in MESSAGE_TYPES]
        rng.shuffle(self.sweep)
        self.well_framed_count = 0

    # ---- values -----------------------------------------------------------------------------------
    def container_id(self, for_method: str) -> str:
        """LIVE only for a read-only method, VICTIM for any but NEVER_VICTIM, else some name."""
        r = self.rng.random()
        if for_method in READ_ONLY and r < 0.3:
            return LIVE
        if for_method not in NEVER_VICTIM and r > 0.7:
            return VICTIM
        return self.name()

    def name(self) -> str:
        """Not LIVE nor VICTIM: empty, short, long, odd characters, path-like."""
        r = self.rng
        choices = ["", "nope", "x" * r.randint(1, 300), "../../etc", "a/b", "ünïcode-☃", "fuzz-live-not",
                   " ", "\x00", "-", ".", f"id-{r.randrange(10**6)}"]
        return r.choice(choices)

    def path_value(self) -> str:
        return self.rng.choice(["", f"{self.dead}/p{self.rng.randrange(1000)}", "relative/path"])

    def message(self, for_method: str, cls=None):
        """A real message of a random type (or `cls`), its id chosen by `container_id`."""
        r = self.rng
        cls = cls or r.choice(MESSAGE_TYPES)
        msg = cls()
        fields = {f.name: f for f in cls.DESCRIPTOR.fields}
        for name, f in fields.items():
            if r.random() < 0.4:
                continue
            if f.is_repeated or f.type == f.TYPE_MESSAGE:
                continue
            if f.type == f.TYPE_STRING:
                if name == "id":
                    setattr(msg, name, self.container_id(for_method))
                elif name in ("bundle", "path", "stdin", "stdout", "stderr", "parent_checkpoint", "checkpoint"):
                    setattr(msg, name, self.path_value())
                else:
                    setattr(msg, name, self.name())
            elif f.type in (f.TYPE_UINT32, f.TYPE_INT32, f.TYPE_UINT64, f.TYPE_INT64):
                unsigned = f.type in (f.TYPE_UINT32, f.TYPE_UINT64)
                bits = 32 if f.type in (f.TYPE_UINT32, f.TYPE_INT32) else 64
                lo, hi = (0, 2 ** bits - 1) if unsigned else (-(2 ** (bits - 1)), 2 ** (bits - 1) - 1)
                setattr(msg, name, r.choice([lo, hi, 0, 1, 9, 15, r.randint(lo, hi)]))
            elif f.type == f.TYPE_BOOL:
                setattr(msg, name, r.random() < 0.5)
        if cls is api.ExecProcessRequest and r.random() < 0.5:
            msg.spec.CopyFrom(pack_process({"args": ["true"], "cwd": "/"}))
        return msg

    def garbage(self, low: int = 0, high: int = 200) -> bytes:
        return self.rng.randbytes(self.rng.randint(low, high))

    def shaped_garbage(self, depth: int = 0, for_method: str = "") -> bytes:
        """Well-formed protobuf of no particular message: random field numbers and wire types with
        odd values, nested messages included. It decodes, so the handlers see it."""
        r = self.rng
        out = b""
        for _ in range(r.randint(0, 8)):
            number = r.choice([1, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, r.randint(11, 2 ** 29 - 1)])
            wire_type = r.choice([wire.VARINT, wire.FIXED64, wire.LENGTH_DELIMITED, wire.LENGTH_DELIMITED,
                                  wire.FIXED32])
            if number == 1 and depth == 0 and for_method:  # the request's id
                value = self.container_id(for_method).encode()
                out += wire.encode_varint(1 << 3 | wire.LENGTH_DELIMITED) + wire.encode_varint(len(value)) + value
                continue
            out += wire.encode_varint(number << 3 | wire_type)
            if wire_type == wire.VARINT:
                out += wire.encode_varint(r.choice([0, 1, 9, 2 ** 31, 2 ** 64 - 1, r.randrange(2 ** 64)]))
            elif wire_type == wire.FIXED64:
                out += r.randbytes(8)
            elif wire_type == wire.FIXED32:
                out += r.randbytes(4)
            else:
                value = r.choice([self.name().encode(), self.path_value().encode(), self.garbage(0, 40),
                                  self.shaped_garbage(depth + 1) if depth < 3 else b""])
                out += wire.encode_varint(len(value)) + value
        return out

    # ---- frames -------------------------------------------------------------------------------------
    @staticmethod
    def request_frame(stream_id: int, service: str, method: str, payload: bytes, flags: int = 0,
                      timeout_nano: int = 0, metadata: tuple[KeyValue, ...] = ()) -> bytes:
        data = Request(service, method, payload, timeout_nano, metadata).encode()
        return encode_frame(Frame(stream_id, FrameType.REQUEST, data, flags))

    def state_of_live(self, stream_id: int) -> bytes:
        return self.request_frame(stream_id, V2, "State", api.StateRequest(id=LIVE).SerializeToString())

    def well_framed(self, stream_id: int, last_id: int) -> tuple[bytes, int | None, frozenset, str]:
        """One frame on a long-lived connection, which uses `stream_id` when it is a request with a new
        id: (bytes, the stream id its answer comes on or None when none is due, the codes allowed,
        what it was). Every third, while it lasts, comes from the sweep: every method once with a
        message of every type."""
        r = self.rng
        self.well_framed_count += 1
        if self.sweep and self.well_framed_count % 3 == 0:
            method, cls = self.sweep.pop()
            payload = self.message(method, cls).SerializeToString()
            frame = self.request_frame(stream_id, r.choice(SERVICES), method, payload)
            return frame, stream_id, ANY_CODE, f"sweep {method}({cls.DESCRIPTOR.name})"
        kind = r.choice(["unknown-service", "unknown-method", "envelope-garbage", "payload-garbage",
                         "shaped-garbage", "shaped-garbage", "wrong-type", "wrong-type", "even-id",
                         "reused-id", "client-stream", "data-frame", "response-frame", "metadata", "timeout"])
        service = r.choice(SERVICES)
        method = r.choice(METHODS)
        if kind == "unknown-service":
            name = r.choice(["", "containerd.task.v9.Task", "x" * 1000, "grpc.health.v1.Health",
                             "containerd.task.v2.Task.", "\u2603"])
            return (self.request_frame(stream_id, name, method, b""), stream_id, frozenset({Code.UNIMPLEMENTED}),
                    kind)
        if kind == "unknown-method":
            name = r.choice(["", "state", "Nope", "State ", "x" * 500, "Create/State"])
            return (self.request_frame(stream_id, service, name, self.garbage()), stream_id,
                    frozenset({Code.UNIMPLEMENTED}), kind)
        if kind == "envelope-garbage":
            data = self.garbage(0, 300)
            return (encode_frame(Frame(stream_id, FrameType.REQUEST, data)), stream_id,
                    frozenset({Code.INVALID_ARGUMENT, Code.UNIMPLEMENTED}), kind)
        if kind == "payload-garbage":
            return self.request_frame(stream_id, service, method, self.garbage()), stream_id, ANY_CODE, kind
        if kind == "shaped-garbage":
            payload = self.shaped_garbage(for_method=method)
            return self.request_frame(stream_id, service, method, payload), stream_id, ANY_CODE, kind
        if kind == "wrong-type":
            payload = self.message(method).SerializeToString()
            return self.request_frame(stream_id, service, method, payload), stream_id, ANY_CODE, kind
        if kind == "even-id" or (kind == "reused-id" and last_id < 1):
            even = 2 * r.randint(1, 2 ** 30)
            return self.state_of_live(even), even, frozenset({Code.INVALID_ARGUMENT}), "even-id"
        if kind == "reused-id":
            old = r.randrange(1, last_id + 1, 2)
            return self.state_of_live(old), old, frozenset({Code.INVALID_ARGUMENT}), kind
        if kind == "client-stream":
            return (self.request_frame(stream_id, service, r.choice(READ_ONLY), b"", flags=Flag.REMOTE_OPEN),
                    stream_id, frozenset({Code.UNIMPLEMENTED}), kind)
        if kind in ("data-frame", "response-frame"):
            ftype = FrameType.DATA if kind == "data-frame" else FrameType.RESPONSE
            frame = Frame(r.choice([stream_id, r.randrange(0, 2 ** 32)]), ftype, self.garbage(),
                          r.choice([0, 1, 2, 4, 7, 255]))
            return encode_frame(frame), None, frozenset(), kind
        if kind == "metadata":
            pairs = tuple(KeyValue(self.name()[:100], r.choice(["", "v", "\u2603" * 50, "y" * 10000]))
                          for _ in range(r.randint(1, 200)))
            frame = self.request_frame(stream_id, V2, "State", api.StateRequest(id=LIVE).SerializeToString(),
                                       metadata=pairs)
            return frame, stream_id, frozenset({Code.OK}), kind
        # timeout: from one nanosecond (already over) to the largest int64
        nanos = r.choice([1, 1000, 10 ** 9, 2 ** 63 - 1])
        frame = self.request_frame(stream_id, V2, "State", api.StateRequest(id=LIVE).SerializeToString(),
                                   timeout_nano=nanos)
        return frame, stream_id, frozenset({Code.OK, Code.DEADLINE_EXCEEDED}), kind + f":{nanos}"


# ---- IO ------------------------------------------------------------------------------------------------

async def _read_frames(reader: asyncio.StreamReader, decoder: FrameDecoder, into: list[Frame]) -> bool:
    """Reads until the shim closes (True) or the task is cancelled."""
    while True:
        data = await reader.read(65536)
        if not data:
            return True
        into.extend(decoder.feed(data))


async def _one_shot(path: str, data: bytes, timeout: float = ANSWER_TIMEOUT) -> tuple[list[Frame], bool]:
    """Sends `data` on a new connection, half-closes it and reads until the shim closes it: the frames
    the shim sent, and whether it closed the connection in time."""
    reader, writer = await asyncio.open_unix_connection(path)
    frames: list[Frame] = []
    try:
        writer.write(data)
        await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
        try:
            closed = await asyncio.wait_for(_read_frames(reader, FrameDecoder(), frames), timeout)
        except asyncio.TimeoutError:
            closed = False
        except (ConnectionError, OSError):
            closed = True
    finally:
        writer.close()
    return frames, closed


def _code(frame: Frame) -> Code:
    return Code.from_wire(Response.decode(frame.data).status.code)


async def _batches(fz: Fuzzer, deadline: float) -> None:
    """On each of CONNECTIONS connections at once, BATCHES batches of BATCH_SIZE well-framed frames,
    each batch followed by a State of LIVE that must say RUNNING."""

    async def connection(n: int) -> None:
        reader, writer = await asyncio.open_unix_connection(fz.path)
        frames: list[Frame] = []
        reading = asyncio.ensure_future(_read_frames(reader, FrameDecoder(), frames))
        next_id, last_id = 1, 0
        try:
            for b in range(BATCHES):
                if time.monotonic() > deadline:
                    fz.tally.not_run += (BATCHES - b) * BATCH_SIZE
                    return
                due: collections.Counter = collections.Counter()
                allowed: dict[int, list[tuple[frozenset, str]]] = collections.defaultdict(list)
                for _ in range(BATCH_SIZE):
                    data, answer_on, codes, kind = fz.well_framed(next_id, last_id)
                    writer.write(data)
                    fz.tally.frames += 1
                    if answer_on == next_id:
                        last_id, next_id = next_id, next_id + 2
                    if answer_on is not None:
                        due[answer_on] += 1
                        allowed[answer_on].append((codes, kind))
                check_id = next_id
                writer.write(fz.state_of_live(check_id))
                last_id, next_id = next_id, next_id + 2
                due[check_id] += 1
                allowed[check_id].append((frozenset({Code.OK}), "State of the live container"))
                await writer.drain()
                got: collections.Counter = collections.Counter()
                t_end = time.monotonic() + ANSWER_TIMEOUT
                while time.monotonic() < t_end and not all(got[s] >= due[s] for s in due):
                    while frames:
                        f = frames.pop(0)
                        if f.type != FrameType.RESPONSE or f.stream_id not in due:
                            fz.tally.problem(f"connection {n}: unexpected {f.type.name} on stream {f.stream_id}")
                            continue
                        got[f.stream_id] += 1
                        code = _code(f)
                        fz.tally.codes[code.name] += 1
                        kinds = allowed[f.stream_id]
                        kind = next((k for codes, k in kinds if code in codes), kinds[0][1])
                        fz.tally.by_kind[(kind.split(":")[0].split("(")[0], code.name)] += 1
                        if not any(code in codes for codes, _ in kinds):
                            fz.tally.problem(f"connection {n} stream {f.stream_id} ({[k for _, k in kinds]}): "
                                             f"{code.name} {Response.decode(f.data).status.message[:200]!r}")
                        if f.stream_id == check_id and code == Code.OK:
                            state = api.StateResponse.FromString(Response.decode(f.data).payload)
                            if state.status != 2:
                                fz.tally.problem(f"connection {n}: {LIVE} is no longer RUNNING: {state}")
                    if reading.done():
                        break
                    await asyncio.sleep(0.01)
                missing = {s: due[s] - got[s] for s in due if got[s] < due[s]}
                if missing:
                    why = "timed out"
                    if reading.done():
                        why = f"reading ended: {reading.exception() or 'the shim closed the connection'}"
                    fz.tally.problem(f"connection {n} batch {b}: no answer on streams {sorted(missing)[:10]} "
                                     f"({why})")
                    return
        finally:
            reading.cancel()
            writer.close()

    await asyncio.gather(*(connection(n) for n in range(CONNECTIONS)))


async def _raw_cases(fz: Fuzzer, deadline: float) -> None:
    """Random bytes, huge declared lengths, truncated frames, big garbage payloads: one connection each."""
    r = fz.rng
    cases: list[tuple[str, bytes, int | None]] = []   # (kind, bytes, stream id a RESOURCE_EXHAUSTED is due on)
    for _ in range(RAW_BLOBS):
        cases.append(("random bytes", fz.garbage(1, 4096), None))
    for _ in range(RANDOM_FRAMES):   # a header that can be read: a length that fits, any type and flags
        body = fz.garbage(0, 300)
        length = r.choice([len(body), len(body), r.randint(0, len(body) + 100)])
        header = struct.pack(">IIBB", length, r.randrange(2 ** 32), r.choice([1, 1, 2, 3, r.randrange(256)]),
                             r.randrange(256))
        cases.append(("random frame", header + body, None))
    for _ in range(HUGE_LENGTHS):
        length = r.choice([MAX_MESSAGE_LENGTH + 1, 2 ** 32 - 1, r.randint(MAX_MESSAGE_LENGTH + 1, 2 ** 32 - 1)])
        stream_id = r.choice([1, 2 * r.randint(0, 2 ** 30) + 1])
        header = struct.pack(">IIBB", length, stream_id, FrameType.REQUEST, 0)
        cases.append(("huge length", header + fz.garbage(0, 64), stream_id))
    for _ in range(TRUNCATED):
        method = r.choice(METHODS)
        payload = fz.message(method).SerializeToString()
        frame = Fuzzer.request_frame(1, r.choice(SERVICES), method, payload)
        cut = r.randint(1, len(frame) - 1)
        prefix = fz.state_of_live(1) if r.random() < 0.3 else b""
        if prefix:
            frame = Fuzzer.request_frame(3, r.choice(SERVICES), method, payload)
            cut = r.randint(1, len(frame) - 1)
        cases.append(("truncated" + (" after a State" if prefix else ""), prefix + frame[:cut], None))
    for _ in range(BIG_PAYLOADS):
        size = r.randint(1 << 20, MAX_MESSAGE_LENGTH - 4096)
        frame = Fuzzer.request_frame(1, r.choice(SERVICES), r.choice(METHODS), r.randbytes(size))
        cases.append(("big garbage payload", frame, None))
    r.shuffle(cases)

    sem = asyncio.Semaphore(16)

    async def one(kind: str, data: bytes, refused_on: int | None) -> None:
        async with sem:
            if time.monotonic() > deadline:
                fz.tally.not_run += 1
                return
            fz.tally.frames += 1
            frames, closed = await _one_shot(fz.path, data)
        if not closed:
            fz.tally.problem(f"{kind} ({len(data)} bytes): the shim kept the connection open "
                             f"{ANSWER_TIMEOUT:.0f}s after the client closed its side")
        fz.tally.closed_by_shim += closed
        codes = [_code(f) for f in frames if f.type == FrameType.RESPONSE]
        for c in codes:
            fz.tally.codes[c.name] += 1
            fz.tally.by_kind[(kind, c.name)] += 1
        answered = [(f.stream_id, _code(f)) for f in frames]
        if Code.INTERNAL in codes:
            fz.tally.problem(f"{kind}: INTERNAL")
        want = {"huge length": [(refused_on, Code.RESOURCE_EXHAUSTED)], "truncated": [],
                "truncated after a State": [(1, Code.OK)]}.get(kind)
        if want is not None and answered != want:
            fz.tally.problem(f"{kind}: answered {[(i, c.name) for i, c in answered]}, want "
                             f"{[(i, c.name) for i, c in want]}")
        if kind == "big garbage payload" and len(answered) != 1:
            fz.tally.problem(f"{kind}: answered {[(i, c.name) for i, c in answered]}, want one answer")

    await asyncio.gather(*(one(*case) for case in cases))


async def _churn(fz: Fuzzer, deadline: float) -> None:
    """Waves of connections opened together and dropped: nothing sent, half a frame, a Wait on LIVE
    in flight, a State never read; closed or reset (SO_LINGER 0)."""
    r = fz.rng
    wait_live = Fuzzer.request_frame(1, V2, "Wait", api.WaitRequest(id=LIVE).SerializeToString())
    for wave in range(CHURN_WAVES):
        if time.monotonic() > deadline:
            fz.tally.not_run += (CHURN_WAVES - wave) * CHURN_WAVE_SIZE
            return
        socks = []
        for _ in range(CHURN_WAVE_SIZE):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.setblocking(False)
            try:
                s.connect(fz.path)
            except BlockingIOError:
                pass
            socks.append(s)
        await asyncio.sleep(0.05)
        for s in socks:
            what = r.choice(["nothing", "half a frame", "wait", "state"])
            data = {"nothing": b"", "half a frame": wait_live[:r.randint(1, len(wait_live) - 1)],
                    "wait": wait_live, "state": fz.state_of_live(1)}[what]
            if data:
                fz.tally.frames += 1
                try:
                    s.send(data)
                except (BlockingIOError, OSError) as exc:
                    fz.tally.problem(f"churn: send failed: {exc}")
        await asyncio.sleep(0.2)
        for s in socks:
            if r.random() < 0.5:
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            s.close()


# ---- the test -----------------------------------------------------------------------------------------

@pytest.fixture
def live_shim(tmp_path):
    shim = DirectShim(tmp_path, log_file=True)
    yield shim
    try:  # the fuzz may have left VICTIM paused, where a SIGKILL waits for the thaw
        shim.call("Resume", api.ResumeRequest(id=VICTIM), timeout=10)
    except Exception:  # noqa: BLE001 - not paused, or gone: either is fine here
        pass
    shim.close()
    assert not shim.alive(), "the shim did not exit after Shutdown"


def _settled(probe, want, timeout: float = 20.0):
    deadline = time.monotonic() + timeout
    value = probe()
    while not want(value) and time.monotonic() < deadline:
        time.sleep(0.2)
        value = probe()
    return value


def test_fuzz_a_live_shim(live_shim, tmp_path, record_property):
    shim = live_shim
    for cid in (LIVE, VICTIM):
        shim.create(cid, ["sleep", "1000"])
        shim.call("Start", api.StartRequest(id=cid))
    path = shim.address.removeprefix("unix://")
    # warm-up: the paths a fuzz takes once (errors, imports) before the baseline is taken
    for method, req in (("State", api.StateRequest(id=LIVE)), ("Pids", api.PidsRequest(id=LIVE)),
                        ("Stats", api.StatsRequest(id=LIVE)), ("Connect", api.ConnectRequest(id=LIVE))):
        shim.call(method, req)
    for method in ("State", "Kill", "Delete"):
        with pytest.raises(Exception):
            shim.call(method, {"State": api.StateRequest, "Kill": api.KillRequest,
                               "Delete": api.DeleteRequest}[method](id="warm-up-missing"))
    time.sleep(0.5)
    fds_before, rss_before = shim.fd_count(), _rss_mib(shim.pid)
    log_before = len(shim.log_text())

    fz = Fuzzer(random.Random(SEED), path, tmp_path / "does-not-exist")
    t0 = time.monotonic()
    deadline = t0 + FUZZ_BUDGET

    async def plan() -> float:
        peak = rss_before

        async def watch() -> None:
            nonlocal peak
            while True:
                peak = max(peak, _rss_mib(shim.pid))
                await asyncio.sleep(0.2)

        watcher = asyncio.ensure_future(watch())
        try:
            await _batches(fz, deadline)
            await _raw_cases(fz, deadline)
            await _churn(fz, deadline)
        finally:
            watcher.cancel()
        return peak

    peak = asyncio.run(plan())
    record_property("fuzz_answers_by_case",
                    {f"{case}/{code}": n for (case, code), n in sorted(fz.tally.by_kind.items())})
    elapsed = time.monotonic() - t0
    fds_after = _settled(shim.fd_count, lambda n: n <= fds_before + FD_SLACK)
    rss_after = _rss_mib(shim.pid)
    record_property("timings", f"fuzz seed={SEED}: {fz.tally.frames} frames in {elapsed:.1f}s; answers "
                               f"{dict(sorted(fz.tally.codes.items()))}; connections closed by the shim "
                               f"{fz.tally.closed_by_shim}; RSS {rss_before:.1f} -> peak {peak:.1f} -> "
                               f"{rss_after:.1f} MiB; fds {fds_before} -> {fds_after}")
    where = f"(seed {SEED}, KYB_FUZZ_SEED={SEED} to replay)"

    assert shim.alive(), f"the shim died under the fuzz {where}"
    assert not fz.tally.problems, f"{len(fz.tally.problems)} problems {where}:\n" + "\n".join(fz.tally.problems)
    assert not fz.sweep, f"{len(fz.sweep)} (method, message type) pairs of the sweep not sent {where}"
    assert not fz.tally.not_run, (f"{fz.tally.not_run} cases not run: the plan took over {FUZZ_BUDGET:.0f}s "
                                  f"({fz.tally.frames} frames sent) {where}")
    log = shim.log_text()[log_before:]
    assert "ttrpc protocol error" in log, f"the shim's log does not show the fuzz: {log[-2000:]!r}"
    tracebacks = [chunk.split("\ntime=")[0][:1500] for chunk in log.split("Traceback")[1:]]
    assert not tracebacks, f"the shim logged {len(tracebacks)} tracebacks {where}; the first:\n{tracebacks[0]}"
    errors = [line for line in log.splitlines() if "level=error" in line or "level=fatal" in line]
    assert not errors, f"the shim logged {len(errors)} errors {where}:\n" + "\n".join(errors[:10])
    # still serving, the container untouched, nothing made for the fuzz's ids
    connect = shim.call("Connect", api.ConnectRequest(id=LIVE))
    assert connect.shim_pid == shim.pid and connect.task_pid > 0, connect
    assert shim.call("State", api.StateRequest(id=LIVE)).status == 2, where  # RUNNING
    out = tmp_path / "exec-out"
    os.mkfifo(out)
    out_fd = os.open(out, os.O_RDONLY | os.O_NONBLOCK)
    try:
        shim.call("Exec", api.ExecProcessRequest(id=LIVE, exec_id="after", stdout=str(out), spec=pack_process(
            {"args": ["echo", "still here"], "cwd": "/", "env": ["PATH=/bin"], "user": {"uid": 0, "gid": 0}})))
        shim.call("Start", api.StartRequest(id=LIVE, exec_id="after"))
        assert shim.call("Wait", api.WaitRequest(id=LIVE, exec_id="after")).exit_status == 0
        text = b""
        t_end = time.monotonic() + 5
        while b"\n" not in text and time.monotonic() < t_end:
            try:
                text += os.read(out_fd, 4096)
            except BlockingIOError:
                time.sleep(0.05)
        assert text == b"still here\n"
        shim.call("Delete", api.DeleteRequest(id=LIVE, exec_id="after"))
    finally:
        os.close(out_fd)
    assert fds_after <= fds_before + FD_SLACK, (
        f"the shim holds {fds_after} fds, {fds_before} before the fuzz {where}: {_fd_links(shim.pid)[:30]}")
    assert rss_after - rss_before < RSS_BOUND_MIB, (
        f"the shim's RSS grew from {rss_before:.1f} to {rss_after:.1f} MiB (peak {peak:.1f}) {where}")
    ours = {LIVE, VICTIM}
    assert {e.container_id for _, _, e in shim.events.events if hasattr(e, "container_id")} <= ours, where
    runc_root = Path("/run/containerd/runc") / shim.namespace
    assert LIVE in {p.name for p in runc_root.iterdir()} <= ours, where
    for mnt in Path("/sys/fs/cgroup").iterdir():
        parent = mnt / shim.cgroup_parent.lstrip("/")
        if parent.is_dir():
            assert LIVE in {p.name for p in parent.iterdir() if p.is_dir()} <= ours, (parent, where)


def _fd_links(pid: int) -> list[str]:
    out = []
    for fd in sorted(os.listdir(f"/proc/{pid}/fd"), key=int):
        try:
            out.append(f"{fd}->{os.readlink(f'/proc/{pid}/fd/{fd}')}")
        except OSError:
            pass
    return out
