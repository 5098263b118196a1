"""llama.cpp as a benchmark peer, fetched, built and run in the bench's own cache (never a project dependency).

The source is the ``llama-cpp-python`` sdist from PyPI: its ``vendor/llama.cpp`` carries llama.cpp's
sources, its converter (``convert_hf_to_gguf.py`` with ``gguf-py``) and, one level up, the Python
bindings (``llama_cpp``, ctypes over ``libllama``). Everything lives under ``cache_dir``
(``~/.cache/gemma-mesh-bench`` by default)::

    sdist/llama_cpp_python-<v>.tar.gz     pip download --no-deps --no-binary :all:
    llama_cpp_python-<v>/                  the extracted sdist
    build-<v>/bin/                         cmake Release build (native CPU flags): llama-bench,
                                           llama-batched-bench, llama-quantize, libllama.so
    site/                                  pip install --target: diskcache, the one module the
                                           bindings import that the project's environment lacks
    gguf/                                  converted checkpoints (f32, Q4_0)

The converter runs on the bench's own interpreter (it needs torch and transformers, which the
``export`` extra already brings) with ``gguf-py`` on ``PYTHONPATH``; nothing is installed into the
project's environment. The build runs under ``nice -n 10`` (about 9 minutes on 2 cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from dataclasses import dataclass
from pathlib import Path

DEFAULT_VERSION = "0.3.36"
DEFAULT_CACHE = Path.home() / ".cache" / "gemma-mesh-bench"
TARGETS = ("llama-bench", "llama-batched-bench", "llama-quantize", "llama")
BUILD_TIMEOUT_S = 3600
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=ON",
    "-DGGML_NATIVE=ON",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_USE_PREBUILT_UI=OFF",  # no network at build time
)

# Greedy continuation through the bindings, run in a child process (its own libllama): reads a JSON
# request on stdin, prints one JSON line. Prompt tokens go in as ids, so both sides see the same
# prompt; the tokenizer is compared separately on plain text.
_GREEDY = r"""
import json, sys
from llama_cpp import Llama
req = json.load(sys.stdin)
llm = Llama(model_path=req["model"], n_ctx=req["n_ctx"], n_batch=512, n_threads=req["threads"],
            n_threads_batch=req["threads"], seed=0, verbose=False)
text_ids = llm.tokenize(req["text"].encode("utf-8"), add_bos=False, special=False)
runs = []
for prompt in req["prompts"]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, min_p=0.0, temp=0.0, repeat_penalty=1.0,
                              reset=True):
        out.append(int(token))
        if len(out) == req["max_tokens"]:
            break
    runs.append(out)
