#!/bin/sh
# Entry point of the installer DaemonSet's `store` container (packaging/kubernetes/installer-daemonset.yaml):
# the node's checkpoint tier worker (`kybernate store serve`, docs/operators.md section 10), run from the
# venv the `install` container put on the node, in the node's namespaces (nsenter, as the installer and
# the broker run): the tier dirs, the state dir and the node config are the node's. A node without
# [store] tiers in its config gets a worker that says so and waits; SIGTERM ends it after its step.
#   KYBERNATE_HOST_PID      the process whose namespaces are the node's (default 1; tests name another)
#   KYBERNATE_STORE_ARGS    extra arguments of `kybernate store serve`
set -eu
host_pid=${KYBERNATE_HOST_PID:-1}
kybernate=/opt/kybernate/venv/bin/kybernate
echo "store: waiting for $kybernate on the node"
while [ ! -x "/host$kybernate" ]; do sleep 2; done
echo "store: starting the tier worker in the namespaces of pid $host_pid"
# shellcheck disable=SC2086
exec nsenter --target "$host_pid" --mount --uts --ipc --net --pid -- "$kybernate" store serve ${KYBERNATE_STORE_ARGS:-}
