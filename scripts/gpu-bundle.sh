#!/usr/bin/env bash
# Build .gpu-bundle/kyb-gpu.tar.xz: everything the GPU test machine lacks (it has no package registry and
# no containerd, runc or CRIU), built here on bookworm, compressed to fit the device's 64 MiB transfer.
# tests/gpu/device-setup.sh unpacks it there. Contents:
#   bin/      containerd 1.6, ctr, containerd-shim-runc-v2, runc, criu (+ criu.real), busybox,
#             docker-registry (distribution 2.8, links glibc only: the checkpoint tiers' GPU test)
#   lib/      the shared libraries runc and CRIU link that a stock Ubuntu may lack
#   wheels/   cffi, pycparser, pyroute2, grpcio (+ typing_extensions), nvidia-ml-py and prometheus-client
#             (the node broker: tests/gpu/test_gpu_broker.py) for the device's Python 3.12
#   images/   OCI archive of the CUDA workload image (busybox + workload + the glibc libcuda needs)
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$REPO/.gpu-bundle
STAGE=$OUT/stage
rm -rf "$STAGE"; mkdir -p "$STAGE"/{bin,lib,wheels,images}

need() { command -v "$1" >/dev/null || { echo "gpu-bundle: $1 missing (run scripts/setup.sh)" >&2; exit 1; }; }
need nvcc; need xz
CRIU_BIN=${CRIU_BIN:-/usr/local/sbin/criu}
[ -x "$CRIU_BIN" ] || { echo "gpu-bundle: $CRIU_BIN missing (scripts/build-criu.sh)" >&2; exit 1; }

cp /usr/bin/containerd /usr/bin/ctr /usr/bin/containerd-shim-runc-v2 /usr/sbin/runc /bin/busybox "$STAGE/bin/"
need docker-registry
cp /usr/bin/docker-registry "$STAGE/bin/"
cp "$CRIU_BIN" "$STAGE/bin/criu.real"
# runc calls `criu` by name; the wrapper points the loader at the carried libraries for CRIU alone.
cat > "$STAGE/bin/criu" <<'EOF'
#!/bin/sh
here=$(dirname "$(readlink -f "$0")")
LD_LIBRARY_PATH="$here/../lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}" exec "$here/criu.real" "$@"
EOF
chmod +x "$STAGE/bin/criu"
# Libraries: everything CRIU and runc link except glibc itself (the device has a newer glibc).
for lib in $( (ldd "$CRIU_BIN"; ldd /usr/sbin/runc) | awk '$3 ~ /^\// {print $3}' | sort -u); do
  case "$(basename "$lib")" in libc.so.*|libm.so.*|libdl.so.*|libpthread.so.*|librt.so.*|ld-linux*) continue;; esac
  cp -L "$lib" "$STAGE/lib/"
done

# grpcio: our generated *_pb2_grpc.py refuse an older grpcio than the one that generated them (the
# device's is 1.84), and the GPU tests drive containerd's Tasks.Checkpoint over gRPC (image_path).
GRPC_VERSION=$(.venv/bin/python -c "import grpc; print(grpc.__version__)")
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d "$STAGE/wheels" cffi pycparser pyroute2 "grpcio==$GRPC_VERSION" typing_extensions nvidia-ml-py prometheus-client 2>&1 \
  | grep -v "^WARNING: Location" || true
ls "$STAGE/wheels"/cffi-*.whl "$STAGE/wheels"/pycparser-*.whl "$STAGE/wheels"/pyroute2-*.whl \
   "$STAGE/wheels"/grpcio-*.whl "$STAGE/wheels"/typing_extensions-*.whl \
   "$STAGE/wheels"/nvidia_ml_py-*.whl "$STAGE/wheels"/prometheus_client-*.whl >/dev/null

# The CUDA workload, built for Hopper with the runtime linked statically (no JIT library needed).
nvcc -O2 -arch=sm_90 -cudart static -o "$STAGE/bin/gpu-workload" tests/gpu/workload.cu
.venv/bin/python -m tests.gpu.workload_image "$STAGE/bin/gpu-workload" "$STAGE/images/cuda-workload.tar"

tar -C "$STAGE" -cf - . | xz -T2 -6 > "$OUT/kyb-gpu.tar.xz"
rm -rf "$STAGE"
ls -la "$OUT/kyb-gpu.tar.xz"
size=$(stat -c %s "$OUT/kyb-gpu.tar.xz")
[ "$size" -lt $((48 << 20)) ] || { echo "gpu-bundle: $size bytes is too big for the device's 64 MiB" >&2; exit 1; }
