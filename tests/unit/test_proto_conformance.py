"""Our .proto files against containerd's own, field by field.

Both sides are compiled with the pinned grpc_tools.protoc into descriptor sets: ours from proto/, the
reference from the upstream files Debian ships under /usr/share/gocode/src
(golang-github-containerd-containerd-dev 1.6, golang-github-containerd-cgroups-dev 1.0,
golang-github-gogo-googleapis-dev for google.rpc.Status, golang-github-gogo-protobuf-dev for the
gogoproto options they import). ttrpc 1.1 declares its Request/Response as Go structs with protobuf
struct tags (types.go), so those are read from the tags.

Compared: every field (name, number, type, type_name, label, oneof), every enum value and every
service method (name, input, output, streaming). Where containerd 1.7/2.x or cgroups v3 added fields
that 1.6 / cgroups 1.0 lack, our files carry them and ``NEWER_FIELDS`` names them; anything else
that differs fails.

Optional, when the environment names newer upstream trees (not present on CI):
  KYBERNATE_UPSTREAM_CONTAINERD  a containerd 2.x checkout (its api/ directory is used)
  KYBERNATE_UPSTREAM_CGROUPS     a containerd/cgroups v3 checkout
  KYBERNATE_UPSTREAM_CRI_API     k8s.io/cri-api's pkg/apis/runtime/v1/api.proto (kubernetes-1.33.0)
"""

from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from google.protobuf import descriptor_pb2

REPO = Path(__file__).resolve().parents[2]
GOSRC = Path(os.environ.get("KYBERNATE_GOCODE", "/usr/share/gocode/src"))
GH = GOSRC / "github.com"
CTRD = "github.com/containerd/containerd"
CGROUPS = "github.com/containerd/cgroups"
TTRPC_TYPES = GH / "containerd/ttrpc/types.go"
GOGO_DIR = GH / "gogo/protobuf"  # holds gogoproto/gogo.proto
GOOGLEAPIS_DIR = GH / "gogo/googleapis"  # holds google/rpc/status.proto

UPSTREAM_CONTAINERD_FILES = [
    f"{CTRD}/runtime/v2/task/shim.proto",
    f"{CTRD}/api/types/mount.proto",
    f"{CTRD}/api/types/metrics.proto",
    f"{CTRD}/api/types/descriptor.proto",
    f"{CTRD}/api/types/task/task.proto",
    f"{CTRD}/api/events/task.proto",
    f"{CTRD}/api/events/container.proto",
    f"{CTRD}/api/services/ttrpc/events/v1/events.proto",
    f"{CTRD}/api/services/events/v1/events.proto",
    f"{CTRD}/runtime/v2/runc/options/oci.proto",
    f"{CTRD}/api/services/containers/v1/containers.proto",
    f"{CTRD}/api/services/tasks/v1/tasks.proto",
    f"{CTRD}/api/services/version/v1/version.proto",
]
UPSTREAM_CGROUPS_FILES = [
    f"{CGROUPS}/stats/v1/metrics.proto",
    f"{CGROUPS}/v2/stats/metrics.proto",
]

# Where one of our types is compared with an upstream type of another name.
COUNTERPART = {
    # 2.x moved the event envelope to containerd.types; 1.6 declares the same message here
    "containerd.types.Envelope": "containerd.services.events.ttrpc.v1.Envelope",
}
# Task API v3: the same messages as v2 under another package (containerd 2.x api/runtime/task/v3).
V3, V2 = "containerd.task.v3.", "containerd.task.v2."

