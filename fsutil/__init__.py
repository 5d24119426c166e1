"""Small file-system helpers every room may use: standard library only, importing nothing of ours.

The node installer loads `fsutil.atomic` by path before Kybernate is installed, and the shim's `start`
action (on the path of every ``ctr run``) imports it, so modules here import builtins only.
"""
