"""sha256 for the `start` hot path without hashlib's OpenSSL import (a few ms per `start`).

CPython's builtin sha256 module is `_sha256` up to 3.11 and `_sha2` from 3.12 on; hashlib is the
fallback for builds that have neither.
"""
try:
    from _sha256 import sha256
except ImportError:  # Python 3.12+
    try:
        from _sha2 import sha256
    except ImportError:  # pragma: no cover - builds without the builtin modules
        from hashlib import sha256

__all__ = ["sha256"]