# Fields that newer upstream releases added and our files carry; the reference (1.6 / cgroups 1.0)
# lacks them. Checked by hand against containerd v2.1.0 and containerd/cgroups main (cgroup2/).
NEWER_FIELDS: dict[str, set[int]] = {
    "containerd.runc.v1.Options": {12, 13},  # task_api_address, task_api_version (2.x)
    "containerd.runc.v1.CheckpointOptions": {10},  # parent_path (containerd main, after 2.2)
    "containerd.services.containers.v1.Container": {11},  # sandbox (1.7+)
    "io.containerd.cgroups.v2.Metrics": {9},  # network
    "io.containerd.cgroups.v2.CPUStat": {7, 8, 9},  # psi, nr_bursts, burst_usec
    "io.containerd.cgroups.v2.MemoryStat": set(range(36, 43)),  # peaks, psi, split workingset
    "io.containerd.cgroups.v2.MemoryEvents": {6},  # oom_group_kill
    "io.containerd.cgroups.v2.IOStat": {2},  # psi
    "io.containerd.cgroups.v2.HugeTlbStat": {4},  # failcnt
}
# Types of ours that the reference lacks entirely (same provenance as NEWER_FIELDS).
NEWER_TYPES = {
    "io.containerd.cgroups.v2.PSIData",
    "io.containerd.cgroups.v2.PSIStats",
    "io.containerd.cgroups.v2.NetworkStat",
}
# Our files that declare only part of an upstream file: their types must match, the rest is left out.
SUBSET_PACKAGES = (
    "containerd.services.containers.v1",
    "containerd.services.tasks.v1",
    "containerd.services.events.v1",    # the node broker: Publish and Subscribe, not Forward
)
# Packages of ours compared elsewhere (ttrpc: Go struct tags; CRI: optional upstream file).
OTHER_PACKAGES = ("ttrpc.", "runtime.v1.", "google.protobuf.")


# --------------------------------------------------------------------------------------------------
# descriptor sets


def protoc_descriptor_set(
    includes: list[Path], files: list[str], out: Path
) -> descriptor_pb2.FileDescriptorSet:
    cmd = [sys.executable, "-m", "grpc_tools.protoc"]
    cmd += [f"-I{p}" for p in includes]
    cmd += [f"--descriptor_set_out={out}", "--include_imports", *files]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode == 0, f"protoc failed: {' '.join(cmd)}\n{res.stderr}"
    fds = descriptor_pb2.FileDescriptorSet()
    fds.ParseFromString(out.read_bytes())
    return fds


class Index:
    """Messages, enums and services of a descriptor set by full name (no leading dot)."""

    def __init__(self, fds: descriptor_pb2.FileDescriptorSet, only_files=None):
        self.messages: dict[str, descriptor_pb2.DescriptorProto] = {}
        self.enums: dict[str, descriptor_pb2.EnumDescriptorProto] = {}
        self.services: dict[str, descriptor_pb2.ServiceDescriptorProto] = {}
        self.file_of: dict[str, str] = {}
        for f in fds.file:
            if only_files is not None and f.name not in only_files:
                continue
            pkg = f.package + "." if f.package else ""
            self._walk(f.name, pkg, f.message_type, f.enum_type)
            for s in f.service:
                self.services[pkg + s.name] = s
                self.file_of[pkg + s.name] = f.name

    def _walk(self, fname, prefix, messages, enums):
        for e in enums:
            self.enums[prefix + e.name] = e
            self.file_of[prefix + e.name] = fname
        for m in messages:
            name = prefix + m.name
            self.messages[name] = m
            self.file_of[name] = fname
            self._walk(fname, name + ".", m.nested_type, m.enum_type)

    def names(self):
        return set(self.messages) | set(self.enums) | set(self.services)


# --------------------------------------------------------------------------------------------------
# comparison


def _identity(name: str) -> str:
    return name


def diff_message(ours, theirs, rename=_identity, allowed_extra=frozenset(), where=""):
    """Differences between two DescriptorProtos; ``rename`` maps their type names to ours."""
    where = where or ours.name
    out = []
    of = {f.number: f for f in ours.field}
    tf = {f.number: f for f in theirs.field}
    for num, t in sorted(tf.items()):
        o = of.get(num)
        if o is None:
            out.append(f"{where}: field {t.name} = {num} missing")
            continue
        for attr in ("name", "type", "label"):
            if getattr(o, attr) != getattr(t, attr):
                out.append(f"{where}.{t.name} ({num}): {attr} {getattr(o, attr)!r} != upstream {getattr(t, attr)!r}")
        if o.type_name != rename(t.type_name):
            out.append(f"{where}.{t.name} ({num}): type_name {o.type_name!r} != upstream {rename(t.type_name)!r}")
        o_oneof = ours.oneof_decl[o.oneof_index].name if o.HasField("oneof_index") else None
        t_oneof = theirs.oneof_decl[t.oneof_index].name if t.HasField("oneof_index") else None
        if o_oneof != t_oneof:
            out.append(f"{where}.{t.name} ({num}): oneof {o_oneof!r} != upstream {t_oneof!r}")
    for num, o in sorted(of.items()):
        if num not in tf and num not in allowed_extra:
            out.append(f"{where}: field {o.name} = {num} not upstream")
    if ours.options.map_entry != theirs.options.map_entry:
        out.append(f"{where}: map_entry {ours.options.map_entry} != upstream {theirs.options.map_entry}")
    return out


