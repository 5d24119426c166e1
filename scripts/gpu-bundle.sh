#!/usr/bin/env bash
# Build what the GPU test machine lacks (it has no package registry and no containerd, runc or CRIU),
# built here on bookworm, compressed for the device's 64 MiB carry. tests/gpu/device-setup.sh unpacks it.
#
#   .gpu-bundle/kyb-gpu.tar.xz          the base, always carried:
#       bin/      runc 1.1, criu (+ criu.real), busybox, gpu-workload
#       lib/      the shared libraries runc and CRIU link that a stock Ubuntu may lack
#       wheels/   cffi, pycparser, pyroute2, grpcio (+ typing_extensions), nvidia-ml-py and prometheus-client
#                 (the node broker: tests/gpu/test_gpu_broker.py) for the device's Python 3.12
#       images/   OCI archive of the CUDA workload image (busybox + workload + the glibc libcuda needs)
#   .gpu-bundle/registry.tar.xz         bin/docker-registry (distribution 2.8): only for tests/gpu/test_gpu_tiers.py
#   .gpu-bundle/containerd-1.6.tar.xz   deps/containerd-1.6/usr/bin/{containerd,ctr}      (device: /usr/bin)
#   .gpu-bundle/containerd-1.7.tar.xz   deps/containerd-1.7/usr/bin/{containerd,ctr}
#   .gpu-bundle/containerd-2.1.tar.xz   deps/containerd-2.1/usr/bin/{containerd,ctr} and runc 1.3 with the
#                                       libseccomp it was built against (deps/runc-1.3/{usr/sbin,lib})
# The base is about 19 MiB, one containerd version 13-16 MiB (containerd and ctr share most of their
# code: one xz window over both, with the x86 branch filter, packs them a quarter smaller than apart).
# Carry the base and the one or two versions a run uses: a device call carries 64 MiB in all, the
# working tree (about 3 MiB) included; all three versions do not fit. No containerd-shim-runc-v2 is
# carried: the GPU tests run only the kybernate runtime.
#
# KYB_GPU_BUNDLE_CONTAINERD="1.6 1.7 2.1" (the default) picks the versions. A version's archive is
# rebuilt only when its input binaries changed (their sizes and mtimes are kept beside it).
set -euo pipefail
cd "$(dirname "$0")/.."
REPO=$PWD
OUT=$REPO/.gpu-bundle
STAGE=$OUT/stage
DEPS=${KYB_DEPS:-/opt/kybernate-deps}
VERSIONS=${KYB_GPU_BUNDLE_CONTAINERD:-1.6 1.7 2.1}
MiB=$((1 << 20))
rm -rf "$STAGE"; mkdir -p "$STAGE"/{bin,lib,wheels,images}

need() { command -v "$1" >/dev/null || { echo "gpu-bundle: $1 missing (run scripts/setup.sh)" >&2; exit 1; }; }
need nvcc; need xz; need patchelf
CRIU_BIN=${CRIU_BIN:-/usr/local/sbin/criu}
[ -x "$CRIU_BIN" ] || { echo "gpu-bundle: $CRIU_BIN missing (scripts/build-criu.sh)" >&2; exit 1; }

compress() {  # compress DIR ARCHIVE [XZ OPTIONS]: tar DIR's content into ARCHIVE (xz), atomically
  local dir=$1 archive=$2
  shift 2
  [ "$#" -gt 0 ] || set -- -T2 -6
  tar -C "$dir" -cf - . | xz "$@" > "$archive.tmp"
  mv "$archive.tmp" "$archive"
}
# Executables only: the x86 branch filter, and a window (128 MiB) over containerd and ctr together.
# Compressing takes about 1.5 GiB of memory and 2 minutes a version (two run at once), unpacking 130 MiB.
BINARY_XZ="--x86 --lzma2=preset=9,dict=128MiB -T1"

# ---- the base ----------------------------------------------------------------------------------------
cp /usr/sbin/runc /bin/busybox "$STAGE/bin/"
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

compress "$STAGE" "$OUT/kyb-gpu.tar.xz"

# ---- the registry for the checkpoint tiers' GPU test (tests/gpu/test_gpu_tiers.py), its own archive ---------
# docker-registry (CNCF distribution 2.8 from bookworm) links glibc only; carried only for that test.
need docker-registry
rm -rf "$STAGE"; mkdir -p "$STAGE/bin"
cp /usr/bin/docker-registry "$STAGE/bin/"
compress "$STAGE" "$OUT/registry.tar.xz" $BINARY_XZ
rm -rf "$STAGE"

