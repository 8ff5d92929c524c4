"""envs/sparsebench.yaml (for `snakemake --sdm conda`) matches pyproject.toml's dependencies."""

from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")

ROOT = Path(__file__).resolve().parents[1]
ENV_FILE = ROOT / "envs" / "sparsebench.yaml"

#: PyPI name -> conda-forge name, where they differ.
CONDA_NAME = {"torch": "pytorch"}
#: Conda entries that are the environment itself, not a project dependency.
NOT_DEPENDENCIES = {"python", "pip"}

_CONDA_SPEC = re.compile(r"^\s*([A-Za-z0-9_.\-]+)\s*(.*?)\s*$")


def pyproject_dependencies() -> dict[str, SpecifierSet]:
    """Conda-side name -> version specifier of pyproject's [project] dependencies."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    deps = {}
    for text in project["dependencies"]:
        req = Requirement(text)
        name = canonicalize_name(req.name)
        deps[CONDA_NAME.get(name, name)] = req.specifier
    return deps


def conda_spec(text: str) -> tuple[str, SpecifierSet]:
    """A conda match spec ('pytorch>=2.2', 'numpy 1.26.*', 'python=3.11') as name + specifier."""
    match = _CONDA_SPEC.match(text.split("#")[0])
    assert match, f"cannot read conda spec {text!r}"
    name, version = match.group(1), match.group(2).replace(" ", "")
    if version.startswith("=") and not version.startswith("=="):
        version = "==" + version[1:] + (".*" if version.count(".") < 2 else "")
    elif version and version[0].isdigit():
        version = "==" + version
    return canonicalize_name(name), SpecifierSet(version)


def env_dependencies() -> tuple[dict[str, SpecifierSet], dict]:
    env = yaml.safe_load(ENV_FILE.read_text())
    deps: dict[str, SpecifierSet] = {}
    for entry in env["dependencies"]:
        if isinstance(entry, dict):
            assert set(entry) == {"pip"}, f"unexpected section {entry!r} in {ENV_FILE.name}"
            for text in entry["pip"]:
                req = Requirement(text)
                name = canonicalize_name(req.name)
                assert name not in deps, f"{name} listed twice in {ENV_FILE.name}"
                deps[CONDA_NAME.get(name, name)] = req.specifier
        else:
            name, spec = conda_spec(entry)
            assert name not in deps, f"{name} listed twice in {ENV_FILE.name}"
            deps[name] = spec
    return deps, env


def test_env_file_is_a_conda_env():
    _, env = env_dependencies()
    assert env["channels"][0] == "conda-forge"
    names = [e for e in env["dependencies"] if isinstance(e, str)]
    assert any(conda_spec(e)[0] == "python" for e in names), "pin python in the env"
    assert any(conda_spec(e)[0] == "pip" for e in names), "list pip when there is a pip: section"


def test_env_lists_the_same_packages_as_pyproject():
    project = pyproject_dependencies()
    env, _ = env_dependencies()
    env = {name: spec for name, spec in env.items() if name not in NOT_DEPENDENCIES}
    missing = sorted(set(project) - set(env))
    extra = sorted(set(env) - set(project))
    assert not missing and not extra, (
        f"envs/sparsebench.yaml and pyproject.toml differ: missing from the env {missing}, "
        f"not in pyproject {extra} (conda names: {CONDA_NAME})"
    )
    differ = {n: (str(project[n]), str(env[n])) for n in project if project[n] != env[n]}
    assert not differ, f"version bounds differ (pyproject, env): {differ}"


def test_env_python_satisfies_requires_python():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    env, _ = env_dependencies()
    requires = SpecifierSet(project["requires-python"])
    python = env["python"]
    pinned = [s.version.rstrip(".*") for s in python if s.operator == "=="]
    assert pinned, "pin a python version in the env"
    assert requires.contains(pinned[0]), f"python {pinned[0]} vs requires-python {requires}"


@pytest.mark.parametrize(
    ("text", "name", "version"),
    [
        ("pytorch>=2.2", "pytorch", "2.3"),
        ("python=3.11", "python", "3.11.4"),
        ("numpy 1.26.*", "numpy", "1.26.1"),
        ("pandas", "pandas", "0.1"),
    ],
)
def test_conda_spec_reader(text, name, version):
    got_name, spec = conda_spec(text)
    assert got_name == name
    assert spec.contains(version)
