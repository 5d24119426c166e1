#!/usr/bin/env bash
# The GPU machine's run of the GPU container tests, from the repository root, in under 9 minutes. Carry
# the base bundle and the containerd versions the runs use (scripts/gpu-bundle.sh; the base with one
# version is at most 34 MiB, with two 48 MiB; all three do not fit a call; never carry .gpu-bundle whole):
#   run(command="OUT=$OUT bash tests/gpu/device_containers.sh",
#       carry=[".gpu-bundle/kyb-gpu.tar.xz", ".gpu-bundle/containerd-1.6.tar.xz"], timeout_s=590)
# KYB_GPU_RUNS picks what runs, in order: space-separated VERSION:TARGETS items, TARGETS being test
# files or pytest node ids joined by commas; the default is "1.6:tests/gpu/test_gpu_containers.py". E.g.
#   KYB_GPU_RUNS="1.7:tests/gpu/test_gpu_containers.py 2.1:tests/gpu/test_gpu_containers.py"
#   KYB_GPU_RUNS="1.6:tests/gpu/test_gpu_pytorch.py,tests/gpu/test_gpu_containers.py::test_3_pause_releases_vram_and_resume_brings_it_back"
# (KYB_GPU_TEST_FILE=FILE, the older knob, means "<first carried version>:FILE".)
# On two GPUs (kind nvidia-h200-x2), the two-GPU scenarios (issue 15):
#   run(command="OUT=$OUT KYB_GPU_RUNS=1.6:tests/gpu/test_gpu_two_gpus.py bash tests/gpu/device_containers.sh",
#       carry=[".gpu-bundle/kyb-gpu.tar.xz", ".gpu-bundle/containerd-1.6.tar.xz"], kind="nvidia-h200-x2", timeout_s=590)
# The runs share the time: each gets what is left of KYB_GPU_BUDGET_S (default 560 s from the start);
# a run is not started with less than 45 s left (run.log says so). KYB_GPU_PYTEST_ARGS go to every run.
# Writes two files to $OUT (a call brings back at most 8), both refreshed after every run, so that a run
# cut short leaves what was done before it:
#   run.log          what ran, each run's exit status and time, its pass/fail lines, the summaries (.md)
#   results.tar.xz   everything, unpacked with `tar -xJf`:
#     setup.log            tests/gpu/device-setup.sh: versions, libcuda, GPU
#     unit.log             tests/unit/shim/test_gpu_lifecycle.py under the device's Python (stand-in driver)
#     run.log              as above
#     containerd-V/        per containerd version V, per run (NAME: the first target's file without test_
#                          and .py): NAME.log (pytest -rA), the numbers the tests write (gpu_containers.json/
#                          .md, gpu_pytorch.json/.md, two_gpus.json/.md), NAME-shim-gpu.log and
#                          NAME-containerd-tail.log (the shim's lines from containerd's log, its last lines)
set -u
START=$(date +%s)
OUT=${OUT:-/tmp/kyb-out}
WORK=$(mktemp -d /tmp/kyb-gpu-out.XXXXXX)        # what comes back
BASETEMP=$(mktemp -d /tmp/kyb-gpu-pytest.XXXXXX)  # the runs' pytest tmp dirs: containerd roots, images
BUDGET=${KYB_GPU_BUDGET_S:-560}
mkdir -p "$OUT"
elapsed() { echo $(( $(date +%s) - START )); }
say() { echo "$*" | tee -a "$WORK/run.log"; }
publish() {  # the two files $OUT brings back
  cp "$WORK/run.log" "$OUT/run.log" 2>/dev/null
  tar -C "$WORK" -cf - . | xz -T2 -6 > "$OUT/results.tar.xz.tmp" && mv "$OUT/results.tar.xz.tmp" "$OUT/results.tar.xz"
}

. tests/gpu/device-setup.sh > "$WORK/setup.log" 2>&1
cat "$WORK/setup.log"
if [ "${KYB_SETUP_OK:-0}" != 1 ]; then say "setup failed after $(elapsed)s"; publish; exit 1; fi
say "setup done in $(elapsed)s; containerd carried: $KYB_GPU_CONTAINERD_CARRIED"

# The orchestration tests with the stand-in libcuda, under this machine's Python (needs gcc).
if command -v gcc >/dev/null || command -v cc >/dev/null; then
  timeout 60 python3 -m pytest -q -rfE -p no:cacheprovider tests/unit/shim/test_gpu_lifecycle.py > "$WORK/unit.log" 2>&1
  say "unit rc=$? at $(elapsed)s: $(tail -1 "$WORK/unit.log")"
else
  echo "no C compiler: stand-in driver tests not run" > "$WORK/unit.log"
fi
publish

