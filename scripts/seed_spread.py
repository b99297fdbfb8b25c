"""Spread of a metric over a method's ``seed`` parameter (e.g. GPTQ's calibration windows).

Now part of qbench: ``qbench report RUN --seed-spread [--metric ppl]`` (:mod:`qbench.seeds`). This
script is kept so the command beside the committed results still reproduces them; it calls the same
code.

    python scripts/seed_spread.py results/runs/gptq-seeds [--metric ppl] > results/gptq-seed-spread-16windows-cpu.md
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qbench.params import QBenchError  # noqa: E402
from qbench.seeds import seed_spread_markdown  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run_dir")
    parser.add_argument("--metric", default="ppl")
    args = parser.parse_args(argv)
    command = "python scripts/seed_spread.py " + " ".join(argv if argv is not None else sys.argv[1:])
    try:
        print(seed_spread_markdown(Path(args.run_dir), args.metric, command), end="")
    except QBenchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
