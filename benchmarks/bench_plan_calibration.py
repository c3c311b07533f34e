"""Planner calibration on this machine: predicted vs measured peak memory and step time.

Run: python benchmarks/bench_plan_calibration.py [--steps 3] [--threads 1] [--json]
(same as `lorakit plan --calibrate`). Acceptance: both ratios within 0.7-1.3.
The measurement and the formulas are described in lorakit/planner/calibrate.py.
"""

from __future__ import annotations

import argparse
import json

from lorakit.planner.calibrate import calibrate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--model", default="llama-15m")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1, robust on a shared machine)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = calibrate(model=args.model, steps=args.steps, threads=args.threads)
    print(json.dumps(result.as_dict(), indent=2) if args.json else result.table())


if __name__ == "__main__":
    main()