def diff_enum(ours, theirs, where=""):
    where = where or ours.name
    o = {(v.name, v.number) for v in ours.value}
    t = {(v.name, v.number) for v in theirs.value}
    out = [f"{where}: value {n} = {v} missing" for n, v in sorted(t - o)]
    out += [f"{where}: value {n} = {v} not upstream" for n, v in sorted(o - t)]
    return out


def diff_service(ours, theirs, rename=_identity, subset=False, where=""):
    where = where or ours.name
    out = []
    om = {m.name: m for m in ours.method}
    tm = {m.name: m for m in theirs.method}
    for name, t in tm.items():
        o = om.get(name)
        if o is None:
            if not subset:
                out.append(f"{where}: method {name} missing")
            continue
        for attr in ("input_type", "output_type"):
            if getattr(o, attr) != rename(getattr(t, attr)):
                out.append(f"{where}.{name}: {attr} {getattr(o, attr)} != upstream {rename(getattr(t, attr))}")
        for attr in ("client_streaming", "server_streaming"):
            if getattr(o, attr) != getattr(t, attr):
                out.append(f"{where}.{name}: {attr} {getattr(o, attr)} != upstream {getattr(t, attr)}")
    for name in om:
        if name not in tm:
            out.append(f"{where}: method {name} not upstream")
    return out


def diff_type(ours: Index, theirs: Index, name: str, their_name: str, rename=_identity,
              allowed_extra=frozenset(), subset=False):
    if name in ours.messages:
        if their_name not in theirs.messages:
            return [f"{name}: no upstream message {their_name}"]
        return diff_message(ours.messages[name], theirs.messages[their_name], rename, allowed_extra, name)
    if name in ours.enums:
        if their_name not in theirs.enums:
            return [f"{name}: no upstream enum {their_name}"]
        return diff_enum(ours.enums[name], theirs.enums[their_name], name)
    if their_name not in theirs.services:
        return [f"{name}: no upstream service {their_name}"]
    return diff_service(ours.services[name], theirs.services[their_name], rename, subset, name)


def v3_rename(name: str) -> str:
    return name.replace("." + V2, "." + V3)


# --------------------------------------------------------------------------------------------------
# fixtures


def _our_proto_files() -> list[str]:
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "proto").rglob("*.proto"))


@pytest.fixture(scope="module")
def ours(tmp_path_factory) -> Index:
    out = tmp_path_factory.mktemp("ours") / "ours.pb"
    return Index(protoc_descriptor_set([REPO], _our_proto_files(), out))


def _require(paths, package):
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        pytest.skip(f"upstream reference absent (install {package}): {', '.join(missing)}")


@pytest.fixture(scope="module")
def upstream(tmp_path_factory) -> Index:
    _require([GOSRC / f for f in UPSTREAM_CONTAINERD_FILES], "golang-github-containerd-containerd-dev")
    _require([GOGO_DIR / "gogoproto/gogo.proto"], "golang-github-gogo-protobuf-dev")
    _require([GOOGLEAPIS_DIR / "google/rpc/status.proto"], "golang-github-gogo-googleapis-dev")
    files = list(UPSTREAM_CONTAINERD_FILES) + ["google/rpc/status.proto"]
    if all((GOSRC / f).exists() for f in UPSTREAM_CGROUPS_FILES):
        files += UPSTREAM_CGROUPS_FILES
    out = tmp_path_factory.mktemp("upstream") / "upstream.pb"
    # gogo.proto imports google/protobuf/descriptor.proto: grpc_tools' bundled include provides it
    fds = protoc_descriptor_set([GOSRC, GOGO_DIR, GOOGLEAPIS_DIR], files, out)
    return Index(fds, only_files=set(files))


