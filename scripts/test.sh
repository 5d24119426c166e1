#!/usr/bin/env bash
# The whole test suite, as CI runs it (.ci/run): set-up first (quiet when everything is in place),
# then pytest over tests/unit, tests/integration and tests/gpu (GPU tests skip themselves without a GPU).
# Extra arguments go to pytest. Exits non-zero when set-up fails, a test fails or no test ran, and
# in CI (CI set, not "false"/"0") as root also when no integration test passed: with containerd
# missing they would all skip and a green run would mean nothing (scripts/integration_ran.py reads
# pytest's JUnit report for that).
set -uo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO" || exit 1

t0=$(date +%s)
if ! bash scripts/setup.sh --quiet; then
    echo "test.sh: scripts/setup.sh failed" >&2
    exit 1
fi

suites=()
for d in tests/unit tests/integration tests/gpu; do
    [ -d "$d" ] && suites+=("$d")
done
log=$(mktemp /tmp/kybernate-pytest.XXXXXX)
junit=$(mktemp /tmp/kybernate-junit.XXXXXX)
trap 'rm -f "$log" "$junit"' EXIT
.venv/bin/python -m pytest -q -rfE --junitxml="$junit" "${suites[@]}" "$@" 2>&1 | tee "$log"
rc=${PIPESTATUS[0]}

summary=$(grep -E '(passed|failed|errors?|skipped|no tests ran|deselected).* in [0-9.]+s' "$log" | tail -n1 |
          sed -E 's/^=+ //; s/ =+$//')
[ -n "$summary" ] || summary=$(tail -n1 "$log")
echo "test.sh: ${summary} (pytest exit $rc, $(( $(date +%s) - t0 ))s with set-up)"
case "${CI:-}" in
    ""|0|false|False|FALSE|no) in_ci=0 ;;
    *) in_ci=1 ;;
esac
if [ "$in_ci" = 1 ] && [ "$(id -u)" = 0 ] && [ "$rc" = 0 ]; then
    if ! .venv/bin/python scripts/integration_ran.py "$junit"; then
        echo "test.sh: CI as root, and no integration test ran: counted as a failure" >&2
        exit 6
    fi
fi
case "$rc" in
    0) exit 0 ;;
    5) echo "test.sh: pytest collected no tests: counted as a failure" >&2; exit 5 ;;
    *) exit "$rc" ;;
esac
