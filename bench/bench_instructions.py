"""The whole stack's cost per message in CPU instructions: a figure that host noise can't move.

Run: ``.venv/bin/python bench/bench_instructions.py`` (about 20 minutes; needs
``valgrind``). ``--workload``, ``--style``, ``--transport`` and ``--contender`` narrow it.

On a shared machine ``bench_throughput.py``'s time-based ratios move from one
invocation to the next by more than the differences we care about. This script runs
the same clients (its children, against the same flooding simulator) under
``valgrind --tool=callgrind``, which counts the instructions a process executes
whatever else the machine is doing. Each client runs twice, for ``--short`` and
``--long`` messages; the difference of the two totals over the difference in
messages is its cost per message, with start-up and imports cancelled out.

Instructions are not time: an instruction of the interpreter's loop and one of
orjson's or msgspec's C code do not take the same time. Read these next to the timed
ratios, as the noise-free view of the same comparison.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys

from bench_throughput import WORKLOADS, Contender, child_command, contenders, start_simulator

COLLECTED = re.compile(r"Collected : (\d+)")


def instructions(contender: Contender, url: str, workload: str, messages: int) -> int:
    command = ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null"]
    command += child_command(contender, url, workload, messages)
    done = subprocess.run(command, capture_output=True, text=True, timeout=1800, check=False)
    found = COLLECTED.search(done.stderr)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"{contender.label}: valgrind run failed:\n{done.stderr[-2000:]}")
    return int(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--short", type=int, default=10_000, help="messages, first run")
    parser.add_argument("--long", type=int, default=40_000, help="messages, second run")
    parser.add_argument("--workload", choices=sorted(WORKLOADS), action="append")
    parser.add_argument("--transport", action="append", help="default: picows and httpx")
    parser.add_argument("--style", action="append", help="default: iterate")
    parser.add_argument("--contender", action="append", help="only these labels' prefixes")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        sys.exit("valgrind is not installed")
    racers = contenders(args.transport or ["picows", "httpx"], args.style or ["iterate"])
    if args.contender:
        racers = [r for r in racers if any(r.label.startswith(p) for p in args.contender)]
    sim, url = start_simulator()
    try:
        print(
            f"instructions per message: (I({args.long:,}) - I({args.short:,})) / "
            f"{args.long - args.short:,}, each client under callgrind",
            flush=True,
        )
        for workload in args.workload or list(WORKLOADS):
            kind, fmt, _ = WORKLOADS[workload]
            per_message: dict[str, float] = {}
            for racer in racers:
                short = instructions(racer, url, workload, args.short)
                long = instructions(racer, url, workload, args.long)
                per_message[racer.label] = (long - short) / (args.long - args.short)
                print(f"  {kind} {fmt} {racer.label:<24} {per_message[racer.label]:>9,.0f}")
            for name, own in per_message.items():
                if name.startswith("A "):
                    for other in ("B websockets", "C picows"):
                        if other in per_message:
                            ratio = own / per_message[other]
                            print(f"  {kind} {fmt} {name} / {other}: ×{ratio:.2f} the instructions")
    finally:
        sim.terminate()
        sim.wait(10)


if __name__ == "__main__":
    main()
