"""The GGUF toolchain installer: what it takes from the source archive, where it looks, what it says.

    pytest tests/test_gguf_setup.py -q

The real download and build (6-8 minutes) run in `make test`'s install step; here a small archive
with the same layout stands in for the PyPI one, so the extraction and lookup logic runs offline.
"""

from __future__ import annotations

import io
import tarfile

import pytest

from sftlib.exports.gguf import setup as gguf_setup
from sftlib.exports.gguf.setup import GGUFToolchainError, ensure_toolchain, find_toolchain


def _fake_sdist(path, version):
    root = f"llama_cpp_python-{version}/vendor/llama.cpp/"
    files = {
        "convert_hf_to_gguf.py": "print('converter')\n", "convert_lora_to_gguf.py": "print('lora')\n",
        "conversion/__init__.py": "", "gguf-py/gguf/__init__.py": "", "ggml/src/ggml.c": "/* not wanted */\n",
        "README.md": "not wanted\n",
    }
    with tarfile.open(path, "w:gz") as tar:
        for name, text in files.items():
            data = text.encode()
            info = tarfile.TarInfo(root + name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        evil = tarfile.TarInfo(root + "conversion/../../../../escape.py")  # a path leaving the folder
        evil.size = 1
        tar.addfile(evil, io.BytesIO(b"x"))


def test_converter_files_come_from_the_archive_and_a_second_run_changes_nothing(tmp_path, monkeypatch):
    version = "9.9.9"
    cache = tmp_path / "cache" / "llama-cpp"
    cache.mkdir(parents=True)
    _fake_sdist(cache / f"llama_cpp_python-{version}.tar.gz", version)
    monkeypatch.setenv("SFTLIB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SFTLIB_LLAMA_CPP_DIR", raising=False)
    lines = []
    tc = ensure_toolchain(install=False, version=version, log=lines.append)
    src = cache / f"src-{version}"
    assert tc.converter == src / "convert_hf_to_gguf.py" and tc.converter.read_text() == "print('converter')\n"
    assert sorted(p.name for p in src.iterdir()) == ["conversion", "convert_hf_to_gguf.py", "convert_lora_to_gguf.py",
                                                      "gguf-py"]
    assert not (tmp_path / "escape.py").exists() and not list(tmp_path.rglob("escape.py"))
    assert any("converter files in" in line for line in lines)
    lines.clear()
    ensure_toolchain(install=False, version=version, log=lines.append)
    assert not any("converter files in" in line or "download" in line for line in lines)  # all cached
    found = find_toolchain(version=version)
    assert found.source_dir == src and found.lora_converter == src / "convert_lora_to_gguf.py"


def test_missing_toolchain_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("SFTLIB_CACHE", str(tmp_path / "empty"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SFTLIB_LLAMA_CPP_DIR", raising=False)
    with pytest.raises(GGUFToolchainError, match=r"python -m sftlib gguf-setup"):
        find_toolchain(version="9.9.9")
    assert gguf_setup.main(["--check"]) == 1


def test_a_llama_cpp_checkout_can_stand_in(tmp_path, monkeypatch):
    checkout = tmp_path / "llama.cpp"
    (checkout / "gguf-py" / "gguf").mkdir(parents=True)
    (checkout / "convert_hf_to_gguf.py").write_text("")
    monkeypatch.setenv("SFTLIB_LLAMA_CPP_DIR", str(checkout))
    assert find_toolchain(version="9.9.9").converter == checkout / "convert_hf_to_gguf.py"
