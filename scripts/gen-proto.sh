#!/usr/bin/env bash
# Regenerate the Python modules of proto/ from our .proto files with the pinned grpcio-tools.
#
#   scripts/gen-proto.sh            regenerate in place (what `make proto` runs)
#   scripts/gen-proto.sh OUTDIR     write the generated tree to OUTDIR instead (the drift test uses this)
#
# protoc runs from the repository root with `-I .`, so a file proto/a/b/x.proto imports as
# "proto/a/b/x.proto" and its module imports as `proto.a.b.x_pb2`. The well-known types
# (google/protobuf/*.proto) come from grpc_tools' bundled include directory.
# gRPC stubs (*_pb2_grpc.py) are generated only for the gRPC APIs: proto/k8s/** (CRI) and
# proto/containerd/services/** except the ttrpc services.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"
PY="${PY:-$ROOT/.venv/bin/python}"
OUT="${1:-$ROOT}"
mkdir -p "$OUT"
OUT="$(cd "$OUT" && pwd)"

mapfile -t ALL < <(find proto -name '*.proto' | LC_ALL=C sort)
mapfile -t GRPC < <(printf '%s\n' "${ALL[@]}" | grep -E '^proto/(k8s/|containerd/services/)' \
                    | grep -v '^proto/containerd/services/ttrpc/' || true)

if [[ "$OUT" == "$ROOT" ]]; then
    # drop generated modules first so that a removed .proto leaves no stale module behind
    find proto -name '*_pb2.py' -delete -o -name '*_pb2_grpc.py' -delete -o -name '*_pb2.pyi' -delete
fi

"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" "${ALL[@]}"
if ((${#GRPC[@]})); then
    "$PY" -m grpc_tools.protoc -I . --grpc_python_out="$OUT" "${GRPC[@]}"
fi

# every directory of the tree is a Python package
while IFS= read -r d; do
    [[ -e "$OUT/$d/__init__.py" ]] || : > "$OUT/$d/__init__.py"
done < <(find proto -type d -not -name __pycache__ | LC_ALL=C sort)
