"""The operator's `kybernate` command: doctor, ps, checkpoint, restore.

Each subcommand lives in its own module and is imported only when it runs, so `kybernate --help`
loads neither grpc, protobuf nor cffi. Shared constants are here (standard library only).
"""
RUNTIME_TYPE = "io.containerd.kybernate.v1"
RUNTIME_HANDLER = "kybernate"
SHIM_BINARY = "containerd-shim-kybernate-v1"
DEFAULT_ADDRESS = "/run/containerd/containerd.sock"
DEFAULT_CONFIG = "/etc/containerd/config.toml"
CRI_NAMESPACE = "k8s.io"
RESTORE_ANNOTATION = "kybernate.io/restore-from"
SEAL_MANIFEST = "kybernate-seal.json"  # shim.checkpoint.seal.MANIFEST_NAME: a sealed image holds it

# Labels the CRI plugin puts on every container it creates (kubelet's metadata).
LABEL_POD_NAMESPACE = "io.kubernetes.pod.namespace"
LABEL_POD_NAME = "io.kubernetes.pod.name"
LABEL_CONTAINER_NAME = "io.kubernetes.container.name"


class OperatorError(Exception):
    """A failure the command reports in one sentence and exits non-zero for."""

    def __init__(self, message: str, exit_code: int = 1):
        self.exit_code = exit_code
        super().__init__(message)
