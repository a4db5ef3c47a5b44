"""The GGUF toolchain, from PyPI only: llama.cpp's converter and library out of one source archive.

    python -m sftlib gguf-setup            # first run: download + build (about 8 min on 2 cores); later: seconds
    python -m sftlib gguf-setup --check    # say what is there, change nothing (exit 1 when incomplete)

    from sftlib.exports.gguf.setup import ensure_toolchain, find_toolchain
    tc = ensure_toolchain()                # builds what is missing, returns a Toolchain
    tc = find_toolchain()                  # only looks; GGUFToolchainError says how to install
    tc = require_toolchain()               # the same, and llama_cpp must import (what an export needs)

Why this route: PyPI has no Linux wheels of `llama-cpp-python`, but its source archive carries the
whole llama.cpp tree, with `convert_hf_to_gguf.py`, its `conversion/` modules and the matching
`gguf-py/`. We build the archive once into a wheel and keep it in a cache folder
(`$SFTLIB_CACHE/llama-cpp`, default `~/.cache/sftlib/llama-cpp`), and take the converter files from
the same archive, so converter, gguf-py and the library always agree. Nothing comes from GitHub or
the Hugging Face Hub. The wheel is built with `-DGGML_NATIVE=OFF` (a cached wheel must not use the
build machine's newest instructions, or it dies with SIGILL on an older CPU) and `-DLLAVA_BUILD=OFF`
(the multimodal library is not needed to export). `llama_cpp.llama_model_quantize` then writes every
quantization type, so no `llama-quantize` binary is needed; one found on PATH is used when the Python
binding is missing. `SFTLIB_LLAMA_CPP_DIR` may point at a llama.cpp checkout to use its converter instead.
Needs cmake >= 3.21 and a C++17 compiler (present in Colab and on Debian/Ubuntu with build-essential).
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from sftlib.child import run_child
from sftlib.errors import SftlibError

VERSION = "0.3.36"  # llama-cpp-python; bundles llama.cpp with a converter that handles transformers 5 configs
PACKAGE = "llama-cpp-python"
CMAKE_ARGS = "-DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF"
# What we take from the archive's llama.cpp tree: the converters and the gguf-py they were written against.
SOURCE_PARTS = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "conversion", "gguf-py")


class GGUFToolchainError(SftlibError):
    """The converter or the llama.cpp library is missing; the message says how to install them."""


@dataclass
class Toolchain:
    version: str  # llama-cpp-python version the converter files come from
    source_dir: Path  # holds convert_hf_to_gguf.py, conversion/, gguf-py/
    converter: Path  # convert_hf_to_gguf.py
    lora_converter: Path | None  # convert_lora_to_gguf.py
    wheel: Path | None = None  # the cached wheel, when built here
    llama_cpp_version: str | None = None  # version of `llama_cpp` importable by the target Python, if any
    quantize_binary: str | None = None  # a `llama-quantize` on PATH, used when the binding is missing

    def describe(self) -> str:
        return "\n".join([
            f"converter      {self.converter}",
            f"llama_cpp      {self.llama_cpp_version or 'not importable'}",
            f"wheel          {self.wheel or '-'}",
            f"llama-quantize {self.quantize_binary or 'not on PATH (not needed with llama_cpp)'}",
        ])


def cache_folders() -> list[Path]:
    """Where the toolchain may live, first choice first: `$SFTLIB_CACHE/llama-cpp`, then the home cache
    (so a test session with its own SFTLIB_CACHE still finds the wheel built once for the machine)."""
    home = Path.home() / ".cache" / "sftlib" / "llama-cpp"
    env = os.environ.get("SFTLIB_CACHE")
    folders = [Path(env) / "llama-cpp"] if env else []
    return folders + ([home] if home not in folders else [])


def _sdist_name(version: str) -> str:
    return f"llama_cpp_python-{version}"


def _source_complete(folder: Path) -> bool:
    return (folder / "convert_hf_to_gguf.py").is_file() and (folder / "gguf-py" / "gguf").is_dir()


def _installed_version(python: str) -> str | None:
    """The `llama_cpp` version `python` imports (loading its shared library), or None."""
    proc = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                          capture_output=True, text=True)
    return proc.stdout.strip() or None if proc.returncode == 0 else None


def _wheel_dir(cache: Path) -> Path:
    # The wheel is tagged py3-none-linux_<arch>: one per architecture; its glibc is the build machine's.
    return cache / "wheels" / platform.machine()


def _find_wheel(cache: Path, version: str) -> Path | None:
    found = sorted(_wheel_dir(cache).glob(f"{_sdist_name(version)}-*.whl"))
    return found[-1] if found else None


def find_toolchain(*, python: str | None = None, version: str = VERSION) -> Toolchain:
    """The installed toolchain, without changing anything; raises GGUFToolchainError when the converter is missing."""
    python = python or sys.executable
    custom = os.environ.get("SFTLIB_LLAMA_CPP_DIR")
    candidates = [Path(custom)] if custom else []
    candidates += [c / f"src-{version}" for c in cache_folders()]
    source = next((c for c in candidates if _source_complete(c)), None)
    if source is None:
        raise GGUFToolchainError(
            f"the llama.cpp converter (`convert_hf_to_gguf.py` from {PACKAGE} {version}) is not installed; "
            "run `python -m sftlib gguf-setup` once (it builds llama.cpp: about 8 minutes on 2 cores, "
            "then cached), or set `SFTLIB_LLAMA_CPP_DIR` to a llama.cpp checkout"
        )
    wheel = next((w for c in cache_folders() if (w := _find_wheel(c, version))), None)
    lora = source / "convert_lora_to_gguf.py"
    return Toolchain(version=version, source_dir=source, converter=source / "convert_hf_to_gguf.py",
                     lora_converter=lora if lora.is_file() else None, wheel=wheel,
                     llama_cpp_version=_installed_version(python), quantize_binary=shutil.which("llama-quantize"))


def require_toolchain(*, python: str | None = None) -> Toolchain:
    """`find_toolchain`, and an error unless `llama_cpp` imports too (it quantizes and checks the files)."""
    tc = find_toolchain(python=python)
    if tc.llama_cpp_version is None:
        raise GGUFToolchainError(
            "`llama_cpp` (llama.cpp's library: it quantizes and checks the GGUF files) cannot be imported; "
            "run `python -m sftlib gguf-setup` (it installs the cached build in seconds)"
        )
    return tc


def _pip(python: str, *args: str, env: dict | None = None, log=print) -> None:
    cmd = [python, "-m", "pip", *args]
    proc = run_child(cmd, env=env)
    if proc.returncode != 0:
        tail = (proc.stdout + proc.stderr)[-3000:]
        raise GGUFToolchainError(f"`{' '.join(cmd)}` failed (exit {proc.returncode}):\n{tail}")


def _download_sdist(cache: Path, version: str, python: str, log) -> Path:
    target = cache / f"{_sdist_name(version)}.tar.gz"
    if target.is_file():
        return target
    log(f"gguf setup: downloading the {PACKAGE} {version} source archive from PyPI")
    start = time.time()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _pip(python, "download", "--no-deps", "--no-binary", ":all:", "-d", tmp, f"{PACKAGE}=={version}", log=log)
        got = next(Path(tmp).glob("*.tar.gz"))
        os.replace(got, target)  # atomic: a half-downloaded archive never carries the final name
    log(f"gguf setup: downloaded {target.name} ({target.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.0f}s")
    return target


def _extract_source(cache: Path, sdist: Path, version: str, log) -> Path:
    target = cache / f"src-{version}"
    if _source_complete(target):
        return target
    prefix = f"{_sdist_name(version)}/vendor/llama.cpp/"
    tmp = Path(tempfile.mkdtemp(prefix=".src-", dir=cache))
    try:
        with tarfile.open(sdist) as tar:
            members = []
            for m in tar.getmembers():
                rel = m.name[len(prefix):] if m.name.startswith(prefix) else None
                if rel and ".." in rel.split("/"):
                    continue  # never write outside the target folder
                if rel and rel.split("/", 1)[0] in SOURCE_PARTS and (m.isfile() or m.isdir()):
                    m.name = rel
                    members.append(m)
            tar.extractall(tmp, members=members, filter="data")
        if not _source_complete(tmp):
            raise GGUFToolchainError(f"{sdist} has no `{prefix}convert_hf_to_gguf.py`; delete it and run again")
        shutil.rmtree(target, ignore_errors=True)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache may be shared
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    log(f"gguf setup: converter files in {target}")
    return target


def _build_wheel(cache: Path, sdist: Path, version: str, python: str, jobs: int, log) -> Path:
    out = _wheel_dir(cache)
    out.mkdir(parents=True, exist_ok=True)
    log(f"gguf setup: building llama.cpp ({PACKAGE} {version}, CMAKE_ARGS={CMAKE_ARGS!r}, {jobs} jobs); "
        "this runs once per machine and takes about 8 minutes on 2 cores")
    env = dict(os.environ, CMAKE_ARGS=CMAKE_ARGS, CMAKE_BUILD_PARALLEL_LEVEL=str(jobs))
    start = time.time()
    with tempfile.TemporaryDirectory(dir=cache) as tmp:
        _pip(python, "wheel", "--no-deps", "-w", tmp, str(sdist), env=env, log=log)
        built = next(Path(tmp).glob("*.whl"))
        wheel = out / built.name
        os.replace(built, wheel)
    log(f"gguf setup: built {wheel.name} ({wheel.stat().st_size / 1e6:.1f} MB) in {time.time() - start:.0f}s")
    return wheel


def ensure_toolchain(*, cache: str | Path | None = None, python: str | None = None, install: bool = True,
                     version: str = VERSION, jobs: int | None = None, log=print) -> Toolchain:
    """Download, build and install what is missing (each step skipped when its result is cached)."""
    python = python or sys.executable
    cache = Path(cache) if cache else cache_folders()[0]
    cache.mkdir(parents=True, exist_ok=True)
    start = time.time()
    wheel = _find_wheel(cache, version)
    installed = _installed_version(python)
    source_ready = _source_complete(cache / f"src-{version}")
    if not source_ready or (install and installed != version and wheel is None):
        sdist = _download_sdist(cache, version, python, log)
        _extract_source(cache, sdist, version, log)
        if install and installed != version and wheel is None:
            wheel = _build_wheel(cache, sdist, version, python, jobs or os.cpu_count() or 2, log)
    if install and installed != version:
        log(f"gguf setup: installing {wheel.name} into {python}")
        _pip(python, "install", "--quiet", "--force-reinstall", "--no-deps", str(wheel), log=log)
        # Its runtime dependencies, without touching versions already installed (numpy, jinja2).
        _pip(python, "install", "--quiet", "typing-extensions>=4.5", "numpy>=1.20", "diskcache>=5.6.1",
             "jinja2>=2.11.3", log=log)
        installed = _installed_version(python)
        if installed != version:
            raise GGUFToolchainError(f"installed {wheel.name} but `import llama_cpp` still fails in {python}")
    tc = Toolchain(version=version, source_dir=cache / f"src-{version}",
                   converter=cache / f"src-{version}" / "convert_hf_to_gguf.py",
                   lora_converter=cache / f"src-{version}" / "convert_lora_to_gguf.py", wheel=wheel,
                   llama_cpp_version=installed, quantize_binary=shutil.which("llama-quantize"))
    log(f"gguf setup: ready in {time.time() - start:.1f}s")
    return tc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m sftlib gguf-setup", description=__doc__.split("\n\n")[0])
    p.add_argument("--check", action="store_true", help="only report what is installed; exit 1 when incomplete")
    p.add_argument("--cache", help="cache folder (default $SFTLIB_CACHE/llama-cpp or ~/.cache/sftlib/llama-cpp)")
    p.add_argument("--no-install", action="store_true", help="fetch the converter files only; install no wheel")
    p.add_argument("--jobs", type=int, help="parallel compile jobs (default: all cores)")
    args = p.parse_args(argv)
    try:
        if args.check:
            tc = find_toolchain()
            print(tc.describe())
            return 0 if tc.llama_cpp_version == VERSION or tc.quantize_binary else 1
        tc = ensure_toolchain(cache=args.cache, install=not args.no_install, jobs=args.jobs)
    except GGUFToolchainError as exc:
        print(f"gguf setup: {exc}", file=sys.stderr)
        return 1
    print(tc.describe())
    return 0


if __name__ == "__main__":
    sys.exit(main())
