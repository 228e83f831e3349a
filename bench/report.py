"""Turn bench/results/*.json into a PNG plot per benchmark and the generated tables of docs/benchmarks.md
(and of docs/scaling.md, for the scale and metrics scrape benchmarks).

Run by `make bench` in the benchmark environment (bench/.venv, which has matplotlib; the
project's own environment does not). A table goes between the markers
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` of its document, its plot to
docs/images/bench-NAME.png; the prose around them is written by hand. A benchmark without
results (not run) keeps the table and plot it had.
"""

from __future__ import annotations

import importlib
import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
IMAGES = HERE.parent / "docs" / "images"
# Each is a sibling script with `table(results)` and `plot(results, out)`.
BENCHMARKS = (
    "added_latency",
    "throughput",
    "dispatch",
    "routing_quality",
    "stream_latency",
    "stream_capacity",
    "real_model",
    "backend_http",
    "redis_path",
    "reproducible",
    "replication_wait",
    "swarm",
    "split",
    "scale",
    "metrics_scrape",
)
SCALING = HERE.parent / "docs" / "scaling.md"
DOCS = {"scale": SCALING, "metrics_scrape": SCALING}  # the others' tables are in DOC


def replace_section(doc: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"{DOCS.get(name, DOC).name} has no <!-- bench:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), doc)


def main() -> int:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    sys.path.insert(0, str(HERE))
    IMAGES.mkdir(exist_ok=True)
    docs = {path: path.read_text() for path in {DOC, *DOCS.values()}}
    for name in BENCHMARKS:
        source = RESULTS / f"{name}.json"
        if not source.exists():
            print(f"{name}: no results, section left as it was")
            continue
        results = json.loads(source.read_text())
        module = importlib.import_module(name)
        module.plot(results, IMAGES / f"bench-{name}.png")
        path = DOCS.get(name, DOC)
        docs[path] = replace_section(docs[path], name, module.table(results))
    for path, text in docs.items():
        path.write_text(text)
    print(f"plots in {IMAGES}, tables in {', '.join(str(path) for path in docs)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
