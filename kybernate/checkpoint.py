"""`kybernate checkpoint` and `kybernate restore`.

Targets: a containerd container id (namespace -n, default "default"), or a Kubernetes container as
NAMESPACE/POD[/CONTAINER], found through the CRI API by the labels kubelet sets
(io.kubernetes.pod.namespace, io.kubernetes.pod.name, io.kubernetes.container.name); its CRI id is its
containerd id in namespace k8s.io.

checkpoint: containerd's Tasks.Checkpoint with containerd.runc.v1.CheckpointOptions filled in
  (image_path, work_path, exit, ...), which `ctr task checkpoint` only does for runc: the CRIU image
  lands in a plain directory, by default in the node's checkpoint store (`shim.policy.store`: the
  node config's checkpoint.store, /var/lib/kybernate/checkpoints), in the container's scope:
  <store>/<ns>/_/<id>/<UTC time>, or <store>/k8s.io/<pod namespace>/<pod>/<container>/<UTC time>. With
  --cri-archive FILE (Kubernetes targets, containerd 2.x) the CRI plugin's CheckpointContainer writes
  kubelet's checkpoint archive instead. A progress line shows the elapsed time and the growing image.
restore: a checkpoint directory becomes a running container again through the shim's restore
  annotation kybernate.io/restore-from, which names a checkpoint in the new container's scope of the
  store (relative to it: <id>/<UTC time>, <pod>/<container>/<UTC time>); a directory outside the
  store is passed as it is, and the shim takes it only beneath the node's restore_roots. For
  containerd ids by `ctr run` with that annotation (in place
  of the stopped container of the same id, or under --new-id), for Kubernetes targets by CRI
  CreateContainer/StartContainer in the pod's running sandbox (a checkpoint archive is given to
  containerd 2.x as the image, as kubelet does).
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

import grpc

from . import (CRI_NAMESPACE, LABEL_CONTAINER_NAME, LABEL_POD_NAME, LABEL_POD_NAMESPACE, RESTORE_ANNOTATION,
               RUNTIME_HANDLER, RUNTIME_TYPE, SEAL_MANIFEST, OperatorError)
from .checkpoints import checkpoint_store, human, newest_complete, tree_size  # noqa: F401 - shared with `checkpoints`
from .containerd_api import Containerd, describe_rpc_error, spec_of, status_name


# ---- targets ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Target:
    namespace: str          # containerd namespace
    id: str = ""            # containerd id (after resolution for Kubernetes targets)
    pod_namespace: str = ""
    pod: str = ""
    container: str = ""

    @property
    def kubernetes(self) -> bool:
        return bool(self.pod)

    def __str__(self) -> str:
        if self.kubernetes:
            name = f"{self.pod_namespace}/{self.pod}" + (f"/{self.container}" if self.container else "")
            return f"{name} (container {self.id[:13]})" if self.id else name
        return f"{self.namespace}/{self.id}"


def parse_target(text: str, namespace: str) -> Target:
    """'ID' (containerd ids never hold '/') or 'NAMESPACE/POD[/CONTAINER]'."""
    parts = text.split("/")
    if len(parts) == 1 and text:
        return Target(namespace=namespace, id=text)
    if len(parts) in (2, 3) and all(parts):
        return Target(namespace=CRI_NAMESPACE, pod_namespace=parts[0], pod=parts[1],
                      container=parts[2] if len(parts) == 3 else "")
    raise OperatorError(f"{text!r}: expected a containerd container id or NAMESPACE/POD[/CONTAINER]", 2)


def find_cri_container(client: Containerd, target: Target):
    """The CRI container of a Kubernetes target: running first, then the newest."""
    from proto.k8s.cri.runtime.v1 import api_pb2 as cri

    labels = {LABEL_POD_NAMESPACE: target.pod_namespace, LABEL_POD_NAME: target.pod}
    if target.container:
        labels[LABEL_CONTAINER_NAME] = target.container
    try:
        found = client.cri.ListContainers(cri.ListContainersRequest(
            filter=cri.ContainerFilter(label_selector=labels)), timeout=client.timeout).containers
    except grpc.RpcError as exc:
        raise OperatorError(f"CRI ListContainers at {client.address}: {describe_rpc_error(exc)} (is the CRI "
                            "plugin enabled?)") from None
    pod = f"{target.pod_namespace}/{target.pod}"
    if not found:
        what = f"container {target.container!r} in pod {pod}" if target.container else f"pod {pod}"
        raise OperatorError(f"no {what} known to containerd's CRI plugin at {client.address}")
    names = sorted({c.metadata.name for c in found})
    if not target.container and len(names) > 1:
        raise OperatorError(f"pod {pod} has several containers ({', '.join(names)}): name one as "
                            f"{pod}/CONTAINER", 2)
    running = [c for c in found if c.state == cri.CONTAINER_RUNNING]
    pick = max(running or found, key=lambda c: c.created_at)
    return pick


def resolve(client: Containerd, target: Target) -> tuple[Target, object]:
    """(target with its containerd id, the containerd container); refuses containers not run by us."""
    if target.kubernetes:
        cri_container = find_cri_container(client, target)
        target = dataclasses.replace(target, id=cri_container.id,
                                     container=target.container or cri_container.metadata.name)
    container = client.container(target.namespace, target.id)
    if container is None:
        raise OperatorError(f"no container {target.id!r} in containerd namespace {target.namespace!r}")
    if container.runtime.name != RUNTIME_TYPE:
        raise OperatorError(f"container {target} is run by {container.runtime.name or 'an unknown runtime'}, "
                            f"not by kybernate ({RUNTIME_TYPE}): kybernate checkpoints only its own "
                            "containers")
    return target, container


# ---- progress -----------------------------------------------------------------------------------
class Progress:
    """Runs `work` in a thread; meanwhile shows elapsed time and the size of `watch` on `stream`.

    On a terminal one line is rewritten every `interval`; otherwise a line every `log_every` seconds
    (so logs of long GPU checkpoints show that something happens), none for quick ones.
    """

    def __init__(self, label: str, watch: Path, stream=None, interval: float = 0.5, log_every: float = 10.0,
                 enabled: bool = True):
        self.label = label
        self.watch = watch
        self.stream = stream or sys.stderr
        self.interval = interval
        self.log_every = log_every
        self.enabled = enabled
        self.lines: list[str] = []

    def _line(self, elapsed: float) -> str:
        size = tree_size(self.watch) if self.watch.exists() else 0
        return f"{self.label}: {elapsed:6.1f} s, image {human(size)}"

    def run(self, work: Callable[[], object]):
        box: dict = {}

        def target():
            try:
                box["result"] = work()
            except BaseException as exc:  # re-raised in the caller's thread
                box["error"] = exc

        t0 = time.monotonic()
        thread = threading.Thread(target=target, name="kybernate-checkpoint", daemon=True)
        thread.start()
        tty = self.enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        next_log = t0 + self.log_every
        while thread.is_alive():
            thread.join(self.interval)
            if not thread.is_alive():
                break
            if not self.enabled:
                continue  # quiet: no progress lines, but the work is still waited for
            now = time.monotonic()
            if tty:
                self.stream.write("\r" + self._line(now - t0) + "\033[K")
                self.stream.flush()
            elif now >= next_log:
                line = self._line(now - t0)
                self.lines.append(line)
                print(line, file=self.stream, flush=True)
                next_log = now + self.log_every
        if tty:
            self.stream.write("\r\033[K")
            self.stream.flush()
        self.seconds = time.monotonic() - t0
        if "error" in box:
            raise box["error"]
        return box.get("result")


# ---- the store ----------------------------------------------------------------------------------


def scope_of(namespace: str, container_id: str, container=None):
    """The container's scope in the store, as the shim sees it (its spec's CRI annotations)."""
    from shim.policy.store import scope_of as _scope_of

    spec = spec_of(container) if container is not None else {}
    annotations = spec.get("annotations") if isinstance(spec.get("annotations"), dict) else {}
    try:
        return _scope_of(namespace, container_id, annotations)
    except ValueError as exc:
        raise OperatorError(str(exc)) from None


def default_image_dir(store: str, scope) -> Path:
    """A new directory for one checkpoint in the container's scope: its parents are made (root's
    alone, 0700), the directory itself is left to the shim (which then removes it on failure)."""
    from shim.policy.store import make_dirs, new_checkpoint_id

    try:
        parent = make_dirs(store, [scope.containerd_namespace, scope.pod_namespace or "_", *scope.name])
    except OSError as exc:
        raise OperatorError(f"cannot make the checkpoint store directory {scope.checkpoint_parent(store)}: "
                            f"{exc.strerror or exc}") from None
    return Path(parent) / new_checkpoint_id(parent)


def tier_image_dir(tiers, scope) -> Path:
    """A new checkpoint id in the container's scope of tier 1 (tier 2 when the node has no RAM tier);
    the shim moves it to tier 2 when tier 1 has no room for it."""
    from tiers import DISK, RAM
    from tiers.ids import new_id
    from shim.policy.store import make_dirs

    root = tiers.roots[RAM] or tiers.roots[DISK]
    try:
        parent = make_dirs(root, [scope.containerd_namespace, scope.pod_namespace or "_", *scope.name])
    except OSError as exc:
        raise OperatorError(f"cannot make the tier directory under {root}: {exc.strerror or exc}") from None
    return Path(parent) / new_id()


def tier_fallback_dir(tiers, image_dir: Path):
    from tiers import DISK, RAM

    if not tiers.roots[RAM] or tiers.tier_of_path(str(image_dir)) != RAM:
        return None
    rel = os.path.relpath(os.path.realpath(image_dir.parent), os.path.realpath(tiers.roots[RAM]))
    return Path(tiers.roots[DISK]) / rel / image_dir.name


def restore_name(source: Path, store: str, scope) -> str:
    """What kybernate.io/restore-from says for ``source``: its name in the scope when it is there,
    else the path (the shim takes it only beneath the node's restore_roots)."""
    from shim.policy.store import within

    scope_dir = scope.directory(store)
    if within(str(source), scope_dir) and os.path.normpath(str(source)) != os.path.normpath(scope_dir):
        return os.path.relpath(str(source), scope_dir)
    return str(source)


# ---- checkpoint ---------------------------------------------------------------------------------


def checkpoint_options(args, image_dir: Path):
    from proto.anyutil import pack
    from proto.containerd.runc.v1 import options_pb2

    opts = options_pb2.CheckpointOptions(
        exit=args.exit, open_tcp=args.tcp_established, external_unix_sockets=args.ext_unix_sk,
        file_locks=args.file_locks, image_path=str(image_dir),
        work_path=str(args.work_path) if args.work_path else "")
    return pack(opts)


def checkpoint(args) -> int:
    target = parse_target(args.target, args.namespace)
    with Containerd(args.address) as client:
        target, container = resolve(client, target)
        task = client.task(target.namespace, target.id)
        state = status_name(task)
        if state not in ("running", "paused"):
            raise OperatorError(f"container {target} is not running (task: {state}): nothing to checkpoint")
        if args.cri_archive:
            return _checkpoint_cri(client, target, Path(args.cri_archive).absolute(), args)
        in_store = not args.image_path
        tiers = None
        if in_store:
            from .store_cmd import tier_store
            tiers = tier_store(required=False)
            scope = scope_of(target.namespace, target.id, container)
            image_dir = (tier_image_dir(tiers, scope) if tiers is not None
                         else default_image_dir(checkpoint_store(), scope))
        else:
            image_dir = Path(args.image_path).absolute()
        if image_dir.exists() and (not image_dir.is_dir() or any(image_dir.iterdir())):
            raise OperatorError(f"{image_dir} exists and is not an empty directory: choose another --image-path")
        options = checkpoint_options(args, image_dir)
        progress = Progress(f"checkpoint {target}", image_dir, enabled=not args.quiet)
        note = ""
        try:
            progress.run(lambda: client.checkpoint(target.namespace, target.id, options, timeout=args.timeout))
        except grpc.RpcError as exc:
            if not _duplicate_scratch_blob(exc, image_dir):
                _remove_if_empty(image_dir)
                raise OperatorError(f"checkpoint of {target} failed: {describe_rpc_error(exc)}") from None
            note = " (containerd 1.x could not store its empty scratch copy: harmless, the image is whole)"
    if tiers is not None and not (image_dir / "inventory.img").exists():
        # the shim put it in tier 2; containerd 2.x makes the image_path dir itself, so an empty one
        # may be left in tier 1
        moved = tier_fallback_dir(tiers, image_dir)
        if moved is not None and moved.exists():
            note += " (tier 1 full: the shim put it in tier 2)"
            _remove_note_only(image_dir)
            image_dir = moved
    from criu import CriuImageError, validate_image_dir
    try:
        validate_image_dir(image_dir)
    except CriuImageError as exc:
        raise OperatorError(f"containerd reported the checkpoint of {target} done but {exc}; see the shim's log "
                            "(in containerd's log)") from None
    size = tree_size(image_dir)
    print(f"checkpoint of {target}: {image_dir} ({human(size)}, {progress.seconds:.1f} s, "
          f"{'sealed' if is_sealed(image_dir) else 'NOT sealed'})" + ("; the task has exited" if args.exit else "")
          + note)
    if not is_sealed(image_dir):
        print(f"warning: {image_dir} is not sealed (the node has no seal key, see docs/security.md): a node "
              "that requires sealed images (the default) refuses to restore it", file=sys.stderr)
    if tiers is not None:
        tier = tiers.tier_of_path(str(image_dir)) or "?"
        print(f"checkpoint id {image_dir.name} (in the {tier} tier; the tier worker copies it down)")
    if args.exit:
        hint = (f"kybernate restore {args.target} --from {image_dir.name}" if tiers is not None else
                f"kybernate restore {args.target} --from {image_dir}" if target.kubernetes or not in_store
                else f"kybernate -n {target.namespace} restore {target.id}")
        print(f"restore with: {hint}")
    return 0


def is_sealed(image_dir: Path) -> bool:
    """Whether the shim sealed the image (it verifies the seal itself at restore)."""
    return os.path.lexists(image_dir / SEAL_MANIFEST)


def _duplicate_scratch_blob(exc: grpc.RpcError, image_dir: Path) -> bool:
    """containerd 1.6/1.7 hand a non-runc runtime a scratch directory of their own (the image goes to
    CheckpointOptions.image_path), then store that directory, empty, as a content blob: the second
    such checkpoint on a node fails with "content sha256:...: already exists" after the shim has
    written the whole image. That error, with a whole image in place, is a success."""
    from criu import CriuImageError, validate_image_dir
    try:
        details = exc.details() or ""
    except Exception:
        return False
    if "already exists" not in details or not details.startswith("content sha256:"):
        return False
    try:
        validate_image_dir(image_dir)
    except CriuImageError:
        return False
    return True


def _remove_note_only(path: Path) -> None:
    """The dir the image was asked into, when the shim put the image elsewhere: containerd 2.x makes it
    and hands it to the shim as its checkpoint path, where the shim leaves its note (which names the
    image's real place). Nothing is left in tier 1 for an image that is not there."""
    from shim.policy.untrusted import NOTE_NAME

    try:
        if {p.name for p in path.iterdir()} <= {NOTE_NAME}:
            (path / NOTE_NAME).unlink(missing_ok=True)
    except OSError:
        pass
    _remove_if_empty(path)


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass


def _checkpoint_cri(client: Containerd, target: Target, archive: Path, args) -> int:
    from proto.k8s.cri.runtime.v1 import api_pb2 as cri

    if not target.kubernetes:
        raise OperatorError("--cri-archive needs a Kubernetes target (NAMESPACE/POD/CONTAINER)", 2)
    if archive.exists():
        raise OperatorError(f"{archive} exists: choose another --cri-archive")
    archive.parent.mkdir(parents=True, exist_ok=True)
    req = cri.CheckpointContainerRequest(container_id=target.id, location=str(archive),
                                         timeout=int(args.timeout or 0))
    progress = Progress(f"checkpoint {target}", archive, enabled=not args.quiet)
    try:
        progress.run(lambda: client.cri.CheckpointContainer(req, timeout=args.timeout))
    except grpc.RpcError as exc:
        msg = describe_rpc_error(exc)
        if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
            msg += " (CRI CheckpointContainer needs containerd 2.x; use --image-path instead)"
        raise OperatorError(f"CRI checkpoint of {target} failed: {msg}") from None
    print(f"checkpoint archive of {target}: {archive} ({human(tree_size(archive))}, {progress.seconds:.1f} s)")
    return 0


# ---- restore ------------------------------------------------------------------------------------
def latest_checkpoint(store: str, scope) -> Path:
    """The newest complete checkpoint of the scope; newer ones that are not (a half image left by a
    shim killed mid-checkpoint, one still being written) are skipped, and said so."""
    base = Path(scope.checkpoint_parent(store))
    try:
        found, skipped = newest_complete(base)
    except OperatorError as exc:
        raise OperatorError(f"no checkpoint of {'/'.join(scope.name)} to restore: {exc}: pass --from DIR") from None
    for d, status, why in skipped:
        print(f"skipping {d}: {status} ({why})", file=sys.stderr)
    return found


def _ctr(args, *argv: str, check: bool = True) -> subprocess.CompletedProcess:
    ctr = shutil.which(args.ctr) or args.ctr
    cmd = [ctr, "--address", args.address, "--namespace", args.namespace, *argv]
    try:
        p = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout or 600)
    except FileNotFoundError:
        raise OperatorError(f"ctr not found ({args.ctr}): pass --ctr PATH") from None
    if check and p.returncode != 0:
        raise OperatorError(f"{' '.join(cmd)} exited {p.returncode}: {(p.stderr or p.stdout).strip()}")
    return p


