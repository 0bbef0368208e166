"""The Dockerfile's contract, read as text (fast; the real build is scripts/container_check.sh).

Pinned base given as a build argument, an unprivileged user, ``pancls`` as the entrypoint, ``/data`` and ``/runs``
as volumes, installation from the lock files, nothing secret or machine-specific baked in, and a
``.dockerignore`` that keeps environments, run folders, data and history out of the build context.
"""
from __future__ import annotations

import fnmatch
import json
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def instructions(text: str) -> list[tuple[str, str]]:
    """``(INSTRUCTION, arguments)`` per Dockerfile instruction: comments dropped, continuation lines joined."""
    out, pending = [], ""
    for line in text.splitlines():
        stripped = line.strip()
        if not pending and (not stripped or stripped.startswith("#")):
            continue
        if pending and stripped.startswith("#"):
            continue  # a comment inside a continued instruction
        if stripped.endswith("\\"):
            pending += stripped[:-1].rstrip() + " "
            continue
        full = (pending + stripped).strip()
        pending = ""
        word, _, rest = full.partition(" ")
        out.append((word.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return out


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return instructions((REPO / "Dockerfile").read_text())


def args_before_from(steps) -> dict[str, str]:
    out = {}
    for word, rest in steps:
        if word == "FROM":
            return out
        if word == "ARG":
            name, _, default = rest.partition("=")
            out[name] = default.strip().strip('"')
    raise AssertionError("no FROM")


def exec_form(rest: str) -> list[str]:
    value = json.loads(rest)  # exec (JSON) form, so signals reach pancls and arguments append
    assert isinstance(value, list) and all(isinstance(v, str) for v in value)
    return value


def test_instruction_parser_joins_continuations_and_drops_comments():
    steps = instructions("# c\nARG A=1\nRUN a \\\n  # inside\n  && b\nUSER x\n")
    assert steps == [("ARG", "A=1"), ("RUN", "a && b"), ("USER", "x")]


def test_base_image_is_a_build_argument_pinned_by_tag(dockerfile):
    froms = [rest for word, rest in dockerfile if word == "FROM"]
    assert froms == ["${BASE_IMAGE}"], "one stage, FROM ${BASE_IMAGE}"
    default = args_before_from(dockerfile).get("BASE_IMAGE")
    assert default, "ARG BASE_IMAGE=<image>:<tag> before FROM"
    name, sep, tag = default.rpartition(":")
    assert sep and "/" not in tag, f"{default!r} has no tag"
    assert tag != "latest" and re.search(r"\d", tag), f"{default!r}: pin a versioned tag, not {tag!r}"
    assert "cuda" in default.lower(), "the default base is a CUDA-enabled PyTorch image"


def test_runs_as_an_unprivileged_user(dockerfile):
    users = [rest for word, rest in dockerfile if word == "USER"]
    assert users, "no USER: the container would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    # the user is created before it is used
    created = any(word == "RUN" and "useradd" in rest and users[-1].split(":")[0] in rest for word, rest in dockerfile)
    assert created


def test_entrypoint_is_pancls_and_volumes_are_data_and_runs(dockerfile):
    entry = [rest for word, rest in dockerfile if word == "ENTRYPOINT"]
    assert entry and exec_form(entry[-1]) == ["pancls"]
    volumes = set()
    for word, rest in dockerfile:
        if word == "VOLUME":
            volumes.update(exec_form(rest) if rest.startswith("[") else rest.split())
    assert {"/data", "/runs"} <= volumes


def test_installs_from_the_lock_files_and_keeps_the_base_torch(dockerfile):
    runs = " ".join(rest for word, rest in dockerfile if word == "RUN")
    copies = " ".join(rest for word, rest in dockerfile if word == "COPY")
    for lock in ("requirements.lock", "requirements-notorch.lock"):
        assert lock in copies and lock in runs
        assert (REPO / lock).is_file()
    assert re.search(r"pip install[^&;]*-c \"?\$lock", runs), "pancls is installed under the lock's constraints"
    assert "import torch" in runs, "a base that brings torch keeps it (requirements-notorch.lock)"
    notorch = (REPO / "requirements-notorch.lock").read_text().lower()
    assert not re.search(r"^(torch|sympy|networkx|jinja2|nvidia-[a-z0-9-]+|triton)==", notorch, re.M)
    assert "dcm2niix" in runs


def test_nothing_secret_or_machine_specific_is_baked_in():
    text = (REPO / "Dockerfile").read_text()
    code = "\n".join(line for line in text.splitlines() if not line.lstrip().startswith("#"))
    # no index given by value (a build argument may name one at build time), no local indexes or wheel folders
    assert not re.search(r"--(extra-)?index-url[ =]+['\"]?(https?|file)://", code)
    assert not re.search(r"(PIP_INDEX_URL|PIP_EXTRA_INDEX_URL|PIP_FIND_LINKS|PIP_CERT|PIP_CONSTRAINT)\s*=", code)
    assert "file://" not in code and "/opt/wheels" not in code and "--find-links" not in code
    assert "--trusted-host" not in code
    assert not re.search(r"/etc/xdg/pip|pip\.conf|\.netrc|ca-certificates\.crt", code)
    # no credential-like build argument or variable (ARG values stay in the image history), with or without a value
    assert not re.search(r"(?i)\w*(token|password|passwd|secret|api[_-]?key|credential)\w*\s*[=:]", code)
    assert not re.search(r"(?im)^\s*(ARG|ENV)\s+\w*(token|password|secret|key)\w*\s*$", code)
    assert not re.search(r"(?i)(ghp_|glpat-|hf_[a-z0-9]{20}|AKIA[0-9A-Z]{16}|-----BEGIN)", code)
    assert not re.search(r"https?://[^/\s]*:[^@\s]*@", code), "credentials in a URL"
    # build arguments are not re-exported into the image's environment
    envs = " ".join(rest for word, rest in instructions(text) if word == "ENV")
    assert "TORCH_INDEX_URL" not in envs and "INDEX" not in envs


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule, simplified: a pattern matches the path or one of its parent folders; ``!`` re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern[1:] if negate else pattern
        pat = pat.strip("/")
        alternatives = {pat, pat.replace("**/", "")} if pat.startswith("**/") else {pat}
        if any(fnmatch.fnmatchcase(prefix, alt) and (alt.count("/") == prefix.count("/") or "**" in pattern)
               for prefix in prefixes for alt in alternatives):
            result = not negate
    return result


@pytest.mark.parametrize("path", [".venv/bin/python", "runs/cv/fold_0/best.pt", ".git/HEAD", "data/ct/a.nii.gz",
                                  "carry/cifar10_lt_ir100.npz", "scan.nii.gz", "pancls/__pycache__/cli.cpython-311.pyc"])
def test_dockerignore_keeps_out_environments_runs_history_and_data(path):
    assert (REPO / ".dockerignore").is_file()
    assert ignored(path, dockerignore_patterns()), path


@pytest.mark.parametrize("path", ["pyproject.toml", "README.md", "requirements.lock", "requirements-notorch.lock",
                                  "pancls/cli.py", "pancls/data/__init__.py", "pancls/recipes/cv_demo_cpu.yaml",
                                  "configs/ct_preprocess.yaml"])
def test_dockerignore_keeps_what_the_image_copies(path):
    assert not ignored(path, dockerignore_patterns()), path


def test_everything_the_dockerfile_copies_exists(dockerfile):
    for word, rest in dockerfile:
        if word == "COPY":
            sources = shlex.split(rest)[:-1]
            for source in sources:
                if not source.startswith("--"):
                    assert (REPO / source).exists(), source
