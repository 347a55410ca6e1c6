"""Check nanojax against nanochat's reference vectors or its own training trajectory.

    python -m scripts.parity --vectors ../shared/reference/nanochat_vectors/a.json
    python -m scripts.parity --trajectory ../shared/reference/nanochat_trajectory_d4

Prints one row per check (max abs diff, tolerance, ok) and exits non-zero if any check fails
or the set yields no check at all.
"""

import argparse
import sys

from nanojax.common import HelpFormatter, cli


@cli
def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--vectors", help="a reference set's json (its npz files beside it)")
    what.add_argument("--trajectory", help="a folder with trajectory.json, init.npz and batches.npz")
    args = parser.parse_args()

    from nanojax import parity  # imports jax: after --help

    if args.vectors:
        rows, skipped = parity.run_checks(args.vectors)
    else:
        rows, per_step = parity.trajectory_checks(args.trajectory)
        skipped = []
        print(f"{'step':>4} {'nanojax loss':>13} {'nanochat loss':>14} {'rel diff':>9}")
        for i, ours, ref in per_step:
            print(f"{i:>4} {ours:>13.6f} {ref:>14.6f} {abs(ours - ref) / abs(ref):>9.2e}")
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
