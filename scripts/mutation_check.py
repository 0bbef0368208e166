#!/usr/bin/env python3
"""Mutation check: does the test suite notice a broken formula in the heads, losses and metrics?

Each mutation below is one deliberate bug of the kind a refactor introduces (a sign flip, an off-by-one, a
dropped normalisation, the wrong axis). For each one, a scratch copy of the repository gets that single edit and
the tests of the touched area run there; the mutation is *killed* when at least one test fails. A surviving
mutation is a formula no test pins down. The table (markdown) goes to stdout; the exit status is 1 if any survived.

    .venv/bin/python scripts/mutation_check.py > bench/results/mutation_check.md

The scratch copy lives in a temporary folder and is removed at the end; the working tree is never edited.
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TESTS = {
    "pancls/heads.py": ["tests/test_heads.py", "tests/eval/test_diagnostics.py"],
    "pancls/losses.py": ["tests/test_losses.py"],
    "pancls/eval/metrics.py": ["tests/eval/test_metrics.py"],
    "pancls/eval/clinical.py": ["tests/eval/test_clinical.py"],
}

# (file, exact text, replacement, what the bug is)
MUTATIONS = [
    ("pancls/heads.py", "2.0 * self.scale / (1.0 + self.kappa * (1.0 - cos))",
     "2.0 * self.scale / (1.0 - self.kappa * (1.0 - cos))", "tSP kernel: sign of kappa flipped"),
    ("pancls/heads.py", "return -self.nu * torch.log(self.gamma + 0.5 * (1.0 - cos))",
     "return self.nu * torch.log(self.gamma + 0.5 * (1.0 - cos))", "tSP paper form (eq. 12): logit sign flipped"),
    ("pancls/heads.py", "torch.log(self.gamma + 0.5 * (1.0 - cos))", "torch.log(self.gamma + 0.5 * (1.0 + cos))",
     "tSP paper form: (1 - cos)/2 read as (1 + cos)/2"),
    ("pancls/heads.py", "x = F.normalize(self.proj(features), dim=1)", "x = self.proj(features)",
     "tSP: feature L2 normalisation dropped"),
    ("pancls/heads.py", "cos = F.linear(F.normalize(x, dim=1), F.normalize(self.weight, dim=1))",
     "cos = F.linear(x, F.normalize(self.weight, dim=1))", "cosine head: feature normalisation dropped"),
    ("pancls/heads.py", '"""``s = 1 + softplus(rho)`` of the kernel form."""\n        return 1.0 + F.softplus(self.rho)',
     '"""``s = 1 + softplus(rho)`` of the kernel form."""\n        return F.softplus(self.rho)',
     "tSP kernel: scale s = softplus(rho) (the +1 dropped)"),
    ("pancls/losses.py", "shifted = logits - F.one_hot(", "shifted = logits + F.one_hot(",
     "LDAM: margin added instead of subtracted"),
    ("pancls/losses.py", "self.class_counts.double() ** -0.25", "self.class_counts.double() ** -0.5",
     "LDAM: n^-1/2 instead of n^-1/4"),
    ("pancls/losses.py", "(self.tau * prior.log()).float()", "(-self.tau * prior.log()).float()",
     "logit adjustment: sign of tau log(pi) flipped"),
    ("pancls/losses.py", "elif epoch >= self.drw_epoch:", "elif epoch > self.drw_epoch:",
     "DRW: switches on one epoch late"),
    ("pancls/losses.py", "return -(one_minus_p ** gamma) * log_p", "return -(one_minus_p ** (gamma + 1)) * log_p",
     "focal: exponent gamma + 1"),
    ("pancls/losses.py", "-torch.expm1(counts * math.log(beta))", "-torch.expm1((counts + 1) * math.log(beta))",
     "class-balanced: effective number of n + 1 samples"),
    ("pancls/eval/metrics.py", '"many": np.flatnonzero(counts > MANY_SHOT_MIN)',
     '"many": np.flatnonzero(counts >= MANY_SHOT_MIN)', "shot groups: a class of exactly 100 images called many-shot"),
    ("pancls/eval/metrics.py", "np.diag(cm) / support", "np.diag(cm) / cm.sum(axis=0)",
     "per-class accuracy: precision instead of recall"),
    ("pancls/eval/metrics.py", "labels=np.arange(num_classes)", "labels=np.arange(1, num_classes + 1)",
     "per-class accuracy: classes off by one"),
    ("pancls/eval/clinical.py", "half = z / denom * np.sqrt(p * (1 - p) / n + z2 / (4 * n * n))",
     "half = z / denom * np.sqrt(p * (1 - p) / n + z2 / (2 * n * n))", "Wilson interval: z^2/(2n^2) for z^2/(4n^2)"),
    ("pancls/eval/clinical.py", "bacc = recall.sum(axis=-1) / present.sum(axis=-1)",
     "bacc = recall.sum(axis=-1) / recall.shape[-1]", "balanced accuracy: absent classes counted as recall 0"),
    ("pancls/eval/clinical.py", "f1 = np.where(used, 2 * tp / np.where(used, t + pr, 1), 0.0)",
     "f1 = np.where(used, tp / np.where(used, t + pr, 1), 0.0)", "macro-F1: the factor 2 dropped"),
    ("pancls/eval/clinical.py", "cov_ytyp = c * n - (t * pr).sum(axis=-1)", "cov_ytyp = c * n + (t * pr).sum(axis=-1)",
     "MCC: sign in the covariance flipped"),
]


def _copy_tree(dst: Path) -> None:
    ignore = shutil.ignore_patterns(".venv", ".git", "runs", "carry", "__pycache__", ".pytest_cache", "*.pt")
    for name in ("pancls", "tests", "configs", "scripts", "pyproject.toml"):
        src = ROOT / name
        (shutil.copytree(src, dst / name, ignore=ignore) if src.is_dir() else shutil.copy2(src, dst / name))


def _pytest(cwd: Path, tests) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(cwd), "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                          cwd=cwd, env=env, capture_output=True, text=True)


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="pancls-mutation-") as tmp:
        work = Path(tmp)
        _copy_tree(work)
        probe = subprocess.run([sys.executable, "-c", "import pancls; print(pancls.__file__)"], cwd=work,
                               env={**os.environ, "PYTHONPATH": str(work)}, capture_output=True, text=True)
        if not probe.stdout.strip().startswith(str(work)):
            print(f"the scratch copy is not the one imported ({probe.stdout.strip()}): cannot check", file=sys.stderr)
            return 2
        for tests in TESTS.values():  # the unmutated tree must pass, or a 'kill' means nothing
            if _pytest(work, tests).returncode != 0:
                print(f"{tests} fail on the unmutated tree: fix them first", file=sys.stderr)
                return 2
        rows, survived = [], 0
        for path, old, new, what in MUTATIONS:
            target = work / path
            original = target.read_text()
            if original.count(old) != 1:
                print(f"{path}: the text to mutate is not found exactly once: {old!r}", file=sys.stderr)
                return 2
            target.write_text(original.replace(old, new))
            start = time.perf_counter()
            proc = _pytest(work, TESTS[path])
            target.write_text(original)
            failed = [line.split(" ")[1] for line in proc.stdout.splitlines() if line.startswith("FAILED ")]
            killed = proc.returncode != 0
            survived += not killed
            rows.append((path, what, "killed" if killed else "**SURVIVED**",
                         failed[0] if failed else "", f"{time.perf_counter() - start:.0f} s"))
            print(f"{what}: {'killed' if killed else 'SURVIVED'}", file=sys.stderr, flush=True)
    print(f"Mutation check ({len(MUTATIONS)} mutations, {len(MUTATIONS) - survived} killed, {survived} survived); "
          f"`python scripts/mutation_check.py`\n")
    print("| file | mutation | result | first failing test | time |\n|---|---|---|---|---|")
    for row in rows:
        print("| " + " | ".join(f"`{row[0]}`" if i == 0 else (f"`{c}`" if i == 3 and c else c)
                                for i, c in enumerate(row)) + " |")
    return 1 if survived else 0


if __name__ == "__main__":
    sys.exit(main())
