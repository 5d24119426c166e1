"""Integration tests: private containerd instances (harness.py) with real runc, CRIU and our shim."""
