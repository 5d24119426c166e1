"""What the shim keeps in a container's bundle directory, and where runc keeps its state.

The daemon writes these files; `start` and `delete` read them, `delete` after the daemon is gone (it
is containerd's cleanup when the shim died), so both sides must use the same names: one definition
each, here. No imports at all: `start` and `delete` load it on every ``ctr run``.
"""
# containerd's, in every bundle
SPEC_FILE = "config.json"           # the OCI spec
ROOTFS_DIR = "rootfs"               # mounted by Create; unmounted by Delete, or by `delete` if the shim died

# ours
ADDRESS_FILE = "address"            # `start`: the shim's socket; `delete` removes it when nobody serves it
SHIM_PID_FILE = "shim.pid"          # `start`: the daemon's pid
INIT_PID_FILE = "init.pid"          # runc --pid-file of the init process (create and restore)
RUNTIME_LOG_FILE = "log.json"       # runc --log
STATE_FILE = "kybernate.json"       # Create: the runtime binary, root and cgroup driver `delete` must use
DELETED_MARK = "kybernate.deleted"  # the daemon, after a clean Delete: `delete` has nothing to force

# runc's state: --root, with one directory per containerd namespace below it (as containerd's runc shim)
RUNC_ROOT = "/run/containerd/runc"
