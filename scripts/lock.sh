#!/usr/bin/env bash
# Refresh the lock files from pyproject.toml (+ requirements.in). Run after any dependency change, then
# `make venv` and `make test`, and commit pyproject.toml and both lock files together.
#
#   requirements.lock          every package CI installs (runtime + the `test` extra + torch + pip), exact versions.
#                              `make venv` installs with it as a constraints file.
#   requirements-notorch.lock  the same pins without torch and what only torch needs: for images that bring
#                              their own torch (the CUDA base of the Dockerfile), so pip keeps that torch.
#
# Tool: uv (pinned below) because it resolves in a second and its output is stable and annotated ("# via ...").
# Resolution is for CPython 3.11 on x86_64 manylinux (CI here, the Debian bookworm and PyTorch images).
set -euo pipefail
cd "$(dirname "$0")/.."

UV_VERSION=0.13.8
if command -v uv >/dev/null 2>&1 && [ "$(uv --version | cut -d' ' -f2)" = "$UV_VERSION" ]; then
    UV=uv
else
    tools=$(mktemp -d)
    python3 -m venv "$tools" && "$tools/bin/pip" install -q "uv==$UV_VERSION"
    UV="$tools/bin/uv"
fi

# The CPU build of torch: this machine's wheel folder if it has one, else PyTorch's CPU index.
TORCH_WHEELS=${TORCH_WHEELS:-$(pip config get global.find-links 2>/dev/null || echo /opt/wheels)}
if ls "$TORCH_WHEELS"/torch-*+cpu-*.whl >/dev/null 2>&1; then
    torch_source=(--find-links "$TORCH_WHEELS")
else
    torch_source=(--extra-index-url https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)
fi
common=(--python-version 3.11 --python-platform x86_64-manylinux_2_28 "${torch_source[@]}"
        --custom-compile-command "scripts/lock.sh")

# uv keeps the versions of the existing output file where it can (a refresh changes only what must change).
# Seed it with the CPU build named, or uv would prefer PyPI's unlabelled (CUDA) torch and its nvidia-* packages.
seed=$(mktemp)
trap 'rm -f "$seed"; [ -n "${tools:-}" ] && rm -rf "$tools"' EXIT
[ -f requirements.lock ] && sed -E 's/^(torch==[0-9.]+)$/\1+cpu/' requirements.lock > "$seed"
"$UV" pip compile -q pyproject.toml requirements.in --extra test "${common[@]}" -o "$seed"
# Drop torch's local label (2.13.0+cpu -> 2.13.0): the pin then admits the CPU wheel (CI) and a CUDA build
# of the same release on a GPU workstation; which build comes is the index's choice, the version is not.
sed -E 's/^(torch==[^+[:space:]]+)\+[a-z0-9.]+/\1/' "$seed" > requirements.lock
if grep -qE '^(nvidia-|triton==|cuda-)' requirements.lock; then
    echo "lock.sh: a CUDA build of torch was resolved (nvidia-*/triton in requirements.lock): is the CPU wheel reachable?" >&2
    exit 1
fi

# Same versions (constrained by requirements.lock), torch removed by an override that never applies.
override=$(mktemp)
printf 'torch; sys_platform == "never"\n' > "$override"
"$UV" pip compile -q pyproject.toml -c requirements.lock --override "$override" "${common[@]}" -o requirements-notorch.lock
rm -f "$override"
if grep -qiE '^(torch|sympy|networkx|jinja2)==' requirements-notorch.lock; then
    echo "lock.sh: torch or its dependencies leaked into requirements-notorch.lock" >&2; exit 1
fi
echo "requirements.lock: $(grep -c '^[a-z]' requirements.lock) pins; requirements-notorch.lock: $(grep -c '^[a-z]' requirements-notorch.lock) pins"
