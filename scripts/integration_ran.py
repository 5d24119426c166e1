"""Did the integration tests run? Read pytest's JUnit XML and say so (used by scripts/test.sh in CI).

In CI, as root, the integration tests (tests/integration: real containerd, runc, CRIU) are what the
suite is for; if containerd is missing or set-up left a version out they all skip, pytest exits 0,
and a green run would mean nothing. This counts the integration tests that passed (not skipped, not
xfailed, not failed) and exits 1 when there are none, with the reasons they were skipped.

    python scripts/integration_ran.py JUNIT_XML [--package tests.integration]
"""
from __future__ import annotations

import argparse
import collections
import sys
import xml.etree.ElementTree as ET


def count(junit_path: str, package: str) -> tuple[int, int, collections.Counter]:
    """(passed, not passed, skip reasons) of the test cases in `package`."""
    root = ET.parse(junit_path).getroot()
    passed = not_passed = 0
    reasons: collections.Counter = collections.Counter()
    for case in root.iter("testcase"):
        classname = case.get("classname", "")
        if classname != package and not classname.startswith(package + "."):
            continue
        outcome = [child for child in case if child.tag in ("skipped", "failure", "error")]
        if not outcome:
            passed += 1
            continue
        not_passed += 1
        for child in outcome:
            if child.tag == "skipped":
                reasons[(child.get("message") or child.get("type") or "skipped").strip()] += 1
    return passed, not_passed, reasons


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("junit_xml")
    parser.add_argument("--package", default="tests.integration")
    args = parser.parse_args(argv)
    try:
        passed, not_passed, reasons = count(args.junit_xml, args.package)
    except (OSError, ET.ParseError) as exc:
        print(f"integration_ran: cannot read pytest's report {args.junit_xml}: {exc}", file=sys.stderr)
        return 1
    if passed > 0:
        print(f"integration_ran: {passed} {args.package} test(s) passed")
        return 0
    print(f"integration_ran: no {args.package} test passed ({not_passed} collected, none of them passed)",
          file=sys.stderr)
    for reason, n in reasons.most_common(5):
        print(f"  {n} skipped: {reason}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main())
