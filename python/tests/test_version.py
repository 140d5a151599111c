"""One version everywhere: CMake's project(VERSION) is compiled into nibble.__version__; the three
pyproject.toml files (the repository's, python/, comfyui/) declare it by hand, so they are checked
against it here, as is the node pack's lower bound on nibble."""
import pathlib
import re

import nibble

ROOT = pathlib.Path(__file__).resolve().parents[2]


def cmake_version():
    m = re.search(r"project\(nibble VERSION ([0-9.]+)", (ROOT / "CMakeLists.txt").read_text())
    assert m, "CMakeLists.txt: no project(nibble VERSION ...)"
    return m.group(1)


def declared_version(path):
    m = re.search(r'^version\s*=\s*"([^"]+)"', path.read_text(), re.MULTILINE)
    assert m, f"{path}: no version = \"...\""
    return m.group(1)


def test_module_version_is_cmake_version():
    assert nibble.__version__ == cmake_version()


def test_pyproject_versions_match_cmake():
    want = cmake_version()
    for rel in ("pyproject.toml", "python/pyproject.toml", "comfyui/pyproject.toml"):
        assert declared_version(ROOT / rel) == want, rel


def test_node_pack_requires_at_most_this_nibble():
    text = (ROOT / "comfyui/pyproject.toml").read_text()
    m = re.search(r'"nibble>=([0-9.]+)"', text)
    assert m, "comfyui/pyproject.toml: no nibble>= requirement"
    have = tuple(int(p) for p in cmake_version().split("."))
    need = tuple(int(p) for p in m.group(1).split("."))
    assert need <= have