print(json.dumps({"tokens": runs, "text_ids": text_ids}))
"""


def _run(
    argv: list[str], *, timeout_s: float, env: dict[str, str] | None = None, cwd: Path | None = None
) -> str:
    """Run ``argv``; return stdout. Raises RuntimeError with the tail of stderr on failure."""
    proc = subprocess.run(
        argv, capture_output=True, text=True, timeout=timeout_s, env=env, cwd=cwd, stdin=subprocess.DEVNULL
    )
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:3])} ... exited {proc.returncode}: {proc.stderr[-2000:]}")
    return proc.stdout


def _json_lines(text: str) -> list[dict]:
    return [json.loads(line) for line in text.splitlines() if line.startswith("{")]


@dataclass(frozen=True)
class LlamaCpp:
    """One built llama.cpp: its source tree, build and the bench's site directory."""

    version: str
    source: Path  # the extracted sdist (holds llama_cpp/ and vendor/llama.cpp/)
    build: Path
    site: Path

    @property
    def llama_cpp_dir(self) -> Path:
        return self.source / "vendor" / "llama.cpp"

    def binary(self, name: str) -> Path:
        return self.build / "bin" / name

    def commit(self) -> str:
        """The vendored llama.cpp's version line, as its tools print it (``version: ... commit <sha>``)."""
        proc = subprocess.run(
            [str(self.binary("llama-bench")), "--version"], capture_output=True, text=True, timeout=60
        )
        lines = (proc.stdout + proc.stderr).strip().splitlines()
        return lines[0].removeprefix("version: ") if lines else "unknown"

    def convert(self, checkpoint: Path, out: Path, outtype: str = "f32") -> Path:
        """``convert_hf_to_gguf.py checkpoint --outtype outtype``; reused when ``out`` exists."""
        if not out.exists():
            out.parent.mkdir(parents=True, exist_ok=True)
            env = {**os.environ, "PYTHONPATH": str(self.llama_cpp_dir / "gguf-py")}
            argv = [sys.executable, str(self.llama_cpp_dir / "convert_hf_to_gguf.py"), str(checkpoint)]
            _run([*argv, "--outtype", outtype, "--outfile", str(out)], timeout_s=1800, env=env)
        return out

    def quantize(self, src: Path, out: Path, qtype: str = "Q4_0", threads: int = 0) -> Path:
        """``llama-quantize src out qtype``; reused when ``out`` exists."""
        if not out.exists():
            argv = [str(self.binary("llama-quantize")), str(src), str(out), qtype]
            _run(argv + ([str(threads)] if threads else []), timeout_s=1800)
        return out

    def bench(
        self, model: Path, *, threads: int, prompt: int, gen: int, depth: int, reps: int, poll: int = 50
    ) -> dict:
        """One ``llama-bench`` test (``-o json``): ``prompt`` tokens (pp) or ``gen`` tokens (tg) at ``depth``.

        ``poll``: ggml's polling level while its threads wait for work (0: sleep; 50: llama.cpp's default).

        Returns llama-bench's record (``avg_ts``, ``samples_ts`` in tokens/s, ``flash_attn``, ...).
        """
        argv = [str(self.binary("llama-bench")), "-m", str(model), "-t", str(threads), "-o", "json"]
        argv += ["-p", str(prompt), "-n", str(gen), "-d", str(depth), "-r", str(reps), "--poll", str(poll)]
        (record,) = json.loads(_run(argv, timeout_s=1800))
        return record

    def batched_bench(
        self, model: Path, *, threads: int, prompt: int, gen: int, parallel: list[int], poll: int = 50
    ) -> dict[int, dict]:
        """``llama-batched-bench``: ``pl`` sequences of ``prompt`` random tokens, then ``gen`` steps of all.

        Returns ``{pl: record}`` with ``speed_tg`` (generated tokens/s over all sequences) and ``speed_pp``.
        """
        ctx = max(parallel) * (prompt + gen)
        argv = [str(self.binary("llama-batched-bench")), "-m", str(model), "-t", str(threads)]
        argv += ["-tb", str(threads), "-c", str(ctx), "-b", "2048", "-ub", "512", "--output-format", "jsonl"]
        argv += ["-npp", str(prompt), "-ntg", str(gen), "-npl", ",".join(map(str, parallel))]
        argv += ["--poll", str(poll)]
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=3600, stdin=subprocess.DEVNULL)
        if proc.returncode != 0:
            raise RuntimeError(f"llama-batched-bench exited {proc.returncode}: {proc.stderr[-2000:]}")
        records = _json_lines(proc.stdout) or _json_lines(proc.stderr)
        return {int(r["pl"]): r for r in records}

    def greedy(
        self, model: Path, prompts: list[list[int]], max_tokens: int, *, threads: int, text: str
    ) -> dict:
        """Greedy continuations of each prompt (ids) through the bindings; also llama.cpp's ids for ``text``.

        Returns ``{"tokens": [[max_tokens ids] per prompt], "text_ids": [...]}``.
        """
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(self.site), str(self.source)]),
            "LLAMA_CPP_LIB_PATH": str(self.build / "bin"),
        }
        request = {
            "model": str(model),
            "prompts": prompts,
            "max_tokens": max_tokens,
            "n_ctx": max(len(p) for p in prompts) + max_tokens + 8,
            "threads": threads,
            "text": text,
        }
        proc = subprocess.run(
            [sys.executable, "-c", _GREEDY],
            input=json.dumps(request),
            capture_output=True,
            text=True,
            timeout=900,
            env=env,
        )
        if proc.returncode != 0:
            raise RuntimeError(f"llama.cpp greedy run exited {proc.returncode}: {proc.stderr[-2000:]}")
        return _json_lines(proc.stdout)[-1]


def ensure(cache_dir: Path = DEFAULT_CACHE, version: str = DEFAULT_VERSION, *, log=print) -> LlamaCpp:
    """Download, extract and build llama.cpp ``version`` under ``cache_dir`` (each step skipped when done).

    Raises:
        RuntimeError: pip, cmake or the build failed (with the tail of their output).
        subprocess.TimeoutExpired: a step ran past its bound (the build: ``BUILD_TIMEOUT_S``).
    """
    cache_dir.mkdir(parents=True, exist_ok=True)
    sdist = cache_dir / "sdist" / f"llama_cpp_python-{version}.tar.gz"
    if not sdist.exists():
        log(f"llama.cpp: pip download llama-cpp-python=={version} (sdist)")
        _run(
            [
                sys.executable,
                "-m",
                "pip",
                "download",
                "--no-deps",
                "--no-binary",
                ":all:",
                f"llama-cpp-python=={version}",
                "-d",
                str(sdist.parent),
            ],
            timeout_s=900,
        )
    source = cache_dir / f"llama_cpp_python-{version}"
    if not (source / "vendor" / "llama.cpp" / "CMakeLists.txt").exists():
        log(f"llama.cpp: extracting {sdist.name}")
        with tarfile.open(sdist) as tar:
            tar.extractall(cache_dir, filter="data")
    site = cache_dir / "site"
    if not (site / "diskcache").exists():
        log("llama.cpp: pip install --target site diskcache (for the bindings)")
        _run(
            [sys.executable, "-m", "pip", "install", "--quiet", "--target", str(site), "diskcache"],
            timeout_s=600,
        )
    peer = LlamaCpp(version, source, cache_dir / f"build-{version}", site)
    if all(peer.binary(t).exists() for t in TARGETS[:-1]) and (peer.build / "bin" / "libllama.so").exists():
        return peer
    log(f"llama.cpp: cmake build of {', '.join(TARGETS)} under nice -n 10 (~9 min on 2 cores)")
    generator = ["-G", "Ninja"] if _has("ninja") else []
    _run(
        ["cmake", "-S", str(peer.llama_cpp_dir), "-B", str(peer.build), *generator, *CMAKE_FLAGS],
        timeout_s=600,
    )
    jobs = str(os.cpu_count() or 1)
    _run(
        ["nice", "-n", "10", "cmake", "--build", str(peer.build), "-j", jobs, "--target", *TARGETS],
        timeout_s=BUILD_TIMEOUT_S,
    )
    return peer


def _has(program: str) -> bool:
    from shutil import which

    return which(program) is not None
