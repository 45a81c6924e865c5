#!/usr/bin/env python3
"""Compares two `millwright-agent replay` outputs (JSON lines {asset, cycle, value, model, release}).

    cross/parity.py REFERENCE.jsonl OTHER.jsonl [TOLERANCE]

Fails unless both hold the same (asset, cycle) keys, model and release, and every value agrees
within TOLERANCE (default 1e-4). Prints the count and the largest absolute difference.
"""

import json
import sys


def load(path):
    rows = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            rows[(r["asset"], r["cycle"])] = r
    return rows


def main():
    if len(sys.argv) not in (3, 4):
        sys.exit(__doc__)
    ref, other = load(sys.argv[1]), load(sys.argv[2])
    tolerance = float(sys.argv[3]) if len(sys.argv) == 4 else 1e-4
    if not ref:
        sys.exit(f"error: {sys.argv[1]} holds no predictions")
    if ref.keys() != other.keys():
        missing, extra = len(ref.keys() - other.keys()), len(other.keys() - ref.keys())
        sys.exit(f"error: predictions differ: {missing} missing, {extra} extra")
    worst, worst_key, worst_rel = 0.0, None, 0.0
    for key, r in ref.items():
        o = other[key]
        if (r["model"], r["release"]) != (o["model"], o["release"]):
            sys.exit(f"error: {key}: model {o['model']}/{o['release']}, expected {r['model']}/{r['release']}")
        diff = abs(r["value"] - o["value"])
        if diff:
            worst_rel = max(worst_rel, diff / max(abs(r["value"]), abs(o["value"])))
        if diff > worst or worst_key is None:
            worst, worst_key = diff, key
    verdict = "ok" if worst <= tolerance else "FAIL"
    print(
        f"{verdict}: {len(ref)} predictions, max |diff| = {worst:.3g} at {worst_key}"
        f" (relative {worst_rel:.2g}; tolerance {tolerance:g})"
    )
    if worst > tolerance:
        sys.exit(1)


if __name__ == "__main__":
    main()
