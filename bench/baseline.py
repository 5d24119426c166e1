"""A second kybernate shim, built from another git revision, as a third runtime of the same containerd:
before and after a change measured side by side in one run, next to runc-v2 (bench/checkpoint_bench.py
and bench/restore_profile.py take ``--baseline REV``).

The revision's tree is exported (``git archive``) into a temporary directory; a shim script named for
the runtime ``io.containerd.kybernatebase.v1`` (``containerd-shim-kybernatebase-v1``, in .venv/bin, which
is on the private containerd's PATH) runs this venv's interpreter with that tree first on sys.path, so
the packages are the revision's and the dependencies this venv's. Its warm template is its own (one
per binary). Both are removed again on the way out.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from typing import Iterator

REPO = Path(__file__).resolve().parents[1]
VENV_BIN = REPO / ".venv" / "bin"
RUNTIME = "io.containerd.kybernatebase.v1"
BINARY = "containerd-shim-kybernatebase-v1"


@contextlib.contextmanager
def baseline_shim(rev: str) -> Iterator[str]:
    """The shim of git revision `rev` installed as runtime `RUNTIME` for the duration; yields the
    revision's short commit id."""
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", rev], check=True,
                            capture_output=True, text=True).stdout.strip()
    tree = Path(tempfile.mkdtemp(prefix=f"kyb-baseline-{commit}-", dir="/var/tmp"))
    script = VENV_BIN / BINARY
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", commit], check=True,
                                 capture_output=True).stdout
        with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
            tar.extractall(tree)
        body = (tree / "bin" / "containerd-shim-kybernate-v1").read_text().split("\n", 1)[1]
        script.write_text(f"#!{sys.executable}\n# {BINARY}: kybernate at {commit} ({tree}), bench/baseline.py\n"
                          f"import sys\nsys.path.insert(0, {str(tree)!r})\n{body}")
        script.chmod(0o755)
        yield commit
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(script)
        shutil.rmtree(tree, ignore_errors=True)