REPO=$PWD
first_carried=${KYB_GPU_CONTAINERD_CARRIED%% *}
if [ -z "${KYB_GPU_RUNS:-}" ]; then
  if [ -n "${KYB_GPU_TEST_FILE:-}" ]; then KYB_GPU_RUNS="$first_carried:$KYB_GPU_TEST_FILE"
  else KYB_GPU_RUNS="$first_carried:tests/gpu/test_gpu_containers.py"; fi
fi

# After a run cut short: what it may have left, and only what this script's runs started: the
# containerds whose config lies under $BASETEMP (the runs' pytest --basetemp), the shims serving them (by
# their -address), the processes in those shims' containerd namespaces' cgroups, the CUDA processes
# nvidia-smi lists on the GPU machine (only our tests start any there), the bare workloads of the timing
# test (by binary path). Mounts and runc state stay: a later run uses its own namespace and dirs.
reap_leftovers() {
  local pid config address shim namespace namespaces=""
  for pid in $(pgrep -f -- "--config $BASETEMP/" 2>/dev/null); do
    config=$(tr '\0' '\n' < "/proc/$pid/cmdline" 2>/dev/null | sed -n '/^--config$/{n;p;q}')
    address=$(sed -n 's/^ *address = "\(.*containerd\.sock\)"$/\1/p' "$config" 2>/dev/null | head -1)
    kill -9 "$pid" 2>/dev/null
    [ -n "$address" ] || continue
    for shim in $(pgrep -f -- "-address $address" 2>/dev/null); do
      namespace=$(tr '\0' '\n' < "/proc/$shim/cmdline" 2>/dev/null | sed -n '/^-namespace$/{n;p;q}')
      namespaces="$namespaces $namespace"
      kill -9 "$shim" 2>/dev/null
    done
  done
  for namespace in $namespaces; do  # the containers' processes: runc puts them in cgroups /<namespace>/<id>
    for pid in $(grep -l ":/$namespace/" /proc/[0-9]*/cgroup 2>/dev/null | cut -d/ -f3); do kill -9 "$pid" 2>/dev/null; done
  done
  if [ -e /dev/nvidia0 ]; then
    for pid in $(nvidia-smi --query-compute-apps=pid --format=csv,noheader 2>/dev/null) \
               $(pgrep -f "^${KYB_GPU_WORKLOAD:-/opt/kyb/bin/gpu-workload} " 2>/dev/null); do
      kill -9 "$pid" 2>/dev/null
    done
  fi
  rm -rf /dev/shm/kyb-bare /dev/shm/kyb-ours /dev/shm/kyb-bare-status /var/tmp/kyb-bare /var/tmp/kyb-ours \
    /var/tmp/kyb-bare-status /dev/shm/kyb-2gpu-* /var/tmp/kyb-2gpu-* /dev/shm/kyb-torch-* /var/tmp/kyb-torch-*
}

runs=0
for item in $KYB_GPU_RUNS; do
  version=${item%%:*}
  targets=${item#*:}; targets=${targets//,/ }
  case " $KYB_GPU_CONTAINERD_CARRIED " in
    *" $version "*) ;;
    *) say "SKIPPED $item: containerd $version not carried (.gpu-bundle/containerd-$version.tar.xz)"; continue;;
  esac
  left=$(( BUDGET - $(elapsed) ))
  if [ "$left" -lt 45 ]; then say "NOT RUN $item: ${left}s left of ${BUDGET}s"; continue; fi
  dir=$WORK/containerd-$version
  mkdir -p "$dir"
  first=${targets%% *}; name=$(basename "${first%%::*}" .py); name=${name#test_}
  say "run $item on containerd $version with ${left}s left"
  runs=$((runs + 1))
  KYB_GPU_CONTAINERD=$version KYB_GPU_OUT=$dir timeout -k 10 "$left" \
    python3 -m pytest -v -rA -p no:cacheprovider --basetemp="$BASETEMP/$runs" $targets ${KYB_GPU_PYTEST_ARGS:-} \
    > "$dir/$name.log" 2>&1
  rc=$?
  say "$item rc=$rc at $(elapsed)s"
  grep -E "^(PASSED|FAILED|ERROR|SKIPPED)|passed|failed" "$dir/$name.log" | tail -20 | tee -a "$WORK/run.log"
  for f in shim-gpu.log containerd-tail.log; do [ -f "$dir/$f" ] && mv "$dir/$f" "$dir/$name-$f"; done
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then say "$item: cut short by its time; reaping what it left"; reap_leftovers; fi
  publish
done

for md in "$WORK"/containerd-*/*.md; do [ -f "$md" ] && { say "== ${md#$WORK/}"; cat "$md" | tee -a "$WORK/run.log"; }; done
reap_leftovers
nvidia-smi --query-compute-apps=pid,used_memory --format=csv,noheader 2>/dev/null | head -5
say "done in $(elapsed)s"
publish
rm -rf "$WORK"
