"""The lock files are current: every dependency of pyproject.toml is pinned, the pins satisfy its ranges, the
no-torch lock agrees with the full one, and `make venv` installs under the lock. Refresh: scripts/lock.sh."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

REPO = Path(__file__).resolve().parents[1]
REFRESH = "out of date: run scripts/lock.sh and commit the lock files with pyproject.toml"


def pins(name: str) -> dict[str, Version]:
    out = {}
    for line in (REPO / name).read_text().splitlines():
        match = re.match(r"^([A-Za-z0-9._-]+)==([^\s;#]+)", line)
        if match:
            out[canonicalize_name(match[1])] = Version(match[2])
        else:
            assert not line.strip() or line.lstrip().startswith("#"), f"{name}: not a pin: {line!r}"
    return out


def requirements(*extras: str) -> list[Requirement]:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    listed = list(project["dependencies"])
    for extra in extras:
        listed += project["optional-dependencies"][extra]
    return [Requirement(r) for r in listed]


@pytest.fixture(scope="module")
def lock() -> dict[str, Version]:
    return pins("requirements.lock")


@pytest.mark.parametrize("requirement", requirements("test"), ids=str)
def test_every_dependency_is_pinned_within_its_range(requirement, lock):
    name = canonicalize_name(requirement.name)
    assert name in lock, f"{requirement.name} is not in requirements.lock: {REFRESH}"
    assert requirement.specifier.contains(lock[name], prereleases=True), \
        f"requirements.lock pins {name}=={lock[name]}, outside {requirement}: {REFRESH}"


def test_torch_is_the_release_ci_tests_without_a_build_label(lock):
    assert lock["torch"] == Version("2.13.0") and not lock["torch"].local
    assert not any(name.startswith("nvidia-") or name == "triton" for name in lock), "a CUDA build's packages"


def test_notorch_lock_is_the_full_lock_without_torch(lock):
    notorch = pins("requirements-notorch.lock")
    assert "torch" not in notorch
    assert {name: version for name, version in notorch.items() if lock.get(name) != version} == {}
    runtime = {canonicalize_name(r.name) for r in requirements()} - {"torch"}
    assert runtime <= set(notorch), REFRESH


def test_make_venv_installs_under_the_lock():
    makefile = (REPO / "Makefile").read_text()
    target = makefile[makefile.index("$(VENV)/.installed:"):].split("\n\n")[0]
    assert "requirements.lock" in target.splitlines()[0], "the venv is rebuilt when the lock changes"
    installs = [line for line in target.splitlines() if "install" in line and "$(PIP)" in line]
    assert installs and all("-c requirements.lock" in line for line in installs)