def _counterpart(name: str) -> tuple[str, object]:
    if name in COUNTERPART:
        return COUNTERPART[name], _identity
    if name.startswith(V3):
        return V2 + name[len(V3):], v3_rename
    return name, _identity


def _compared_names(ours: Index):
    for name in sorted(ours.names()):
        if not name.startswith(OTHER_PACKAGES):
            yield name


# --------------------------------------------------------------------------------------------------
# tests: our files against Debian's containerd 1.6 / cgroups 1.0 files


def test_every_type_of_ours_matches_upstream(ours, upstream):
    have_cgroups = "io.containerd.cgroups.v1.Metrics" in upstream.messages
    problems, compared = [], []
    for name in _compared_names(ours):
        if name.startswith("io.containerd.cgroups.") and not have_cgroups:
            continue
        if name in NEWER_TYPES:
            assert name not in upstream.names(), f"{name} is upstream now: compare it"
            continue
        their_name, rename = _counterpart(name)
        subset = name.startswith(SUBSET_PACKAGES)
        problems += diff_type(ours, upstream, name, their_name, rename,
                              frozenset(NEWER_FIELDS.get(name, ())), subset)
        compared.append(name)
    assert not problems, "our protos differ from upstream:\n" + "\n".join(problems)
    # the comparison really covered what the shim uses
    for must in ("containerd.task.v2.Task", "containerd.task.v2.CreateTaskRequest",
                 "containerd.task.v3.Task", "containerd.task.v3.StateResponse",
                 "containerd.v1.types.Status", "containerd.v1.types.ProcessInfo",
                 "containerd.types.Mount", "containerd.types.Envelope", "containerd.types.Metric",
                 "containerd.events.TaskExit", "containerd.events.TaskOOM",
                 "containerd.services.events.ttrpc.v1.Events",
                 "containerd.services.events.ttrpc.v1.ForwardRequest",
                 "containerd.runc.v1.Options", "containerd.runc.v1.CheckpointOptions",
                 "containerd.runc.v1.ProcessDetails", "google.rpc.Status",
                 "containerd.services.containers.v1.Containers",
                 "containerd.services.tasks.v1.Tasks", "containerd.services.version.v1.Version"):
        assert must in compared, f"{must} was not compared"
    if have_cgroups:
        assert "io.containerd.cgroups.v1.Metrics" in compared
        assert "io.containerd.cgroups.v2.MemoryEvents" in compared


def test_nothing_upstream_is_left_out(ours, upstream):
    """Whole upstream files we mirror: each of their types exists in ours (v3: under its package)."""
    whole = {
        f"{CTRD}/runtime/v2/task/shim.proto",
        f"{CTRD}/api/types/mount.proto",
        f"{CTRD}/api/types/metrics.proto",
        f"{CTRD}/api/types/descriptor.proto",
        f"{CTRD}/api/types/task/task.proto",
        f"{CTRD}/api/events/task.proto",
        f"{CTRD}/api/services/ttrpc/events/v1/events.proto",
        f"{CTRD}/runtime/v2/runc/options/oci.proto",
        f"{CTRD}/api/services/version/v1/version.proto",
        *UPSTREAM_CGROUPS_FILES,
        "google/rpc/status.proto",
    }
    missing = []
    for name, fname in upstream.file_of.items():
        if fname not in whole:
            continue
        if name not in ours.names():
            missing.append(name)
        if name.startswith(V2) and V3 + name[len(V2):] not in ours.names():
            missing.append(V3 + name[len(V2):])
    assert not missing, f"upstream types without a counterpart in proto/: {missing}"


def test_subset_services_hold_what_the_cli_needs(ours):
    need = {
        "containerd.services.containers.v1.Containers": {"Get", "List"},
        "containerd.services.tasks.v1.Tasks": {"Get", "List", "Checkpoint", "Pause", "Resume"},
        "containerd.services.version.v1.Version": {"Version"},
    }
    for svc, methods in need.items():
        assert {m.name for m in ours.services[svc].method} >= methods, svc


