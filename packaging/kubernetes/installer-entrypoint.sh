#!/bin/sh
# Entry point of the installer image (packaging/Containerfile), run by the installer DaemonSet.
# 1. copies the installer and its wheelhouse to the host (/host/opt is the node's /opt),
# 2. runs it in the host's namespaces (nsenter -t 1), so the venv is built by the node's python3, the
#    link lands in the node's /usr/local/bin and `systemctl restart containerd` reaches the node's systemd,
# 3. checks the result through the host mounts and sleeps (a DaemonSet pod must stay up).
# KYBERNATE_INSTALL_ARGS: extra installer arguments, e.g. "--uninstall" or "--systemd-cgroup true".
# KYBERNATE_HOST_PID: the process whose namespaces are the node's (default 1; tests name another).
set -eu
payload=/opt/kybernate-installer
mkdir -p "/host$payload.new"
cp -a /kybernate/. "/host$payload.new/"
rm -rf "/host$payload"
mv "/host$payload.new" "/host$payload"
# shellcheck disable=SC2086
nsenter --target "${KYBERNATE_HOST_PID:-1}" --mount --uts --ipc --net --pid -- \
    "$payload/packaging/install.sh" --wheelhouse "$payload/wheelhouse" --restart-containerd ${KYBERNATE_INSTALL_ARGS:-}
case " ${KYBERNATE_INSTALL_ARGS:-} " in
    *" --uninstall "*)
        [ ! -e /host/usr/local/bin/containerd-shim-kybernate-v1 ] || { echo "shim link still present" >&2; exit 1; }
        rm -rf "/host$payload"
        echo "kybernate uninstalled from this node" ;;
    *)
        # the link is the node's: its target is a node path, seen here beneath /host
        link=$(readlink /host/usr/local/bin/containerd-shim-kybernate-v1 || true)
        [ -n "$link" ] && [ -x "/host$link" ] || { echo "shim link missing" >&2; exit 1; }
        grep -q 'io.containerd.kybernate.v1' /host/etc/containerd/config.toml || { echo "runtime not in config.toml" >&2; exit 1; }
        echo "kybernate installed on this node" ;;
esac
trap 'exit 0' TERM INT
while :; do sleep 3600 & wait $!; done
