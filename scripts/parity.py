"""Check nanojax against a nanochat reference vector set.

    python -m scripts.parity --vectors ../shared/reference/nanochat_vectors/a.json

Prints one row per check (max abs diff, tolerance, ok) and exits non-zero if any check fails
or the set yields no check at all.
"""

import argparse
import sys

from nanojax.common import cli
from nanojax.parity import run_checks


@cli
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--vectors", required=True, help="a reference set's json (its npz files beside it)")
    args = parser.parse_args()

    rows, skipped = run_checks(args.vectors)
    print(f"{'check':<34} {'max abs diff':>13} {'tolerance':>10}  ok")
    for r in rows:
        print(f"{r.name:<34} {r.diff:>13.3g} {r.tol:>10.1g}  {'ok' if r.ok else 'FAIL'}  {r.note}")
    if skipped:
        print(f"skipped (arrays missing from the set): {', '.join(skipped)}")
    failed = [r.name for r in rows if not r.ok]
    if not rows or failed:
        print(f"FAILED: {', '.join(failed) or 'no check could run'}")
        sys.exit(1)
    print(f"all {len(rows)} checks ok")


if __name__ == "__main__":
    main()
