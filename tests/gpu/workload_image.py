"""The CUDA workload image for tests/gpu: busybox, the workload binary, and the glibc it and libcuda need.

libcuda itself is not in the image: as nvidia-container-runtime does, the test bundle bind-mounts the
host driver's library dir (read-only, same path) and puts it on LD_LIBRARY_PATH. libcuda dlopens and
links libdl, libpthread, librt, libm and libc: without them in the image cudart reports "CUDA driver
version is insufficient" (gpu-facts.md). The image's glibc is the build machine's (bookworm), the same
one the workload was linked against.

    python -m tests.gpu.workload_image WORKLOAD_BINARY DEST.tar
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from tests.integration.images import build_image

CUDA_WORKLOAD_REF = "docker.io/kybernate/cuda-workload:test"
# What libcuda links (besides what ldd of the workload shows): present whatever the workload needs.
LIBCUDA_NEEDS = ("libdl.so.2", "libpthread.so.0", "librt.so.1", "libm.so.6", "libc.so.6")
LIB_DIR = Path("/lib/x86_64-linux-gnu")


def runtime_libraries(binary: Path) -> dict[str, Path]:
    """In-image path -> host file for the loader and every library the workload and libcuda need."""
    out = subprocess.run(["ldd", str(binary)], capture_output=True, text=True, check=True).stdout
    files: dict[str, Path] = {}
    for line in out.splitlines():
        parts = line.split()
        if "=>" in parts and len(parts) >= 3 and parts[2].startswith("/"):
            files[parts[2]] = Path(parts[2]).resolve()
        elif parts and parts[0].startswith("/"):          # the loader
            files[parts[0]] = Path(parts[0]).resolve()
    for name in LIBCUDA_NEEDS:
        files.setdefault(str(LIB_DIR / name), (LIB_DIR / name).resolve())
    return files


def build(workload: Path, dest: Path):
    extra = {"/usr/local/bin/gpu-workload": Path(workload)}
    for in_image, host_file in runtime_libraries(Path(workload)).items():
        extra[in_image] = host_file
    # The loader is looked up at /lib64/ld-linux-x86-64.so.2: a copy serves as well as the usual link.
    return build_image(Path(dest), ref=CUDA_WORKLOAD_REF, extra_files=extra,
                       cmd=["/usr/local/bin/gpu-workload"])


if __name__ == "__main__":
    archive = build(Path(sys.argv[1]), Path(sys.argv[2]))
    print(f"{archive.ref} -> {archive.path} ({archive.path.stat().st_size} bytes)")