def restore(args) -> int:
    target = parse_target(args.target, args.namespace)
    if target.kubernetes:
        return _restore_cri(args, target)
    new_id = args.new_id or target.id
    store = checkpoint_store()
    from tiers.ids import is_id

    by_id = bool(args.from_) and is_id(args.from_)
    with Containerd(args.address) as client:
        template = client.container(target.namespace, target.id)
        if by_id:
            source = args.from_   # the shim finds it in the node's tiers (pulling from the registry)
        else:
            source = (Path(args.from_).absolute() if args.from_
                      else latest_checkpoint(store, scope_of(target.namespace, target.id, template)))
            if not (source / "inventory.img").exists():
                raise OperatorError(f"{source} is not a CRIU checkpoint directory (no inventory.img)")
            _warn_unsealed(source)
        image = args.image or (template.image if template is not None else "")
        if not image:
            raise OperatorError(f"container {target} is gone: name its image with --image")
        spec = spec_of(template) if template is not None else {}
        if spec.get("process", {}).get("terminal"):
            raise OperatorError(f"container {target} has a terminal: restore it with ctr and a console")
        existing = client.container(target.namespace, new_id)
        if existing is not None:
            if existing.runtime.name != RUNTIME_TYPE:
                raise OperatorError(f"container {target.namespace}/{new_id} exists and is not run by kybernate")
            task = client.task(target.namespace, new_id)
            if task is not None and status_name(task) in ("running", "paused", "pausing", "created"):
                raise OperatorError(f"container {target.namespace}/{new_id} is {status_name(task)}: stop it, "
                                    "or restore under --new-id")
    # Replace the stopped container of that id by the restored one (ctr: task, then container).
    if existing is not None:
        _ctr(args, "task", "delete", "--force", new_id, check=False)
        _wait_task_gone(args.address, target.namespace, new_id)
        _ctr(args, "containers", "delete", new_id)
    # the restored container is a plain containerd one: its scope is <store>/<ns>/_
    name = source if by_id else restore_name(source, store, scope_of(target.namespace, new_id))
    run = ["run", "-d", "--runtime", RUNTIME_TYPE, "--annotation", f"{RESTORE_ANNOTATION}={name}"]
    namespaces = [n.get("type") for n in spec.get("linux", {}).get("namespaces", [])] if spec else ["network"]
    if "network" not in namespaces or args.net_host:
        run.append("--net-host")
    args_after = list(args.args or spec.get("process", {}).get("args", []))
    t0 = time.monotonic()
    _run_restored(args, run + [image, new_id, *args_after], target.namespace, new_id, replaced=existing is not None)
    with Containerd(args.address) as client:
        task = client.task(target.namespace, new_id)
    state = status_name(task)
    if state != "running":
        raise OperatorError(f"restored container {target.namespace}/{new_id} is {state}, not running")
    print(f"restored {target.namespace}/{new_id} from {source}: pid {task.pid} "
          f"({time.monotonic() - t0:.1f} s)")
    return 0


