"""clipfast.settings: every CLIPFAST_* environment variable declared once, read at call time; no
other module of the source tree reads one from the environment itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from clipfast import settings
from clipfast.errors import InputError

ROOT = Path(__file__).resolve().parents[1]
# The packages (clipfast, and export/ installed as clipfast.export): only settings.py reads.
SOURCE_TREE = ("clipfast", "export")
SETTINGS_FILE = ROOT / "clipfast" / "settings.py"
# Reads and writes of the environment whose variable names are checked against the declared ones
ENV_METHODS = ("get", "pop", "setdefault", "setenv", "delenv")


def test_every_setting_is_declared_with_type_default_and_doc():
    assert settings.SETTINGS
    for name, s in settings.SETTINGS.items():
        assert name == s.name and name.startswith("CLIPFAST_") and name.isupper()
        assert s.type and s.doc.strip() and s.scope in ("runtime", "tests", "benchmarks")
        assert s.describe_default()
    runtime = {n for n, s in settings.SETTINGS.items() if s.scope == "runtime"}
    assert runtime == {"CLIPFAST_ALLOW_PRECISIONS", "CLIPFAST_API_KEY", "CLIPFAST_AUTO_TUNE",
                       "CLIPFAST_CACHE_DIR", "CLIPFAST_DISABLE_KERNELS",
                       "CLIPFAST_KERNELS_LIB", "CLIPFAST_TORCH_ATTENTION"}


def test_values_are_read_when_asked(monkeypatch, tmp_path):
    monkeypatch.delenv("CLIPFAST_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert settings.CLIPFAST_CACHE_DIR == tmp_path / "home" / ".cache" / "clipfast"
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", f" {tmp_path / 'c'} ")
    assert settings.CLIPFAST_CACHE_DIR == tmp_path / "c"
    monkeypatch.setenv("CLIPFAST_CACHE_DIR", "  ")  # blank: the default
    assert settings.CLIPFAST_CACHE_DIR == tmp_path / "home" / ".cache" / "clipfast"
    for text, disabled in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("CLIPFAST_DISABLE_KERNELS", text)
        assert settings.CLIPFAST_DISABLE_KERNELS is disabled, text
    monkeypatch.setenv("CLIPFAST_DISABLE_KERNELS", "1")
    assert settings.assignment("CLIPFAST_DISABLE_KERNELS") == "CLIPFAST_DISABLE_KERNELS=1"
    monkeypatch.delenv("CLIPFAST_KERNELS_LIB", raising=False)
    assert settings.CLIPFAST_KERNELS_LIB is None and settings.raw("CLIPFAST_KERNELS_LIB") is None


def test_a_bad_value_names_the_variable_and_the_choices():
    env = {"CLIPFAST_TORCH_ATTENTION": " Kernel "}
    assert settings.value("CLIPFAST_TORCH_ATTENTION", env) == "kernel"
    assert settings.value("CLIPFAST_TORCH_ATTENTION", {}) is None
    with pytest.raises(InputError, match=r"CLIPFAST_TORCH_ATTENTION='fast': expected one of "
                                         r"auto, sdpa, kernel \(or unset\)"):
        settings.value("CLIPFAST_TORCH_ATTENTION", {"CLIPFAST_TORCH_ATTENTION": "fast"})


def test_undeclared_names_are_refused():
    with pytest.raises(KeyError, match="CLIPFAST_NOPE is not a declared clipfast setting"):
        settings.value("CLIPFAST_NOPE")
    with pytest.raises(AttributeError):
        _ = settings.CLIPFAST_NOPE


def test_readme_lists_every_variable():
    readme = (ROOT / "README.md").read_text()
    assert "clipfast/settings.py" in readme
    for name in settings.SETTINGS:
        assert f"`{name}`" in readme, name


# -- the source tree reads the environment through settings only -------------------------------
def _is_environ(node: ast.AST) -> bool:
    """``os.environ``, ``environ`` (a mapping passed in under that name) or ``monkeypatch``."""
    return (isinstance(node, ast.Name) and node.id in ("environ", "monkeypatch")) or (
        isinstance(node, ast.Attribute) and node.attr == "environ")


def _constants(tree: ast.AST) -> dict[str, str]:
    """Module-level ``NAME = "CLIPFAST_..."`` assignments."""
    out = {}
    for node in getattr(tree, "body", []):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(
                node.value.value, str):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    out[target.id] = node.value.value
    return out


def _env_name(node: ast.AST, constants: dict[str, str]) -> str | None:
    """The variable name ``node`` spells: a string, a constant holding one (also when reached as
    ``module.NAME``), or the literal start of an f-string."""
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return node.value
    if isinstance(node, ast.Name):
        return constants.get(node.id)
    if isinstance(node, ast.Attribute):
        return constants.get(node.attr)
    if isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0],
                                                                       ast.Constant):
        return str(node.values[0].value)
    return None


def env_uses(source: str, constants: dict[str, str] | None = None) -> list[tuple[int, str]]:
    """``(line, name)`` of every read or write of an environment variable in ``source``:
    ``os.environ[...]``, ``os.environ.get/pop/setdefault(...)``, ``... in os.environ``,
    ``os.getenv(...)``, ``monkeypatch.setenv/delenv(...)``; names resolved through constants."""
    tree = ast.parse(source)
    known = {**(constants or {}), **_constants(tree)}
    found = []
    for node in ast.walk(tree):
        arg = None
        if isinstance(node, ast.Subscript) and _is_environ(node.value):
            arg = node.slice
        elif isinstance(node, ast.Call) and node.args:
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ENV_METHODS and _is_environ(
                    func.value):
                arg = node.args[0]
            elif (isinstance(func, ast.Attribute) and func.attr == "getenv") or (
                    isinstance(func, ast.Name) and func.id == "getenv"):
                arg = node.args[0]
        elif isinstance(node, ast.Compare) and any(isinstance(op, (ast.In, ast.NotIn))
                                                   for op in node.ops):
            if any(_is_environ(c) for c in node.comparators):
                arg = node.left
        if arg is not None:
            name = _env_name(arg, known)
            found.append((node.lineno, name if name is not None else "<computed>"))
    return found


def _python_files(*folders: str) -> list[Path]:
    return sorted(p for folder in folders for p in (ROOT / folder).rglob("*.py")
                  if "__pycache__" not in p.parts)


def _all_constants(files: list[Path]) -> dict[str, str]:
    out: dict[str, str] = {}
    for path in files:
        out.update({k: v for k, v in _constants(ast.parse(path.read_text())).items()
                    if v.startswith("CLIPFAST_")})
    return out


def test_the_detector_finds_every_form_of_read():
    source = '''
import os
from os import environ, getenv
ENV = "CLIPFAST_A"
a = os.environ.get("CLIPFAST_B", "")
b = os.environ["CLIPFAST_C"]
c = os.getenv(ENV)
d = "CLIPFAST_D" in os.environ
e = environ.get(lib.ENV)
f = getenv(f"CLIPFAST_{x}")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
'''
    assert [n for _, n in env_uses(source)] == [
        "CLIPFAST_B", "CLIPFAST_C", "CLIPFAST_A", "CLIPFAST_D", "CLIPFAST_A", "CLIPFAST_",
        "HF_HUB_OFFLINE"]


def test_only_settings_reads_clipfast_variables():
    files = _python_files(*SOURCE_TREE)
    assert SETTINGS_FILE in files and len(files) > 20
    constants = _all_constants(files)
    offenders = []
    for path in files:
        if path == SETTINGS_FILE:
            continue
        for line, name in env_uses(path.read_text(), constants):
            if name.startswith("CLIPFAST_") or name == "<computed>":
                offenders.append(f"{path.relative_to(ROOT)}:{line} reads {name}")
    assert not offenders, ("read these through clipfast.settings (declared there once): "
                           + "; ".join(offenders))


def test_every_variable_used_anywhere_is_declared():
    """Tests and benchmarks too: a CLIPFAST_* variable read or set anywhere is in the list."""
    files = _python_files(*SOURCE_TREE, "tests", "benchmarks")
    constants = _all_constants(files)
    used = {name for path in files for _, name in env_uses(path.read_text(), constants)
            if name.startswith("CLIPFAST_")}
    assert "CLIPFAST_BENCH_DEVICE" in used  # the scan sees reads outside the source tree
    assert used - {"CLIPFAST_"} <= set(settings.SETTINGS), used - set(settings.SETTINGS)
