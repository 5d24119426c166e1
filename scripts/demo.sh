#!/usr/bin/env bash
# Demo: a private containerd (1.6 by default) runs a busybox counter with the kybernate runtime and
# shows its output. Options (see scripts/demo.py --help): --containerd 1.6|1.7|2.1, --runtime NAME,
# --seconds N. Needs root and scripts/setup.sh (`make demo` runs it first).
set -euo pipefail
REPO=$(cd "$(dirname "$0")/.." && pwd)
cd "$REPO"
[ -x .venv/bin/python ] || { echo "demo.sh: no .venv; run scripts/setup.sh first" >&2; exit 1; }
exec .venv/bin/python scripts/demo.py "$@"
