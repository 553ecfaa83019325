"""README's two command chains on one backend, each step timed, then the checks CI makes of what they leave.

CI runs the chains in its JAX suite only (tests/conftest.py): README's commands name no backend, so a user who
follows them trains on JAX. This runs the same steps (tests/readme_steps.py: every README command after the
set-up section, each in a fresh interpreter, in order, in a scratch directory) with KERAS_BACKEND set to
`--backend`, and the same checks (`check_main_chain`, `check_quickstarts`: the quickstart learns, the GRPO
reward climbs, the exports compute what was trained...) in this process on that backend. Prints each step's
seconds; `--out FILE` appends one JSON line per chain.

    python bench/readme_chains.py --backend tensorflow --out bench/raw/cpu-2026-12-07-readme-chains.jsonl
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
# Keras is imported by the checks, after main() has set the backend.
from readme_steps import CHAINS, chain_steps, check_main_chain, check_quickstarts, run_steps  # noqa: E402

CHECKS = {"main": check_main_chain, "quickstarts": check_quickstarts}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", choices=("jax", "tensorflow", "torch"), required=True)
    parser.add_argument("--chains", default=",".join(CHAINS), help="comma-separated, of: " + ", ".join(CHAINS))
    parser.add_argument("--out", type=Path, help="append one JSON line per chain to this file")
    args = parser.parse_args()
    os.environ["KERAS_BACKEND"] = args.backend  # before Keras is imported, by the checks
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    failed = False
    for chain in args.chains.split(","):
        steps = chain_steps(chain)
        with tempfile.TemporaryDirectory() as tmp:
            record = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                      "backend": args.backend, "chain": chain, "cpu_cores": os.cpu_count()}
            try:
                seconds = run_steps(steps, Path(tmp), backend=args.backend)
                CHECKS[chain](Path(tmp))
                record.update(passed=True, steps=[{"step": step.splitlines()[0][:100], "seconds": round(s, 1)}
                                                  for (_, step), s in zip(steps, seconds)],
                              total_seconds=round(sum(seconds), 1))
            except AssertionError:
                failed = True
                record.update(passed=False, error=traceback.format_exc(limit=2)[-3000:])
        print(f"== {args.backend}, chain {chain}: {'passed' if record['passed'] else 'FAILED'}")
        for entry in record.get("steps", []):
            print(f"{entry['seconds']:8.1f} s  {entry['step']}")
        if "total_seconds" in record:
            print(f"{record['total_seconds']:8.1f} s  in all")
        else:
            print(record["error"])
        if args.out:
            with args.out.open("a", encoding="utf-8") as out:
                out.write(json.dumps(record) + "\n")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
