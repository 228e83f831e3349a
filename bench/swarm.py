"""B9, models peer to peer: the time to put one model file on 1, 2 and 4 new workers through the
swarm, against each new worker fetching the whole file from the one holder over plain HTTP.

The holder's upload is capped at the same rate on both sides, as a holder that serves inference
first would be. Both sides run in this process, each peer on a loopback address of its own
(127.0.0.N); this kernel has no netem, so the caps are the applications' own: libtorrent's
`upload_rate_limit` for the swarm's holder, and for HTTP one token bucket shared by every
connection of an aiohttp server. The new workers' own uploads are not capped: they are the pool's
other boxes, and in the swarm they pass pieces to each other. Each side ends when every new worker
has the whole file on disk and has checked its SHA-256 (`gputorrent.swarm` does on the swarm side;
the HTTP side hashes what it wrote).

    .venv/bin/python bench/swarm.py --size-mib 64 --rate-mib 8

Prints a Markdown table and writes bench/results/swarm.json (bench/report.py makes the plot).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from pool import save_plot, write_result

from gputorrent.swarm import ModelFile, Swarm, describe

NEW_WORKERS = (1, 2, 4)
CHUNK = 64 * 1024
HOLDER = "127.0.0.2"


class Bucket:
    """`rate` bytes a second, shared by whoever takes from it."""

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._tokens = 0.0
        self._at = time.monotonic()
        self._lock = asyncio.Lock()

    async def take(self, n: int) -> None:
        async with self._lock:
            now = time.monotonic()
            self._tokens = min(self.rate, self._tokens + (now - self._at) * self.rate)
            self._at = now
            self._tokens -= n
            if self._tokens < 0:
                await asyncio.sleep(-self._tokens / self.rate)


async def http_side(data: bytes, sha256: str, workers: int, rate: float, workdir: Path) -> float:
    """Seconds until `workers` clients each have the file (`data`) from one server whose upload is `rate`."""
    bucket = Bucket(rate)

    async def serve(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await response.prepare(request)
        view = memoryview(data)
        for offset in range(0, len(data), CHUNK):
            chunk = view[offset : offset + CHUNK]
            await bucket.take(len(chunk))
            await response.write(chunk)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get("/model", serve)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, HOLDER, 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]

    async def fetch(i: int) -> None:
        out = workdir / f"http-{workers}-{i}.gguf"
        digest = hashlib.sha256()
        chunks: list[bytes] = []
        connector = aiohttp.TCPConnector(local_addr=(f"127.0.0.{10 + i}", 0))
        async with aiohttp.ClientSession(connector=connector) as http, http.get(f"http://{HOLDER}:{port}/model") as got:
            async for chunk in got.content.iter_chunked(CHUNK):
                chunks.append(chunk)
                digest.update(chunk)
        await asyncio.to_thread(out.write_bytes, b"".join(chunks))  # on disk, as the swarm's copies are
        if digest.hexdigest() != sha256:
            raise RuntimeError(f"HTTP copy {i} is not the file")
        await asyncio.to_thread(out.unlink)

    started = time.perf_counter()
    try:
        await asyncio.gather(*(fetch(i) for i in range(workers)))
        return time.perf_counter() - started
    finally:
        await runner.cleanup()


def swarm_side(model: ModelFile, path: Path, workers: int, rate: int, workdir: Path) -> float:
    """Seconds until `workers` new workers each have the file through the swarm, the holder's upload `rate`."""
    holder = Swarm(HOLDER, upload_limit_bps=rate)
    holder.seed(model, path)
    new = [Swarm(f"127.0.0.{10 + i}") for i in range(workers)]
    peers = [(HOLDER, holder.port)] + [(f"127.0.0.{10 + i}", s.port) for i, s in enumerate(new)]
    failures: list[BaseException] = []

    def fetch(i: int) -> None:
        try:
            others = [peer for j, peer in enumerate(peers) if j != i + 1]
            new[i].fetch(model, workdir / f"swarm-{workers}-{i}", others)
        except BaseException as e:  # reported after the join
            failures.append(e)

    threads = [threading.Thread(target=fetch, args=(i,)) for i in range(workers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    took = time.perf_counter() - started
    for swarm in [holder, *new]:
        swarm.close()
    if failures:
        raise failures[0]
    return took


def run(size_mib: int, rate_mib: float) -> dict[str, Any]:
    rate = int(rate_mib * 2**20)
    with tempfile.TemporaryDirectory() as tmp:
        workdir = Path(tmp)
        path = workdir / "holder" / "model.gguf"
        path.parent.mkdir()
        path.write_bytes(os.urandom(size_mib * 2**20))
        model = describe(path)
        seconds: dict[str, dict[str, float]] = {"swarm": {}, "http": {}}  # side -> new workers -> s
        for workers in NEW_WORKERS:  # the two sides alternate, so both see the same machine noise
            seconds["swarm"][str(workers)] = swarm_side(model, path, workers, rate, workdir)
            http = http_side(path.read_bytes(), model.sha256, workers, rate, workdir)
            seconds["http"][str(workers)] = asyncio.run(http)
    return {"size_mib": size_mib, "rate_mib_s": rate_mib, "seconds": seconds}


def table(result: dict[str, Any]) -> str:
    seconds = result["seconds"]
    rows = [
        "| new workers | swarm (s) | one holder over HTTP (s) | swarm / HTTP |",
        "|---:|---:|---:|---:|",
    ]
    for workers in NEW_WORKERS:
        swarm, http = seconds["swarm"][str(workers)], seconds["http"][str(workers)]
        rows.append(f"| {workers} | {swarm:.1f} | {http:.1f} | {swarm / http:.2f} |")
    rows.append(
        f"\nA {result['size_mib']} MiB file, the holder's upload capped at {result['rate_mib_s']:g} MiB/s on both "
        "sides; each side ends when every new worker has the file on disk, its SHA-256 checked."
    )
    return "\n".join(rows)


def plot(result: dict[str, Any], out: Path) -> None:
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.2))
    for offset, side in enumerate(("swarm", "http")):
        values = [result["seconds"][side][str(w)] for w in NEW_WORKERS]
        label = "swarm (libtorrent)" if side == "swarm" else "one holder over HTTP"
        ax.bar([i + offset * 0.4 for i in range(len(NEW_WORKERS))], values, width=0.4, label=label)
    ax.set_xticks([i + 0.2 for i in range(len(NEW_WORKERS))], [str(w) for w in NEW_WORKERS])
    ax.set_xlabel("new workers")
    ax.set_ylabel("seconds until all have it")
    ax.legend()
    ax.set_title(f"B9 a {result['size_mib']} MiB model, holder's upload {result['rate_mib_s']:g} MiB/s")
    save_plot(fig, out)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mib", type=int, default=64)
    parser.add_argument("--rate-mib", type=float, default=8.0, help="the holder's upload cap, MiB/s")
    args = parser.parse_args()
    result = run(args.size_mib, args.rate_mib)
    print(table(result))
    print(f"written to {write_result('swarm', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
