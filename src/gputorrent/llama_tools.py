"""llama.cpp's own programs that GPU Torrent runs for a model split over machines: `ggml-rpc-server`
(on a shard host) and `llama-server` (a group's leader, which the in-process backend cannot be:
llama-cpp-python no longer takes RPC servers).

Both are built once per machine from the llama.cpp source inside llama-cpp-python's sdist, so the
two sides of an RPC link, and a group's leader and a one-machine worker, run the same llama.cpp
(the RPC protocol's version must match, and the same build gives the same numbers). They land in
`GPUTORRENT_LLAMA_TOOLS_DIR`, by default under the user's cache directory in a folder named by
the llama-cpp-python version; `make test` builds them, `python -m gputorrent.llama_tools` does too.
A CUDA build: `CMAKE_ARGS="-DGGML_CUDA=on" python -m gputorrent.llama_tools --force`.
"""

from __future__ import annotations

import argparse
import os
import shlex
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from importlib import metadata
from pathlib import Path

from gputorrent.config import default_models_dir

RPC_SERVER = "ggml-rpc-server"
LLAMA_SERVER = "llama-server"
TOOLS = (RPC_SERVER, LLAMA_SERVER)
PACKAGE = "llama_cpp_python"


class ToolsMissing(RuntimeError):
    """The programs are not built on this machine yet; the message says how to build them."""


def llama_cpp_version() -> str:
    """The version of llama-cpp-python installed: its sdist carries the llama.cpp the tools are built from."""
    try:
        return metadata.version(PACKAGE)
    except metadata.PackageNotFoundError:
        raise ToolsMissing("llama-cpp-python is not installed: pip install 'gputorrent[llamacpp]'") from None


def tools_dir() -> Path:
    configured = os.environ.get("GPUTORRENT_LLAMA_TOOLS_DIR")
    if configured:
        return Path(configured)
    return default_models_dir().parent / f"llama.cpp-{llama_cpp_version()}" / "bin"


def tool(name: str) -> Path:
    """The path of one of `TOOLS`.

    Raises:
        ToolsMissing: it is not built (the message names the command that builds it).
    """
    path = tools_dir() / name
    if not os.access(path, os.X_OK):
        raise ToolsMissing(
            f"{name} is not built in {path.parent}: run `python -m gputorrent.llama_tools` once (make test does; "
            "a few minutes)"
        )
    return path


def die_with_parent() -> None:
    """`preexec_fn` for the tools: the kernel kills the child when the process that started it dies, even
    by SIGKILL, so no ggml-rpc-server outlives its shard host and no llama-server keeps a shard host's one
    connection after its leader died. Linux only (elsewhere a no-op)."""
    if sys.platform != "linux":
        return
    import ctypes
    import signal

    pr_set_pdeathsig = 1  # prctl.h's PR_SET_PDEATHSIG
    ctypes.CDLL("libc.so.6", use_errno=True).prctl(pr_set_pdeathsig, signal.SIGKILL)


def build(*, force: bool = False, jobs: int | None = None) -> Path:
    """Build `TOOLS` into `tools_dir()` unless they are there already (or `force`); returns the folder.

    `CMAKE_ARGS` adds options (`-DGGML_CUDA=on`), and `CFLAGS`/`CXXFLAGS` reach the compiler as they
    reach llama-cpp-python's build (the Makefile leaves AMX out on x86-64).
    """
    target = tools_dir()
    if not force and all(os.access(target / name, os.X_OK) for name in TOOLS):
        return target
    version = llama_cpp_version()
    cmake = _program("cmake")
    if cmake is None:
        raise ToolsMissing("building llama.cpp's tools needs cmake: pip install 'gputorrent[split]'")
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="gputorrent-llama-tools-") as work:
        source = _source(version, Path(work))
        build_dir = Path(work) / "build"
        options = [
            "-DCMAKE_BUILD_TYPE=Release", "-DBUILD_SHARED_LIBS=OFF", "-DGGML_RPC=ON", "-DLLAMA_CURL=OFF",
            "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=ON",
            "-DLLAMA_BUILD_TOOLS=ON", *shlex.split(os.environ.get("CMAKE_ARGS", "")),
        ]  # fmt: skip
        if (ninja := _program("ninja")) is not None:
            options += ["-G", "Ninja", f"-DCMAKE_MAKE_PROGRAM={ninja}"]
        _say(f"building {', '.join(TOOLS)} of llama.cpp (llama-cpp-python {version}) into {target}: a few minutes")
        _run([cmake, "-S", str(source), "-B", str(build_dir), *options])
        _run([cmake, "--build", str(build_dir), "--target", *TOOLS, "-j", str(jobs or os.cpu_count() or 2)])
        target.mkdir(parents=True, exist_ok=True)
        for name in TOOLS:
            built = build_dir / "bin" / name
            shutil.copy2(built, target / f".{name}.part")
            os.replace(target / f".{name}.part", target / name)  # never a half-copied program
    _say(f"built in {time.monotonic() - started:.0f} s")
    return target


def _program(name: str) -> str | None:
    """A build program on PATH, or beside this Python (the `split` extra installs cmake and ninja there)."""
    beside = Path(sys.executable).parent / name
    return shutil.which(name) or (str(beside) if os.access(beside, os.X_OK) else None)


def _source(version: str, work: Path) -> Path:
    """llama.cpp's source from llama-cpp-python's sdist (pip's cache keeps the download)."""
    _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary", ":all:",
          f"llama-cpp-python=={version}", "-d", str(work)])  # fmt: skip
    [sdist] = work.glob("llama_cpp_python-*.tar.gz")
    prefix = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    with tarfile.open(sdist) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(prefix)]
        archive.extractall(work, members=members, filter="data")
    return work / prefix


def _run(argv: list[str]) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise ToolsMissing(f"`{shlex.join(argv[:4])} ...` failed ({done.returncode}):\n{done.stdout[-4000:]}"
                           f"{done.stderr[-4000:]}")  # fmt: skip


def _say(line: str) -> None:
    print(f"gputorrent.llama_tools: {line}", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gputorrent.llama_tools", description=__doc__.split("\n\n")[0])
    parser.add_argument("--force", action="store_true", help="build again even where they are built")
    args = parser.parse_args(argv)
    try:
        print(build(force=args.force))
    except ToolsMissing as e:
        _say(str(e))
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