def test_task_v3_is_v2_under_its_own_package(ours):
    """No Debian package ships the v3 Task API: it must be v2's messages and methods, renamed."""
    v2 = {n[len(V2):] for n in ours.names() if n.startswith(V2)}
    v3 = {n[len(V3):] for n in ours.names() if n.startswith(V3)}
    assert v2 == v3
    problems = []
    for short in sorted(v2):
        problems += diff_type(ours, ours, V3 + short, V2 + short, v3_rename)
    assert not problems, "\n".join(problems)
    assert len(ours.services[V3 + "Task"].method) == 17
    # containerd 2.0-2.2 declare no extra (Events) rpc on containerd.task.v3.Task
    assert all(not m.server_streaming and not m.client_streaming for m in ours.services[V3 + "Task"].method)


def test_task_service_methods_match_the_protocol(ours):
    expected = {
        "State": ("StateRequest", "StateResponse"), "Create": ("CreateTaskRequest", "CreateTaskResponse"),
        "Start": ("StartRequest", "StartResponse"), "Delete": ("DeleteRequest", "DeleteResponse"),
        "Pids": ("PidsRequest", "PidsResponse"), "Pause": ("PauseRequest", None),
        "Resume": ("ResumeRequest", None), "Checkpoint": ("CheckpointTaskRequest", None),
        "Kill": ("KillRequest", None), "Exec": ("ExecProcessRequest", None),
        "ResizePty": ("ResizePtyRequest", None), "CloseIO": ("CloseIORequest", None),
        "Update": ("UpdateTaskRequest", None), "Wait": ("WaitRequest", "WaitResponse"),
        "Stats": ("StatsRequest", "StatsResponse"), "Connect": ("ConnectRequest", "ConnectResponse"),
        "Shutdown": ("ShutdownRequest", None),
    }
    for pkg in (V2, V3):
        got = {m.name: (m.input_type, m.output_type) for m in ours.services[pkg + "Task"].method}
        want = {k: (f".{pkg}{i}", f".{pkg}{o}" if o else ".google.protobuf.Empty")
                for k, (i, o) in expected.items()}
        assert got == want


# --------------------------------------------------------------------------------------------------
# ttrpc Request/Response: containerd/ttrpc 1.1 declares them as Go structs with protobuf tags

_GO_STRUCT = re.compile(r"type (\w+) struct \{(.*?)\n\}", re.S)
_GO_FIELD = re.compile(r'^\s*\w+\s+(\S+)\s+`protobuf:"(\w+),(\d+),(opt|rep),name=(\w+)', re.M)
_FD = descriptor_pb2.FieldDescriptorProto


def _go_field_type(gotype: str, wire: str):
    base = gotype.lstrip("[]*")
    if base == "string":
        return _FD.TYPE_STRING, ""
    if base == "byte" and gotype == "[]byte":
        return _FD.TYPE_BYTES, ""
    if base == "int64" and wire == "varint":
        return _FD.TYPE_INT64, ""
    if base == "spb.Status":
        return _FD.TYPE_MESSAGE, ".google.rpc.Status"
    if wire == "bytes" and base[:1].isupper():
        return _FD.TYPE_MESSAGE, ".ttrpc." + base
    raise AssertionError(f"unexpected Go field type {gotype} ({wire}) in {TTRPC_TYPES}")


def ttrpc_messages_from_go(source: str) -> dict[str, descriptor_pb2.DescriptorProto]:
    out = {}
    for sname, body in _GO_STRUCT.findall(source):
        msg = descriptor_pb2.DescriptorProto(name=sname)
        for gotype, wire, num, label, fname in _GO_FIELD.findall(body):
            typ, type_name = _go_field_type(gotype, wire)
            msg.field.add(name=fname, number=int(num), type=typ, type_name=type_name,
                          label=_FD.LABEL_REPEATED if label == "rep" else _FD.LABEL_OPTIONAL)
        if msg.field:
            out[sname] = msg
    return out