def _run_restored(args, run: list[str], namespace: str, container_id: str, replaced: bool,
                  timeout: float = 15.0) -> None:
    """`ctr run` of the restored container. Where it replaces a container whose shim was killed,
    containerd may still hold the old task in its runtime for a moment after the Tasks API stopped
    listing it (it runs the shim's `delete` first): "already exists" is then waited out, the
    half-made container removed each time, up to `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        p = _ctr(args, *run, check=False)
        if p.returncode == 0:
            return
        text = (p.stderr or p.stdout).strip()
        if not (replaced and "already exists" in text and time.monotonic() < deadline):
            raise OperatorError(f"kybernate restore: {args.ctr} {' '.join(run)} exited {p.returncode}: {text}")
        _ctr(args, "containers", "delete", container_id, check=False)
        time.sleep(0.5)


def _wait_task_gone(address: str, namespace: str, container_id: str, timeout: float = 15.0) -> None:
    """containerd drops the task of a container whose shim was killed on its own time (it runs the
    shim binary's `delete` first): a restore under the same id waits for that rather than race it."""
    deadline = time.monotonic() + timeout
    while True:
        with Containerd(address) as client:
            if client.task(namespace, container_id) is None:
                return
        if time.monotonic() > deadline:
            raise OperatorError(f"the old task of {namespace}/{container_id} is still there after {timeout:.0f} s: "
                                f"delete it (ctr task delete --force {container_id}) and restore again")
        time.sleep(0.1)


def _warn_unsealed(source: Path) -> None:
    if not is_sealed(source):
        print(f"warning: {source} is not sealed: the shim refuses it unless the node config sets "
              "checkpoint.require_seal = false", file=sys.stderr)


def _restore_cri(args, target: Target) -> int:
    from proto.k8s.cri.runtime.v1 import api_pb2 as cri

    if not args.from_:
        raise OperatorError("a Kubernetes restore needs --from (a checkpoint directory or a CRI archive)", 2)
    if not target.container:
        raise OperatorError("name the container: NAMESPACE/POD/CONTAINER", 2)
    from tiers.ids import is_id

    by_id = is_id(args.from_)
    source = Path(args.from_) if by_id else Path(args.from_).absolute()
    archive = not by_id and source.is_file()
    if not by_id and not archive and not (source / "inventory.img").exists():
        raise OperatorError(f"{source} is neither a CRI checkpoint archive nor a CRIU checkpoint directory")
    if not archive and not by_id:
        _warn_unsealed(source)
    with Containerd(args.address) as client:
        rt = client.cri
        try:
            pods = rt.ListPodSandbox(cri.ListPodSandboxRequest(filter=cri.PodSandboxFilter(
                label_selector={LABEL_POD_NAMESPACE: target.pod_namespace, LABEL_POD_NAME: target.pod},
                state=cri.PodSandboxStateValue(state=cri.SANDBOX_READY))), timeout=client.timeout).items
        except grpc.RpcError as exc:
            raise OperatorError(f"CRI ListPodSandbox: {describe_rpc_error(exc)}") from None
        if not pods:
            raise OperatorError(f"no running pod {target.pod_namespace}/{target.pod}: the pod must exist "
                                "(restore puts a container into it)")
        pod = max(pods, key=lambda p: p.created_at)
        if pod.runtime_handler != RUNTIME_HANDLER:
            raise OperatorError(f"pod {target.pod_namespace}/{target.pod} runs with runtime handler "
                                f"{pod.runtime_handler or 'default'}, not {RUNTIME_HANDLER}")
        status = rt.PodSandboxStatus(cri.PodSandboxStatusRequest(pod_sandbox_id=pod.id),
                                     timeout=client.timeout).status
        previous = rt.ListContainers(cri.ListContainersRequest(filter=cri.ContainerFilter(
            pod_sandbox_id=pod.id, label_selector={LABEL_CONTAINER_NAME: target.container})),
            timeout=client.timeout).containers
        if any(c.state in (cri.CONTAINER_RUNNING, cri.CONTAINER_CREATED) for c in previous):
            raise OperatorError(f"container {target} is running: stop it first")
        if not previous and not args.image and not archive:
            raise OperatorError(f"no earlier container {target.container!r} in the pod to take the image "
                                "from: pass --image")
        last = max(previous, key=lambda c: c.created_at) if previous else None
        config = cri.ContainerConfig(
            metadata=cri.ContainerMetadata(name=target.container,
                                           attempt=(max(c.metadata.attempt for c in previous) + 1) if previous else 0),
            image=cri.ImageSpec(image=str(source) if archive else (args.image or last.image.image)),
            labels=dict(last.labels) if last is not None else {
                **{k: v for k, v in pod.labels.items() if k.startswith("io.kubernetes.pod.")},
                LABEL_CONTAINER_NAME: target.container},
            annotations=dict(last.annotations) if last is not None else {})
        if not archive:
            from shim.policy.store import Scope

            scope = Scope(CRI_NAMESPACE, target.pod_namespace, (target.pod, target.container))
            config.annotations[RESTORE_ANNOTATION] = (args.from_ if by_id else
                                                       restore_name(source, checkpoint_store(), scope))
        sandbox_config = cri.PodSandboxConfig(metadata=status.metadata, labels=dict(status.labels),
                                              annotations=dict(status.annotations))
        if status.HasField("linux") and status.linux.HasField("namespaces"):
            sandbox_config.linux.security_context.namespace_options.CopyFrom(status.linux.namespaces.options)
        t0 = time.monotonic()
        try:
            cid = rt.CreateContainer(cri.CreateContainerRequest(pod_sandbox_id=pod.id, config=config,
                                                                sandbox_config=sandbox_config),
                                     timeout=args.timeout).container_id
            rt.StartContainer(cri.StartContainerRequest(container_id=cid), timeout=args.timeout)
        except grpc.RpcError as exc:
            raise OperatorError(f"CRI restore of {target} failed: {describe_rpc_error(exc)}") from None
    print(f"restored {target.pod_namespace}/{target.pod}/{target.container} as container {cid[:13]} "
          f"from {source} ({time.monotonic() - t0:.1f} s)")
    return 0
