"""Fold-parallel cross-validation: the folds of one ``pancls cv`` run train at the same time, one process each.

    pancls cv --folds 4 --jobs 2          CPU: two folds at a time, each with cores // 2 threads
    pancls cv --folds 4 --gpus 0,1,2,3    one process per GPU (the process sees only its GPU)

The parent (:func:`run_parallel`)

1. calls :func:`pancls.cv.prepare` once: the refusals, ``splits.json``, ``configs/config.yaml``,
   ``classes.json`` and ``configs/metadata.json`` are written before any worker starts, so no two processes
   ever write the same file;
2. starts one worker per unfinished fold, at most ``jobs`` (or one per listed GPU) at a time. A worker is a
   fresh interpreter,
   ``python -m pancls cv --config RUN/configs/config.yaml --out RUN --fold k --resume --no-summary``:
   it reads the run's own resolved config (hence passes the resume check by construction) and writes only
   ``RUN/fold_k/`` (``fold.json`` last, as a sequential run does). Its stdout and stderr go to
   ``RUN/logs/fold_k.log``. CPU workers get ``OMP_NUM_THREADS = max(1, cores // jobs)`` (torch takes its
   intra-op thread count from it) so that the workers together do not oversubscribe the cores; GPU workers get
   ``CUDA_VISIBLE_DEVICES=<their GPU>`` (the process's ``cuda:0``);
3. prints one line as each fold finishes (elapsed time and the run's ETA);
4. when every fold succeeded, merges with :func:`pancls.cv.summarise`: the same ``oof_predictions.csv``,
   ``summary.json``, report and model card as the sequential run. A fold that fails does not stop the others;
   after they finish the parent raises one :class:`~pancls.errors.UserError` naming each failed fold, its exit
   status and the last line of its log, and writes no summary (``--resume`` retrains only the failed folds).

Subprocesses rather than ``multiprocessing``: a worker that dies (a segfault, the OOM killer, a CUDA error)
cannot take the parent or its siblings with it, its error line is the CLI's own one line, and nothing of the
parent's state (threads, CUDA context, open files) is inherited.

Because each fold's seed is ``train.seed + 1000 * k`` and a worker runs exactly the code of ``--fold k``, the
merged result is the sequential one, number for number, when the per-process thread counts are the same (a
different thread count may change the order of float sums in the convolutions).
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from pancls.errors import UserError

LOG_DIR = "logs"


def available_cores() -> int:
    """The cores this process may run on (its affinity mask, e.g. a Slurm allocation), else ``os.cpu_count()``."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - macOS / Windows
        return os.cpu_count() or 1


def parse_gpus(text: str, flag: str = "--gpus") -> List[int]:
    """``"0,1,2,3"`` -> ``[0, 1, 2, 3]``; refused (one line naming ``flag``) when malformed, repeated, not
    visible, or when no CUDA device is available at all."""
    try:
        gpus = [int(part) for part in text.split(",") if part.strip() != ""]
    except ValueError:
        raise UserError(f"expected GPU indices separated by commas (e.g. 0,1,2,3), got {text!r}", flag) from None
    if not gpus:
        raise UserError("no GPU index given (e.g. --gpus 0,1)", flag)
    if len(set(gpus)) != len(gpus):
        raise UserError(f"a GPU is listed twice in {text!r}; one process per GPU", flag)
    import torch

    if not torch.cuda.is_available():
        raise UserError("no CUDA device is available to this torch build; on CPU use --jobs N", flag)
    count = torch.cuda.device_count()
    bad = [g for g in gpus if not 0 <= g < count]
    if bad:
        raise UserError(f"GPU {bad[0]} is not visible: {count} CUDA device(s), indices 0..{count - 1}", flag)
    return gpus


@dataclass
class FoldOutcome:
    """How one fold's worker ended: exit status, seconds, and its log's last line (the error, on failure)."""

    fold: int
    returncode: int
    seconds: float
    last_line: str = ""
    log: Optional[Path] = None

    @property
    def ok(self) -> bool:
        return self.returncode == 0


@dataclass
class _Slot:
    """One concurrency slot: a GPU index, or None for a CPU slot."""

    gpu: Optional[int] = None
    proc: Optional[subprocess.Popen] = None
    fold: int = -1
    started: float = 0.0
    log_file: Optional[object] = None
    log_path: Optional[Path] = None


@dataclass
class Plan:
    """What :func:`plan` decided: folds to train, slots (GPUs or CPU), threads per worker, and notes to print."""

    todo: List[int]
    kept: List[int]
    gpus: List[Optional[int]]
    threads: int
    notes: List[str] = field(default_factory=list)


