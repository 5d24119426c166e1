#!/usr/bin/env bash
# On the GPU test machine (no registry; Ubuntu userland; Python 3.12 with protobuf, psutil, pytest):
# unpack .gpu-bundle/kyb-gpu.tar.xz and each .gpu-bundle/containerd-<version>.tar.xz carried
# (scripts/gpu-bundle.sh) so that tests/integration/harness.py finds containerd + runc + CRIU 4 where it
# looks: containerd 1.6 in /usr/bin with runc 1.1 at /usr/sbin/runc, containerd 1.7 and 2.1 (and 2.1's
# runc 1.3) under $KYB_DEPS=/opt/kyb/deps; and our shim where it looks for the venv.
#
# Source it from the repository root: `. tests/gpu/device-setup.sh`. It exports PYTHONPATH (the repo
# and /tmp/site, where the carried wheels go), KYB_DEPS, KYB_GPU_CONTAINERD_CARRIED (the containerd
# versions unpacked, e.g. "1.6 2.1"), KYB_CONTAINERD_VERSIONS (the same, comma-separated),
# KYB_GPU_WORKLOAD_IMAGE, KYB_GPU_WORKLOAD, KYB_LIBCUDA (the driver's libcuda.so.1, resolved) and
# KYB_SETUP_OK=1 on success (0 and a message on stderr otherwise; it never exits the shell that sources it).
#
# The shim script it writes (REPO/.venv/bin/containerd-shim-kybernate-v1) runs the machine's python3
# with REPO and /tmp/site first on sys.path and KYBERNATE_LIBCUDA set: containerd's environment (the harness
# keeps only PATH and a few locale variables) has no LD_LIBRARY_PATH, and libcuda.so.1 may live outside
# the loader's default path (/usr/local/nvidia/lib64 on the test machine).
#
# For a dry run elsewhere: KYB_SETUP_ROOT=/tmp/x prefixes every system path it writes (/opt/kyb,
# /usr/bin, /usr/sbin, /usr/local/sbin, /bin), KYB_SETUP_VENV replaces REPO/.venv, KYB_SETUP_SITE
# replaces /tmp/site.
_kyb_setup() {
  local repo root kyb site venv py libcuda
  repo=$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)
  root=${KYB_SETUP_ROOT:-}
  kyb=$root/opt/kyb
  site=${KYB_SETUP_SITE:-/tmp/site}
  venv=${KYB_SETUP_VENV:-$repo/.venv}
  py=$(command -v python3) || { echo "device-setup: no python3" >&2; return 1; }
  [ -f "$repo/.gpu-bundle/kyb-gpu.tar.xz" ] || { echo "device-setup: $repo/.gpu-bundle/kyb-gpu.tar.xz missing (carry .gpu-bundle/kyb-gpu.tar.xz and a .gpu-bundle/containerd-<version>.tar.xz)" >&2; return 1; }

  mkdir -p "$kyb" "$root/usr/bin" "$root/usr/sbin" "$root/usr/local/sbin" "$root/bin" || return 1
  xz -dc "$repo/.gpu-bundle/kyb-gpu.tar.xz" | tar -C "$kyb" -xf - || { echo "device-setup: unpack failed" >&2; return 1; }
  # The tiers' registry, where carried (.gpu-bundle/registry.tar.xz: bin/docker-registry).
  if [ -f "$repo/.gpu-bundle/registry.tar.xz" ]; then
    xz -dc "$repo/.gpu-bundle/registry.tar.xz" | tar -C "$kyb" -xf - || { echo "device-setup: unpack of registry.tar.xz failed" >&2; return 1; }
  fi
  # The containerd versions carried: each its own archive, unpacked under $kyb/deps.
  local archive version carried="" runc13
  for archive in "$repo"/.gpu-bundle/containerd-*.tar.xz; do
    [ -f "$archive" ] || continue
    version=$(basename "$archive" .tar.xz); version=${version#containerd-}
    xz -dc "$archive" | tar -C "$kyb" -xf - || { echo "device-setup: unpack of $archive failed" >&2; return 1; }
    carried="$carried $version"
  done
  carried=${carried# }
  [ -n "$carried" ] || { echo "device-setup: no .gpu-bundle/containerd-<version>.tar.xz carried" >&2; return 1; }

  # runc links libseccomp: wrap it like criu so that the carried copy is used, for runc alone.
  cat > "$kyb/bin/runc-wrapper" <<EOF
#!/bin/sh
LD_LIBRARY_PATH="$kyb/lib\${LD_LIBRARY_PATH:+:\$LD_LIBRARY_PATH}" exec $kyb/bin/runc "\$@"
EOF
  chmod +x "$kyb/bin/runc-wrapper"
  if [ -d "$kyb/deps/containerd-1.6" ]; then  # the harness runs 1.6 from /usr/bin
    install -m755 "$kyb/deps/containerd-1.6/usr/bin/containerd" "$kyb/deps/containerd-1.6/usr/bin/ctr" "$root/usr/bin/" \
      || return 1
  fi
  ln -sf "$kyb/bin/runc-wrapper" "$root/usr/sbin/runc"
  ln -sf "$kyb/bin/criu" "$root/usr/local/sbin/criu"  # the wrapper finds criu.real and lib/ through readlink -f
  [ -x "$root/bin/busybox" ] || install -m755 "$kyb/bin/busybox" "$root/bin/busybox"

  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" \
    "$kyb"/wheels/*.whl || { echo "device-setup: wheel install failed" >&2; return 1; }

  # The driver's libcuda: the loader's cache, else what a python that loaded it maps, else known dirs.
  libcuda=$(ldconfig -p 2>/dev/null | awk '$1 == "libcuda.so.1" {print $NF; exit}')
  if [ -z "$libcuda" ]; then
    libcuda=$("$py" -c '
import ctypes
try:
    ctypes.CDLL("libcuda.so.1")
except OSError:
    raise SystemExit(0)
for line in open("/proc/self/maps"):
    path = line.split()[-1]
    if "libcuda.so" in path.rsplit("/", 1)[-1]:
        print(path)
        break
')
  fi
  if [ -z "$libcuda" ]; then
    for d in /usr/local/nvidia/lib64 /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/local/cuda/compat; do
      [ -e "$d/libcuda.so.1" ] && { libcuda=$d/libcuda.so.1; break; }
    done
  fi
  [ -n "$libcuda" ] && libcuda=$(readlink -f "$libcuda")

  mkdir -p "$venv/bin" || return 1
  # A python script, not a shell wrapper: the warm template serves only a peer whose command line is
  # "<interpreter> <this script> ... start" (shim/binary/template.py), as bin/containerd-shim-kybernate-v1 is.
  local libline=""
  [ -n "$libcuda" ] && libline="os.environ.setdefault('KYBERNATE_LIBCUDA', '$libcuda')"
  cat > "$venv/bin/containerd-shim-kybernate-v1" <<EOF
#!$py
import os, sys
sys.path[:0] = ["$repo", "$site"]
$libline
from shim.binary.cli import main
sys.exit(main())
EOF
  cat > "$venv/bin/python" <<EOF
#!/bin/sh
PYTHONPATH="$repo:$site\${PYTHONPATH:+:\$PYTHONPATH}" exec $py "\$@"
EOF
  chmod +x "$venv/bin/containerd-shim-kybernate-v1" "$venv/bin/python"

  export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
  export KYB_DEPS=$kyb/deps KYB_GPU_CONTAINERD_CARRIED=$carried
  export KYB_CONTAINERD_VERSIONS=${carried// /,}
  export KYB_GPU_WORKLOAD_IMAGE=$kyb/images/cuda-workload.tar KYB_GPU_WORKLOAD=$kyb/bin/gpu-workload
  export KYB_LIBCUDA=$libcuda
  # the checkpoint tiers' registry (docker-registry from bookworm, in the bundle): tests/gpu/test_gpu_tiers.py
  [ -x "$kyb/bin/docker-registry" ] && export KYB_REGISTRY_BINARY=$kyb/bin/docker-registry
  echo "libcuda: ${libcuda:-NOT FOUND}"
  echo "containerd carried: $carried"
  for version in $carried; do
    case "$version" in
      1.6) "$root/usr/bin/containerd" --version; "$root/usr/sbin/runc" --version | head -1;;
      2.1) "$kyb/deps/containerd-2.1/usr/bin/containerd" --version
           runc13=$("$kyb/deps/runc-1.3/usr/sbin/runc" --version) \
             || { echo "device-setup: runc 1.3 (containerd 2.1's) does not run here" >&2; return 1; }
           echo "${runc13%%$'\n'*}";;
      *) "$kyb/deps/containerd-$version/usr/bin/containerd" --version;;
    esac
  done
  case " $carried " in *" 1.6 "*) ;; *) "$root/usr/sbin/runc" --version | head -1;; esac
  "$root/usr/local/sbin/criu" --version | head -1
  [ -z "$root" ] && { criu check 2>&1 | tail -1; }
  "$py" -c "import sys, cffi, grpc, google.protobuf as pb; print('python', sys.version.split()[0], 'cffi', cffi.__version__, 'grpc', grpc.__version__, 'protobuf', pb.__version__)" \
    || { echo "device-setup: python modules missing" >&2; return 1; }
  if command -v nvidia-smi >/dev/null; then
    nvidia-smi --query-gpu=name,uuid,driver_version,memory.used,memory.total --format=csv,noheader
  fi
  return 0
}
if _kyb_setup; then KYB_SETUP_OK=1; else KYB_SETUP_OK=0; echo "device-setup: FAILED" >&2; fi
export KYB_SETUP_OK
unset -f _kyb_setup
