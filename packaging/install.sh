#!/bin/sh
# Kybernate node installer: finds a Python that can run it (>= 3.11 for tomllib, with venv/ensurepip)
# and hands every argument to kybernate_install.py next to this script. See `install.sh --help`.
#
#   sudo packaging/install.sh                          # venv in /opt/kybernate, link in /usr/local/bin,
#                                                      # runtime merged into /etc/containerd/config.toml
#   sudo packaging/install.sh --restart-containerd     # ... and restart containerd if the config changed
#   sudo packaging/install.sh --dry-run                # show the plan and the config.toml diff
#   sudo packaging/install.sh --uninstall              # remove all of it again
#
# KYBERNATE_PYTHON=/path/to/python3 picks the interpreter the shim's venv is built on.
set -eu
here=$(cd "$(dirname "$0")" && pwd)
for py in "${KYBERNATE_PYTHON:-}" python3 python3.13 python3.12 python3.11 python3.10; do
    [ -n "$py" ] || continue
    command -v "$py" >/dev/null 2>&1 || continue
    if "$py" -c 'import sys, venv, ensurepip
try:
    import tomllib
except ImportError:
    import tomli
sys.exit(0 if sys.version_info >= (3, 10) else 1)' >/dev/null 2>&1; then
        exec "$py" "$here/kybernate_install.py" --python "$(command -v "$py")" "$@"
    fi
done
echo "install.sh: no usable Python found: Kybernate needs Python >= 3.11 (or 3.10 with tomli) with the" \
     "venv module (Debian/Ubuntu: apt-get install python3 python3-venv); or set KYBERNATE_PYTHON" >&2
exit 1
