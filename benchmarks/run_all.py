"""Run every application benchmark one after another and print one summary table.

    python -m benchmarks.run_all            # the full set (about 10-15 minutes on 2 cores)
    python -m benchmarks.run_all --quick    # smoke runs
    python -m benchmarks.run_all --rtt-ms 50   # each app 50 ms of network away from its service
"""

from __future__ import annotations

import argparse
import importlib

from rich.table import Table

from benchmarks.harness import console

BENCHMARKS = ("chain_summary", "map_reduce", "shared_prompt", "multi_agent", "mixed", "langchain_map_reduce",
              "langgraph_multi_agent", "sk_nested")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--only", default=",".join(BENCHMARKS), help="comma-separated benchmark names")
    parser.add_argument("--rtt-ms", type=float, default=0.0,
                        help="an emulated network between the apps and their services (see harness)")
    args = parser.parse_args(argv)
    title = "Parrot vs the request-centric way (same engines)"
    title += f", {args.rtt_ms:g} ms network round trips" if args.rtt_ms else ""
    summary = Table(title=title, title_justify="left")
    for column in ("benchmark", "system", "end to end s", "parrot speed-up", "chat ms/token"):
        summary.add_column(column, justify="left" if column in ("benchmark", "system") else "right")
    for name in args.only.split(","):
        module = importlib.import_module(f"benchmarks.{name}")
        rows = module.main((["--quick"] if args.quick else []) + ["--rtt-ms", str(args.rtt_ms)])
        parrot = next(r for r in rows if "parrot" in r.system.lower())
        for row in rows:
            chat = row.extra.get("chat ms/token")
            summary.add_row(name, row.system, f"{row.seconds:.2f}", f"{row.seconds / parrot.seconds:.2f}x",
                            "-" if chat is None else f"{chat:.0f}")
    console.print(summary)


if __name__ == "__main__":
    main()
