"""Load packaging/kybernate_install.py (a standalone script, not a package module) for the tests.

`packaging` is not importable as ours: the name belongs to the PyPI `packaging` distribution in the
venv, and the installer must stay a single stdlib-only file that runs before Kybernate is installed.
"""
import importlib.util
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGING = REPO / "packaging"
INSTALLER = PACKAGING / "kybernate_install.py"


def load():
    name = "kybernate_install"
    if name in sys.modules:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, INSTALLER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module