def test_ttrpc_envelope_matches_go_struct_tags(ours):
    _require([TTRPC_TYPES], "golang-github-containerd-ttrpc-dev")
    theirs = ttrpc_messages_from_go(TTRPC_TYPES.read_text())
    assert set(theirs) >= {"Request", "Response", "KeyValue"}, theirs.keys()
    problems = []
    for name, msg in theirs.items():
        full = "ttrpc." + name
        assert full in ours.messages, f"{full} missing from proto/ttrpc/request.proto"
        problems += diff_message(ours.messages[full], msg, where=full)
    assert not problems, "\n".join(problems)
    # and the numbers the spec names
    req = {f.name: f.number for f in ours.messages["ttrpc.Request"].field}
    assert req == {"service": 1, "method": 2, "payload": 3, "timeout_nano": 4, "metadata": 5}


# --------------------------------------------------------------------------------------------------
# self-test: the comparison detects a deliberately altered descriptor


def _mutations():
    def field(msg, name):
        return next(f for f in msg.field if f.name == name)

    def renumber(m):
        field(m, "options").number = 11

    def retype(m):
        field(m, "terminal").type = _FD.TYPE_UINT32

    def rename(m):
        field(m, "parent_checkpoint").name = "parent"

    def relabel(m):
        field(m, "rootfs").label = _FD.LABEL_OPTIONAL

    def retypename(m):
        field(m, "rootfs").type_name = ".containerd.types.Descriptor"

    def drop(m):
        m.field.remove(field(m, "stderr"))

    def add(m):
        m.field.add(name="extra", number=42, type=_FD.TYPE_STRING, label=_FD.LABEL_OPTIONAL)

    def oneof(m):
        m.oneof_decl.add(name="io")
        field(m, "stdin").oneof_index = 0

    return [renumber, retype, rename, relabel, retypename, drop, add, oneof]


@pytest.mark.parametrize("mutate", _mutations(), ids=lambda f: f.__name__)
def test_selftest_altered_field_is_detected(upstream, ours, mutate):
    name = "containerd.task.v2.CreateTaskRequest"
    assert diff_message(ours.messages[name], upstream.messages[name]) == []
    altered = copy.deepcopy(upstream.messages[name])
    mutate(altered)
    assert diff_message(ours.messages[name], altered), f"{mutate.__name__} went unnoticed"
    # and the same alteration on our side
    altered_ours = copy.deepcopy(ours.messages[name])
    mutate(altered_ours)
    assert diff_message(altered_ours, upstream.messages[name]), f"{mutate.__name__} went unnoticed"


def test_selftest_altered_enum_and_service_are_detected(upstream, ours):
    status = "containerd.v1.types.Status"
    assert diff_enum(ours.enums[status], upstream.enums[status]) == []
    e = copy.deepcopy(upstream.enums[status])
    e.value[3].number = 7
    assert diff_enum(ours.enums[status], e)
    e = copy.deepcopy(upstream.enums[status])
    e.value[4].name = "FROZEN"
    assert diff_enum(ours.enums[status], e)

    task = "containerd.task.v2.Task"
    assert diff_service(ours.services[task], upstream.services[task]) == []
    for attr, value in (("output_type", ".containerd.task.v2.StartResponse"),
                        ("input_type", ".containerd.task.v2.StateRequest"),
                        ("server_streaming", True), ("name", "Statistics")):
        s = copy.deepcopy(upstream.services[task])
        setattr(s.method[14], attr, value)  # Stats
        assert diff_service(ours.services[task], s), f"method {attr} change went unnoticed"
    s = copy.deepcopy(upstream.services[task])
    del s.method[0]
    assert diff_service(ours.services[task], s)


def test_selftest_altered_descriptor_set_fails_the_whole_comparison(ours, upstream, tmp_path):
    """Alter our compiled descriptor (as a wrong .proto would) and run the full comparison."""
    fds = protoc_descriptor_set([REPO], _our_proto_files(), tmp_path / "o.pb")
    assert diff_type(Index(fds), upstream, "containerd.events.TaskExit", "containerd.events.TaskExit") == []
    for f in fds.file:
        if f.package == "containerd.events":   # task.proto (container.proto shares the package)
            for exit_msg in (m for m in f.message_type if m.name == "TaskExit"):
                next(fl for fl in exit_msg.field if fl.name == "exit_status").type = _FD.TYPE_INT32
    bad = Index(fds)
    problems = diff_type(bad, upstream, "containerd.events.TaskExit", "containerd.events.TaskExit")
    assert problems == ["containerd.events.TaskExit.exit_status (4): type 5 != upstream 13"]


