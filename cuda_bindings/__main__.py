"""Entry point of `python -m cuda_bindings` (see cli.py)."""
from .cli import main

main()