def check_slots(jobs: Optional[int], gpus: Optional[Sequence[int]]) -> None:
    """Exactly one of ``jobs`` (at least 1) and ``gpus``, named by their flags."""
    if (jobs is None) == (gpus is None):
        raise UserError("give exactly one of --jobs N (CPU) or --gpus LIST", "--jobs")
    if jobs is not None and jobs < 1:
        raise UserError(f"must be at least 1 (folds training at once), got {jobs}", "--jobs")


def plan(folds: int, done: Sequence[int], *, jobs: Optional[int] = None, gpus: Optional[Sequence[int]] = None,
         cores: Optional[int] = None) -> Plan:
    """Decide the concurrency: ``jobs`` CPU slots or one slot per GPU, clipped to the folds still to train.

    ``jobs`` < 1 is refused (``--jobs``); more jobs (or GPUs) than folds to train are clipped, with a note.
    Threads per worker: ``max(1, cores // slots)``."""
    check_slots(jobs, gpus)
    cores = cores or available_cores()
    todo = [k for k in range(folds) if k not in set(done)]
    kept = [k for k in range(folds) if k in set(done)]
    notes = []
    if jobs is not None:
        want, flag, slots = jobs, "--jobs", [None] * jobs
    else:
        want, flag, slots = len(gpus), "--gpus", list(gpus)
    n = max(1, min(want, len(todo)))
    if want > n and todo:
        notes.append(f"{flag} {want} but {len(todo)} fold(s) to train: {n} process(es) at a time")
    slots = slots[:n]
    threads = max(1, cores // n)
    return Plan(todo, kept, slots, threads, notes)


def worker_command(out: Path, fold: int) -> List[str]:
    """The command line of fold ``fold``'s worker: ``pancls cv --fold k --resume --no-summary`` on the run's own
    config (the merge is the parent's)."""
    from pancls.cv import run_config_path

    return [sys.executable, "-m", "pancls", "cv", "--config", str(run_config_path(out)),
            "--out", str(out), "--fold", str(fold), "--resume", "--no-summary"]


def worker_env(threads: int, gpu: Optional[int], base: Optional[Dict[str, str]] = None) -> Dict[str, str]:
    """The worker's environment: ``OMP_NUM_THREADS``/``MKL_NUM_THREADS`` = ``threads``; with a ``gpu``,
    ``CUDA_VISIBLE_DEVICES`` = that GPU only. Variables a launcher set for a process group (torchrun's
    ``RANK``, ``WORLD_SIZE``, ...) are removed: each worker is a single-process run."""
    from pancls.distributed import TORCHRUN_VARS

    env = dict(os.environ if base is None else base)
    for var in (*TORCHRUN_VARS, "LOCAL_WORLD_SIZE", "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID"):
        env.pop(var, None)
    env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = str(gpu)
    return env


def die_with_parent(parent: int) -> Optional[Callable[[], None]]:
    """A worker's ``preexec_fn`` (Linux): the kernel sends the worker SIGTERM when the parent dies, however it
    dies (SIGKILL, a lost session). Without it a killed ``pancls cv --jobs`` left its workers training, and a
    ``--resume`` raced them. ``None`` elsewhere (no ``prctl``)."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes
    import signal

    prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the forked child only calls it

    def arm() -> None:
        prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
        if os.getppid() != parent:  # the parent died before prctl ran
            os.kill(os.getpid(), signal.SIGTERM)
    return arm


def last_line(path: Path) -> str:
    """The last non-empty line of a worker's log (the CLI's one-line error, or a traceback's final line)."""
    try:
        lines = [line.strip() for line in path.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return ""
    return lines[-1] if lines else ""


def train_folds(out: Path, p: Plan, log: Callable[[str], None] = print, poll: float = 0.2,
                command: Callable[[Path, int], List[str]] = worker_command) -> List[FoldOutcome]:
    """Run the workers of ``p.todo``, at most ``len(p.gpus)`` at a time; one log line as each fold ends.

    Returns every fold's :class:`FoldOutcome` (in fold order). A failed fold does not stop the others. On an
    interrupt (Ctrl-C) or any error in the parent the running workers are terminated (their folds keep the
    last checkpoint; ``--resume`` continues them)."""
    out = Path(out)
    (out / LOG_DIR).mkdir(parents=True, exist_ok=True)
    queue = list(p.todo)
    slots = [_Slot(gpu=g) for g in p.gpus]
    outcomes: Dict[int, FoldOutcome] = {}
    t0 = time.perf_counter()
    try:
        while queue or any(s.proc for s in slots):
            for s in slots:
                if s.proc is None and queue:
                    k = queue.pop(0)
                    s.fold, s.started, s.log_path = k, time.perf_counter(), out / LOG_DIR / f"fold_{k}.log"
                    s.log_file = open(s.log_path, "w")  # noqa: SIM115 - closed when the worker ends
                    s.proc = subprocess.Popen(command(out, k), stdout=s.log_file, stderr=subprocess.STDOUT,
                                              stdin=subprocess.DEVNULL, env=worker_env(p.threads, s.gpu),
                                              preexec_fn=die_with_parent(os.getpid()))
                    where = f"GPU {s.gpu}" if s.gpu is not None else f"{p.threads} thread(s)"
                    log(f"fold {k + 1}/{len(p.todo) + len(p.kept)}: started ({where}, log {s.log_path})")
            time.sleep(poll)
            for s in slots:
                if s.proc is None or s.proc.poll() is None:
                    continue
                now = time.perf_counter()
                s.log_file.close()
                o = FoldOutcome(s.fold, s.proc.returncode, now - s.started, log=s.log_path)
                if not o.ok:
                    o.last_line = last_line(s.log_path) or f"exit status {o.returncode}"
                outcomes[s.fold] = o
                s.proc = None
                n_done, elapsed = len(outcomes), now - t0
                eta = elapsed / n_done * (len(p.todo) - n_done)
                status = "done" if o.ok else f"FAILED (exit {o.returncode}): {o.last_line}"
                log(f"fold {s.fold + 1}/{len(p.todo) + len(p.kept)} {status} in {_hms(o.seconds)}; "
                    f"{n_done}/{len(p.todo)} folds, elapsed {_hms(elapsed)}, ETA {_hms(eta)}")
    finally:
        for s in slots:
            if s.proc is not None and s.proc.poll() is None:
                s.proc.terminate()
                try:
                    s.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    s.proc.kill()
                    s.proc.wait()
            if s.log_file is not None and not s.log_file.closed:
                s.log_file.close()
    return [outcomes[k] for k in sorted(outcomes)]


def _hms(seconds: float) -> str:
    from pancls.cv import _hms as hms

    return hms(seconds)


def failure_message(failed: Sequence[FoldOutcome]) -> str:
    """One line naming each failed fold (0-based, as ``--fold`` takes it), its exit status and last log line."""
    parts = [f"fold {o.fold} failed (exit {o.returncode}): {o.last_line} [log {o.log}]" for o in failed]
    return ("; ".join(parts) + "; the other folds are kept: fix the cause and rerun with --resume "
            "(only unfinished folds train); no summary written")


def run_parallel(cfg, out: Path, *, resume: bool = False, jobs: Optional[int] = None,
                 gpus: Optional[Sequence[int]] = None, log: Callable[[str], None] = print,
                 command: Callable[[Path, int], List[str]] = worker_command) -> Dict:
    """Train the folds of ``cfg`` in parallel worker processes, then merge exactly as :func:`pancls.cv.run`.

    ``jobs``: CPU worker count; ``gpus``: GPU indices, one worker each (exactly one of the two). Returns the
    summary (:func:`pancls.cv.summarise`). Raises :class:`UserError` (one line) when a fold fails, after the
    other folds have finished; the summary is then not written. Must not itself run under torchrun."""
    from pancls import cv
    from pancls.distributed import launched_by_torchrun

    check_slots(jobs, gpus)  # before prepare: a refusal writes nothing
    if launched_by_torchrun():
        raise UserError("fold-parallel workers cannot start under torchrun; use either torchrun (DDP within a "
                        "fold) or --jobs/--gpus (folds side by side)", "--jobs" if jobs is not None else "--gpus")
    if gpus is not None and cfg.device == "cpu":
        raise UserError("the run's device is 'cpu' (--device cpu, or the recipe's device: the CPU demo recipe "
                        "that runs without --manifest has it); add --device cuda, or train on the CPU with --jobs N",
                        "--gpus")
    out = Path(out)
    with contextlib.ExitStack() as held:
        cv.lock_run(held, out, made=False)  # the parent's for the whole run; each worker holds its fold's lock
        records, _, _ = cv.prepare(cfg, out, resume=resume, log=log)  # splits/configs once, before any worker
        cv.lock_run(held, out, made=True)
        done = [k for k in range(cfg.cv.folds) if (out / f"fold_{k}" / cv.FOLD_DONE).exists()]
        p = plan(cfg.cv.folds, done, jobs=jobs, gpus=gpus)
        for note in p.notes:
            log(note)
        for k in p.kept:
            log(f"fold {k}: finished earlier, kept")
        outcomes = train_folds(out, p, log=log, command=command)
        failed = [o for o in outcomes if not o.ok]
        if failed:
            raise UserError(failure_message(failed), out)
        return cv.summarise(out, cfg=cfg, records=records, log=log)
