"""Run the fault suite and write its table into docs/reliability.md.

Each scenario of tests/faults records one row (jobs submitted, completed, failed by reason,
lost, duplicated, time to recover) into the JSON file `GPUTORRENT_FAULT_REPORT` names. This
script runs the suite with that set and the soak at full size, then renders the rows as a
Markdown table between `<!-- fault-table:start -->` and `<!-- fault-table:end -->`.

    .venv/bin/python bench/fault_report.py                  # full-size soak: 1000 jobs
    .venv/bin/python bench/fault_report.py --soak-jobs 150  # the CI size

Exits with pytest's status; the table is written either way (a failing scenario's row shows why).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "reliability.md"
START, END = "<!-- fault-table:start -->", "<!-- fault-table:end -->"


def run_suite(report: Path, soak_jobs: int, pytest_args: list[str]) -> tuple[int, float, str]:
    """Run tests/faults with the report enabled; (exit status, seconds, pytest's summary line)."""
    env = {**os.environ, "GPUTORRENT_FAULT_REPORT": str(report), "GPUTORRENT_SOAK_JOBS": str(soak_jobs)}
    command = [sys.executable, "-m", "pytest", "tests/faults", "-p", "no:cacheprovider", "-q", *pytest_args]
    started = time.monotonic()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    elapsed = time.monotonic() - started
    sys.stdout.write(done.stdout[-5000:])
    sys.stderr.write(done.stderr[-2000:])
    lines = [line.strip("= ") for line in done.stdout.splitlines() if line.strip()]
    return done.returncode, elapsed, lines[-1] if lines else "no output"


def render(rows: dict[str, dict[str, Any]]) -> str:
    """The Markdown table, one row per scenario, in scenario-number order."""
    header = [
        "| scenario | jobs submitted | completed | failed (by reason) | lost | duplicated | time to recover (s) |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    body = []
    for name in sorted(rows, key=_scenario_order):
        row = rows[name]
        failed = ", ".join(f"{n} `{code}`" for code, n in sorted(row["failed"].items())) or "0"
        recover = "—" if row["recover_s"] is None else f"{row['recover_s']:.2f}"
        body.append(
            f"| {name} | {row['submitted']} | {row['completed']} | {failed} | {row['lost']} | {row['duplicated']} "
            f"| {recover} |"
        )
    return "\n".join(header + body)


def _scenario_order(name: str) -> tuple[int, str]:
    """By number: "4. ..." before "4b. ..." before "5. ..."; unnumbered ones last."""
    number = re.match(r"(\d+)([a-z]?)\.", name)
    return (int(number.group(1)), number.group(2)) if number else (1_000, name)


def write_doc(table: str, command: str, summary: str, elapsed_s: float) -> None:
    doc = DOC.read_text()
    if START not in doc or END not in doc:
        raise SystemExit(f"{DOC} lacks the {START} / {END} markers")
    day = datetime.date.today().isoformat()
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
    outcome = re.sub(r" in [\d.]+s.*", "", summary)  # "6 passed, 1 xfailed in 192.44s (0:03:12)" -> the counts
    section = (
        f"{START}\n"
        f"Measured {day} at commit {commit.stdout.strip() or '?'} on a {os.cpu_count()}-core machine: {outcome}, "
        f"{elapsed_s:.0f} s for the whole suite. Reproduce with `{command}`.\n\n"
        f"{table}\n"
        f"{END}"
    )
    before, rest = doc.split(START, 1)
    _, after = rest.split(END, 1)
    DOC.write_text(before + section + after)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--soak-jobs", type=int, default=1000, help="jobs in the soak scenario (default 1000)")
    parser.add_argument("--no-doc", action="store_true", help="print the table only; leave docs/reliability.md")
    parser.add_argument("pytest_args", nargs="*", help="more pytest arguments, after --")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        report = Path(tmp) / "faults.json"
        status, elapsed_s, summary = run_suite(report, args.soak_jobs, args.pytest_args)
        rows = json.loads(report.read_text()) if report.exists() else {}
    if not rows:
        print("no scenario recorded a row", file=sys.stderr)
        return status or 1
    table = render(rows)
    print(table)
    command = ".venv/bin/python bench/fault_report.py" + (
        "" if args.soak_jobs == 1000 else f" --soak-jobs {args.soak_jobs}"
    )
    if not args.no_doc:
        write_doc(table, command, summary, elapsed_s)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
