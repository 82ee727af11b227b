"""``python -m cellplug.testing KIND NAME [--option KEY=VALUE ...]``: the contract report."""

from __future__ import annotations

import argparse
import json
import sys

from . import CHECKS, run_checks


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m cellplug.testing",
                                 description="Check a plugin against its hook's contract.")
    ap.add_argument("kind", choices=sorted(CHECKS))
    ap.add_argument("name")
    ap.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="factory option (backbone) or parameter (reconstructor); JSON values")
    args = ap.parse_args(argv)
    options = {}
    for item in args.option:
        key, _, value = item.partition("=")
        try:
            options[key] = json.loads(value)
        except ValueError:
            options[key] = value
    failed = 0
    for check, error in run_checks(args.kind, args.name, options):
        print(f"{'ok  ' if error is None else 'FAIL'} {check}" + (f": {error}" if error else ""))
        failed += error is not None
    print(f"{args.kind} {args.name!r}: {'all checks passed' if not failed else f'{failed} failed'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
