#!/usr/bin/env bash
# On the GPU test machine (no registry; Ubuntu userland; Python 3.12 with protobuf, grpcio, psutil, pytest):
# unpack .gpu-bundle/kyb-gpu.tar.xz (scripts/gpu-bundle.sh) so that tests/integration/harness.py finds
# containerd 1.6 + runc + CRIU 4 where it looks on bookworm, and our shim where it looks for the venv.
# Source it: `. tests/gpu/device-setup.sh` (it exports PYTHONPATH, PATH and KYB_* for the tests).
set -eu
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
KYB=/opt/kyb
mkdir -p $KYB
xz -dc "$REPO/.gpu-bundle/kyb-gpu.tar.xz" | tar -C $KYB -xf -

# runc links libseccomp: wrap it like criu so the carried copy is used only where the host lacks one.
cat > $KYB/bin/runc-wrapper <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$KYB/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec $KYB/bin/runc "\$@"
EOF
chmod +x $KYB/bin/runc-wrapper
install -m755 $KYB/bin/containerd $KYB/bin/ctr $KYB/bin/containerd-shim-runc-v2 /usr/bin/
ln -sf $KYB/bin/runc-wrapper /usr/sbin/runc
mkdir -p /usr/local/sbin && ln -sf $KYB/bin/criu /usr/local/sbin/criu
[ -x /bin/busybox ] || install -m755 $KYB/bin/busybox /bin/busybox

python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
  $KYB/wheels/*.whl
export PYTHONPATH="$REPO:/tmp/site${PYTHONPATH:+:$PYTHONPATH}"

# The shim binary where the harness expects the venv's console script.
PY=$(command -v python3)
mkdir -p "$REPO/.venv/bin"
cat > "$REPO/.venv/bin/containerd-shim-kybernate-v1" <<EOF
#!/bin/sh
PYTHONPATH="$REPO:/tmp/site" exec $PY -c 'import sys; from shim.cli import main; sys.exit(main())' "\$@"
EOF
cat > "$REPO/.venv/bin/python" <<EOF
#!/bin/sh
PYTHONPATH="$REPO:/tmp/site" exec $PY "\$@"
EOF
chmod +x "$REPO/.venv/bin/containerd-shim-kybernate-v1" "$REPO/.venv/bin/python"
export KYB_CONTAINERD_VERSIONS=1.6
export KYB_GPU_WORKLOAD_IMAGE=$KYB/images/cuda-workload.tar KYB_GPU_WORKLOAD=$KYB/bin/gpu-workload
containerd --version; runc --version | head -1; criu --version | head -1
criu check 2>&1 | tail -1
nvidia-smi --query-gpu=name,driver_version,memory.used --format=csv,noheader
set +eu
