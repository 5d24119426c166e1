#!/usr/bin/env bash
# The GPU machine's profile run for issue 15, from the repository root, in under 9 minutes:
#   run(command="OUT=$OUT bash tests/gpu/device_profile.sh", timeout_s=590,
#       carry=[".gpu-bundle/kyb-gpu.tar.xz", ".gpu-bundle/containerd-1.6.tar.xz", ".gpu-bundle/criu-alt"])
# 1. (KYB_SKIP_PROBE=0) bench/page_read_probe.c: how fast private memory fills from an image in /dev/shm, the ways a
#    restorer could do it (page_read_probe.jsonl).
# 2. bench/gpu_profile.py: stage profile of checkpoint and restore of GPU containers (sizes in
#    KYB_PROFILE_GIB, default 2,8) next to the bare driver + CRIU sequence (gpu_profile.json/.md);
#    KYB_CRIU_ALT=/path/to/criu adds a bare run with a second CRIU (.gpu-bundle may carry one:
#    criu-alt/criu in the bundle's dir is used when present).
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/kyb-out}
mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - START )); }

. tests/gpu/device-setup.sh > "$OUT/setup.log" 2>&1
cat "$OUT/setup.log"
if [ "${KYB_SETUP_OK:-0}" != 1 ]; then echo "setup failed after $(elapsed)s"; exit 1; fi
echo "setup done in $(elapsed)s"
# .gpu-bundle/criu-alt/criu.real: a second CRIU for the comparison (as carried now: CRIU 4.1.1 built
# without scripts/criu-patches, the bare reference; the bundle's own criu has the patches).
# KYB_SHIM_CRIU=bundle (default) keeps the bundle's for the shim and gives the bare runs both;
# KYB_SHIM_CRIU=alt gives the shim the second one. Labels: KYB_BUNDLE_CRIU_LABEL, KYB_ALT_CRIU_LABEL.
if [ -x .gpu-bundle/criu-alt/criu.real ]; then
  printf '#!/bin/sh\nLD_LIBRARY_PATH=/opt/kyb/lib exec %s "$@"\n' "$PWD/.gpu-bundle/criu-alt/criu.real" > /opt/kyb/bin/criu-second
  chmod +x /opt/kyb/bin/criu-second
  bundle_label=${KYB_BUNDLE_CRIU_LABEL:-CRIU 4.1.1 + scripts/criu-patches}
  alt_label=${KYB_ALT_CRIU_LABEL:-CRIU 4.1.1 (no patches)}
  if [ "${KYB_SHIM_CRIU:-bundle}" = alt ]; then
    ln -sf /opt/kyb/bin/criu-second /usr/local/sbin/criu
    export KYB_CRIU_ALT=/opt/kyb/bin/criu
    export KYB_CRIU_LABELS="/usr/local/sbin/criu=$alt_label;/opt/kyb/bin/criu=$bundle_label"
  else
    export KYB_CRIU_ALT=/opt/kyb/bin/criu-second
    export KYB_CRIU_LABELS="/usr/local/sbin/criu=$bundle_label;/opt/kyb/bin/criu-second=$alt_label"
  fi
fi

if [ "${KYB_SKIP_PROBE:-1}" != 1 ] && cc -O2 -pthread -o /tmp/page_read_probe bench/page_read_probe.c 2>"$OUT/probe-build.log"; then
  probe() { /tmp/page_read_probe /dev/shm/kyb-probe.img "$@"; }
  {
    head -c $((2048 << 20)) /dev/urandom > /dev/shm/kyb-probe.img
    for mode in plain populate huge huge+populate; do probe 2048 $mode 1; probe 2048 $mode 1; done
    for t in 2 4 8 16; do probe 2048 plain $t; probe 2048 huge+populate $t; done
    head -c $((8192 << 20)) /dev/urandom > /dev/shm/kyb-probe.img
    probe 8192 plain 1; probe 8192 huge+populate 1; probe 8192 plain 8; probe 8192 huge+populate 8
  } > "$OUT/page_read_probe.jsonl" 2>&1
  rm -f /dev/shm/kyb-probe.img
  echo "probe done at $(elapsed)s"; cat "$OUT/page_read_probe.jsonl" | cut -c1-160
fi

export KYB_GPU_OUT=$OUT
LEFT=$(( 560 - $(elapsed) ))
timeout -k 10 "$LEFT" python3 -m pytest -q -s -rA -p no:cacheprovider bench/gpu_profile.py ${KYB_PROFILE_PYTEST_ARGS:-} \
  > "$OUT/gpu_profile.log" 2>&1
echo "gpu_profile rc=$? at $(elapsed)s"; tail -5 "$OUT/gpu_profile.log"
cat "$OUT/gpu_profile.md" 2>/dev/null
grep -h "profile:" "$OUT"/containerd-tail.log 2>/dev/null | tail -4 | cut -c1-600
for pid in $(pgrep -f "^${KYB_GPU_WORKLOAD:-/opt/kyb/bin/gpu-workload} " 2>/dev/null); do kill -9 "$pid"; done
rm -rf /dev/shm/kyb-prof-* /dev/shm/kyb-bare-* /var/tmp/kyb-prof-* /var/tmp/kyb-bare-*
echo "done in $(elapsed)s"
