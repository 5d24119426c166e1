"""packaging/ for the tests: the node installer (kybernate_install.py) and its TOML module
(containerd_toml.py) are standalone scripts, not package modules.

`packaging` is not importable as ours: the name belongs to the PyPI `packaging` distribution in the
venv, and the installer must run before Kybernate is installed. When the script runs, its directory is
sys.path[0], which is how it imports containerd_toml; the tests get the same by appending packaging/.
"""
import importlib
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
PACKAGING = REPO / "packaging"
INSTALLER = PACKAGING / "kybernate_install.py"

if str(PACKAGING) not in sys.path:
    sys.path.append(str(PACKAGING))


def load():
    """The installer module (kybernate_install)."""
    return importlib.import_module("kybernate_install")


def load_toml():
    """The config.toml module (containerd_toml)."""
    return importlib.import_module("containerd_toml")
