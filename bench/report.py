"""Turn bench/results/*.json into a PNG plot per benchmark and the generated tables of docs/benchmarks.md.

Run by `make bench` in the benchmark environment (bench/.venv, which has matplotlib; the
project's own environment does not). A table goes between the markers
`<!-- bench:NAME -->` and `<!-- /bench:NAME -->` of docs/benchmarks.md; the prose around
them is written by hand.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

HERE = Path(__file__).parent
RESULTS = HERE / "results"
DOC = HERE.parent / "docs" / "benchmarks.md"
sys.path.insert(0, str(HERE))

import routing_quality  # noqa: E402  (a sibling script, importable once bench/ is on the path)


def plot_routing_quality(results: dict[str, object], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    policies = results["policies"]
    assert isinstance(policies, dict)
    names = list(policies)
    fig, ax = plt.subplots(figsize=(7, 4))
    width = 0.38
    xs = range(len(names))
    ax.bar([x - width / 2 for x in xs], [policies[n]["p50_ms"] for n in names], width, label="p50")
    ax.bar([x + width / 2 for x in xs], [policies[n]["p99_ms"] for n in names], width, label="p99")
    ax.set_yscale("log")
    ax.set_xticks(list(xs), names)
    ax.set_ylabel("latency, submit to result (ms, log scale)")
    ax.set_title(f"B4 routing quality: workers of 4 speeds at {results['load']:.0%} load")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out, dpi=120)
    plt.close(fig)


def replace_section(doc: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- bench:{name} -->\n).*?(<!-- /bench:{name} -->)", re.S)
    if not pattern.search(doc):
        raise SystemExit(f"docs/benchmarks.md has no <!-- bench:{name} --> section")
    return pattern.sub(lambda m: m.group(1) + body + "\n" + m.group(2), doc)


def main() -> int:
    doc = DOC.read_text()
    source = RESULTS / "routing_quality.json"
    if source.exists():
        results = json.loads(source.read_text())
        plot_routing_quality(results, RESULTS / "routing_quality.png")
        doc = replace_section(doc, "routing_quality", routing_quality.table(results))
    DOC.write_text(doc)
    print(f"plots in {RESULTS}, tables in {DOC}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