# --------------------------------------------------------------------------------------------------
# optional: newer upstream trees named by the environment


def _env_path(var: str) -> Path:
    value = os.environ.get(var)
    if not value:
        pytest.skip(f"{var} not set (optional comparison with a newer upstream tree)")
    p = Path(value)
    if not p.exists():
        pytest.fail(f"{var}={value} does not exist")
    return p


def test_against_containerd_2x_tree(ours, tmp_path):
    root = _env_path("KYBERNATE_UPSTREAM_CONTAINERD") / "api"
    files = ["runtime/task/v2/shim.proto", "runtime/task/v3/shim.proto", "types/event.proto",
             "types/mount.proto", "types/metrics.proto", "types/descriptor.proto", "types/task/task.proto",
             "events/task.proto", "services/ttrpc/events/v1/events.proto", "types/runc/options/oci.proto",
             "services/containers/v1/containers.proto", "services/tasks/v1/tasks.proto",
             "services/version/v1/version.proto"]
    if 'import "github.com/containerd/containerd/api/' in (root / files[0]).read_text():
        # releases up to 2.1 import by Go path; HEAD imports relative to api/
        gopath = tmp_path / "gopath"
        (gopath / "github.com/containerd/containerd").mkdir(parents=True)
        (gopath / "github.com/containerd/containerd/api").symlink_to(root)
        files = [f"github.com/containerd/containerd/api/{f}" for f in files]
        root = gopath
    theirs = Index(protoc_descriptor_set([root], files, tmp_path / "c2.pb"), only_files=set(files))
    newer_in_2x = {  # fields of ours a 2.x tree may lack
        "containerd.runc.v1.Options": {8},  # criu_path: reserved in 2.x, used by 1.x
        "containerd.runc.v1.CheckpointOptions": {10},  # parent_path: main only, not in 2.0-2.2
    }
    problems = []
    for name in _compared_names(ours):
        if name.startswith("io.containerd.cgroups.") or name == "google.rpc.Status":
            continue
        subset = name.startswith(SUBSET_PACKAGES)
        problems += diff_type(ours, theirs, name, name, allowed_extra=frozenset(newer_in_2x.get(name, ())),
                              subset=subset)
    # ForwardRequest.envelope's type differs by name only (same fields, compared above)
    problems = [p for p in problems if not p.startswith(
        "containerd.services.events.ttrpc.v1.Envelope: no upstream")
        and "type_name '.containerd.services.events.ttrpc.v1.Envelope' != upstream '.containerd.types.Envelope'"
        not in p]
    assert not problems, "\n".join(problems)


def test_against_cgroups_v3_tree(ours, tmp_path):
    root = _env_path("KYBERNATE_UPSTREAM_CGROUPS")
    files = ["cgroup1/stats/metrics.proto", "cgroup2/stats/metrics.proto"]
    theirs = Index(protoc_descriptor_set([root], files, tmp_path / "cg.pb"), only_files=set(files))
    names = {n for n in ours.names() if n.startswith("io.containerd.cgroups.")}
    assert names == theirs.names()
    problems = []
    for name in sorted(names):
        problems += diff_type(ours, theirs, name, name)
    assert not problems, "\n".join(problems)


def test_against_cri_api(ours, tmp_path):
    api = _env_path("KYBERNATE_UPSTREAM_CRI_API")
    if api.is_dir():
        api = api / "pkg/apis/runtime/v1/api.proto"
    # api.proto up to 1.34 imports gogoproto under its Go import path
    theirs = Index(protoc_descriptor_set([api.parent, GOSRC], [api.name], tmp_path / "cri.pb"),
                   only_files={api.name})
    problems = []
    names = [n for n in ours.names() if n.startswith("runtime.v1.")]
    assert names, "no CRI types in proto/"
    for name in sorted(names):
        problems += diff_type(ours, theirs, name, name, subset=name.endswith("Service"))
    assert not problems, "\n".join(problems)