# ---- one archive per containerd version ------------------------------------------------------------------
# version_inputs V: "SOURCE IN-ARCHIVE" lines, what the archive of version V holds.
version_inputs() {
  case "$1" in
    1.6) echo "/usr/bin/containerd deps/containerd-1.6/usr/bin/containerd"
         echo "/usr/bin/ctr deps/containerd-1.6/usr/bin/ctr";;
    1.7|2.1)
         echo "$DEPS/containerd-$1/usr/bin/containerd deps/containerd-$1/usr/bin/containerd"
         echo "$DEPS/containerd-$1/usr/bin/ctr deps/containerd-$1/usr/bin/ctr";;
    *) echo "gpu-bundle: unknown containerd version $1 (1.6, 1.7 or 2.1)" >&2; return 1;;
  esac
  if [ "$1" = 2.1 ]; then  # containerd 2.1 runs with runc 1.3 (tests/integration/harness.py)
    echo "$DEPS/runc-1.3/usr/sbin/runc deps/runc-1.3/usr/sbin/runc"
    echo "$DEPS/runc-1.3/glibc/usr/lib/x86_64-linux-gnu/libseccomp.so.2 deps/runc-1.3/lib/libseccomp.so.2"
  fi
}

pack_version() {  # pack_version V: .gpu-bundle/containerd-V.tar.xz, unless its inputs are unchanged
  local v=$1 archive=$OUT/containerd-$1.tar.xz stage=$OUT/stage-$1 inputs stamp
  inputs=$(version_inputs "$v") || return 1
  stamp=$(echo "$BINARY_XZ"; echo "$inputs" | while read -r src _; do stat -L -c "%n %s %Y" "$src"; done)
  if [ -f "$archive" ] && [ "$(cat "$archive.inputs" 2>/dev/null)" = "$stamp" ]; then
    echo "gpu-bundle: containerd-$v.tar.xz is up to date"
    return 0
  fi
  rm -rf "$stage"; mkdir -p "$stage"
  echo "$inputs" | while read -r src dst; do
    mkdir -p "$stage/$(dirname "$dst")"
    cp -L "$src" "$stage/$dst"
  done
  local runc13=$stage/deps/runc-1.3/usr/sbin/runc
  if [ -f "$runc13" ]; then
    # Here runc 1.3 loads sid's glibc from $DEPS (scripts/setup.sh, patchelf); the device's glibc 2.39 is
    # new enough (it needs 2.38): the system loader, and the carried libseccomp beside it ($ORIGIN).
    patchelf --set-interpreter /lib64/ld-linux-x86-64.so.2 --set-rpath '$ORIGIN/../../lib' "$runc13"
  fi
  # shellcheck disable=SC2086 - BINARY_XZ is a list of options
  compress "$stage" "$archive" $BINARY_XZ
  echo "$stamp" > "$archive.inputs"
  rm -rf "$stage"
}

running=0
for v in $VERSIONS; do
  pack_version "$v" &
  running=$((running + 1))
  if [ "$running" -ge 2 ]; then wait -n || exit 1; running=$((running - 1)); fi
done
while [ "$running" -gt 0 ]; do wait -n || exit 1; running=$((running - 1)); done

# ---- sizes: the base with any two versions must fit a device call with room to spare ----------------------
size_of() { stat -c %s "$1"; }
base=$(size_of "$OUT/kyb-gpu.tar.xz")
echo "gpu-bundle: kyb-gpu.tar.xz $((base / 1024)) KiB"
largest=0; second=0
for v in $VERSIONS; do
  s=$(size_of "$OUT/containerd-$v.tar.xz")
  echo "gpu-bundle: containerd-$v.tar.xz $((s / 1024)) KiB"
  if [ "$s" -gt "$largest" ]; then second=$largest; largest=$s; elif [ "$s" -gt "$second" ]; then second=$s; fi
done
total=$((base + largest + second))
echo "gpu-bundle: the base with one version: at most $(((base + largest) / MiB)) MiB; with the two largest:" \
     "$((total / MiB)) MiB (a device call carries 64 MiB, the working tree included)"
[ "$base" -lt $((24 * MiB)) ] || { echo "gpu-bundle: the base ($base bytes) outgrew its 24 MiB" >&2; exit 1; }
[ "$total" -lt $((54 * MiB)) ] || { echo "gpu-bundle: base + two versions = $total bytes, over 54 MiB" >&2; exit 1; }
