#!/bin/sh
# Entry point of the installer DaemonSet's `broker` container (packaging/kubernetes/installer-daemonset.yaml):
# the node broker (`kybernate broker serve`, docs/operators.md section 11), run from the venv the
# `install` container put on the node, in the node's namespaces (nsenter, as the installer runs):
# NVML and libnvidia-ml are the node's, the containers' processes are the node's (hostPID).
#   KYBERNATE_HOST_PID      the process whose namespaces are the node's (default 1; tests name another)
#   CONTAINERD_ADDRESS      containerd's socket (default /run/containerd/containerd.sock)
#   KYBERNATE_BROKER_ARGS   extra arguments of `kybernate broker serve`
#   KYBERNATE_SA_DIR        where the node sees this pod's service account token (pod events); set
#                           from POD_UID when unset
set -eu
host_pid=${KYBERNATE_HOST_PID:-1}
kybernate=/opt/kybernate/venv/bin/kybernate
echo "broker: waiting for $kybernate on the node"
while [ ! -x "/host$kybernate" ]; do sleep 2; done
if [ -z "${KYBERNATE_SA_DIR:-}" ] && [ -n "${POD_UID:-}" ]; then
    KYBERNATE_SA_DIR="${KUBELET_ROOT:-/var/lib/kubelet}/pods/$POD_UID/volumes/kubernetes.io~projected/broker-token"
    export KYBERNATE_SA_DIR
fi
echo "broker: starting in the namespaces of pid $host_pid"
# shellcheck disable=SC2086
exec nsenter --target "$host_pid" --mount --uts --ipc --net --pid -- \
    "$kybernate" -a "${CONTAINERD_ADDRESS:-/run/containerd/containerd.sock}" broker serve ${KYBERNATE_BROKER_ARGS:-}
