"""Running a study's jobs: one after another in this process, or N at once, one process each.

A job is done when its `result.json` exists; it is written last, so a job stopped at any point
is run again, and then resumes from the newest checkpoint in its folder (`resume=auto`): a
pretraining or a classifier training continues where it stopped, a k-NN or pixel baseline (minutes
at most) starts over. SIGTERM (or Ctrl-C with `--parallel` > 1) stops every running job at its
next step with a checkpoint; the same command continues.

`python -m openmae.recipes.ablate_run JOB.json` runs one job (what `--parallel` starts).
"""

from __future__ import annotations

import json
import os
import signal
import statistics
import subprocess
import sys
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from openmae.config import config_from_dict
from openmae.recipes.ablate import Job
from openmae.recipes.ablate_study import CONFIGS

STOPPED = 3  # exit code of a job process that was stopped and left a checkpoint


class JobStopped(RuntimeError):
    """The job's training was stopped by a signal before its end (its checkpoint is on disk)."""


# ------------------------------------------------------------------------------------------------
# One job


def run_job(job: Job) -> dict:
    """Run `job` in this process and write its `result.json`; raises JobStopped when interrupted.

    The wall time of every attempt is kept in `attempts.json`, so a resumed job reports the sum.
    """
    job.folder.mkdir(parents=True, exist_ok=True)
    (job.folder / "job.json").write_text(json.dumps(job.to_dict(), indent=2))
    started, completed = time.perf_counter(), False
    try:
        result, completed = RUNNERS[job.kind](config_from_dict(CONFIGS[job.kind], job.config))
    finally:
        attempts = _record_attempt(job.folder, time.perf_counter() - started, completed)
    if not completed:
        raise JobStopped(f"{job.kind} stopped before its end; its checkpoint is in {job.folder}")
    result |= {"kind": job.kind, "seconds": sum(a["seconds"] for a in attempts), "attempts": len(attempts)}
    temporary = job.result_path.with_suffix(".tmp")
    temporary.write_text(json.dumps(result, indent=2))
    temporary.replace(job.result_path)  # atomic: a result is there whole or not at all
    return result


def _record_attempt(folder: Path, seconds: float, completed: bool) -> list[dict]:
    path = folder / "attempts.json"
    attempts = json.loads(path.read_text()) if path.exists() else []
    attempts.append({"seconds": round(seconds, 2), "completed": completed, "ended": time.strftime("%F %T")})
    path.write_text(json.dumps(attempts, indent=2))
    return attempts


def reached_end(progress, cfg) -> bool:
    """Whether a training ran to its configured end (epochs, time budget or max_steps), not a stop."""
    if cfg.max_steps is not None and progress.step >= cfg.max_steps:
        return True
    if progress.planned_images:
        return progress.images_seen >= progress.planned_images
    return progress.epoch >= cfg.epochs


def _pretrain(cfg) -> tuple[dict, bool]:
    from openmae.recipes.pretrain import pretrain

    out = pretrain(cfg)
    records = _metrics(Path(cfg.output_dir))
    rates = [r["images_per_s"] for r in records if "images_per_s" in r]
    losses = [r["train_loss"] for r in records if "train_loss" in r]
    result = {
        "weights": str(out.weights),
        "steps": out.progress.step,
        "images_seen": out.progress.images_seen,
        "images_per_s": statistics.median(rates) if rates else None,  # training steps alone
        "train_loss": losses[-1] if losses else None,
        "heldout": out.eval_metrics,
    }
    return result, reached_end(out.progress, cfg)


def _classify(train):
    def run(cfg) -> tuple[dict, bool]:
        out = train(cfg)
        result = {"top1": out.metrics["top1"], "top5": out.metrics.get("top5"), "best_top1": out.best["top1"]}
        return result | {"steps": out.progress.step}, reached_end(out.progress, cfg)

    return run


def _knn(cfg) -> tuple[dict, bool]:
    from openmae.recipes.knn import knn

    metrics = knn(cfg)
    return {"top1": metrics["knn_top1"], "top5": metrics["knn_top5"], **metrics}, True


def _logreg(cfg) -> tuple[dict, bool]:
    from openmae.recipes.logreg import logreg

    return logreg(cfg), True


def _linprobe(cfg):
    from openmae.recipes.linprobe import linprobe

    return _classify(linprobe)(cfg)


def _finetune(cfg):
    from openmae.recipes.finetune import finetune

    return _classify(finetune)(cfg)


RUNNERS = {
    "pretrain": _pretrain,
    "linprobe": _linprobe,
    "finetune": _finetune,
    "knn": _knn,
    "logreg": _logreg,
}


def _metrics(folder: Path) -> list[dict]:
    path = folder / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


# ------------------------------------------------------------------------------------------------
# Many jobs


@dataclass
class Outcome:
    done: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # key -> one-line reason
    stopped: bool = False

    @property
    def ok(self) -> bool:
        return not self.failed and not self.stopped


def run_jobs(jobs: dict[str, Job], parallel: int = 1, threads: int | None = None, log=print) -> Outcome:
    """Run every job not done yet, pretrainings before the evaluations that start from them.

    `parallel` 1 runs them here, in order; N > 1 keeps N job processes going, each with `threads`
    torch threads (default: the cores split between them). A failed job is reported and its
    evaluations skipped; the others go on.
    """
    pending = [job for job in _ordered(jobs.values()) if not job.done]
    outcome = Outcome()
    if not pending:
        return outcome
    log(f"{len(pending)} of {len(jobs)} jobs to run ({len(jobs) - len(pending)} done before)")
    if parallel <= 1:
        _run_here(pending, jobs, outcome, log)
    else:
        _run_processes(
            pending, jobs, outcome, parallel, threads or max(1, (os.cpu_count() or 1) // parallel), log
        )
    return outcome


def _ordered(jobs) -> list[Job]:
    """Pretrainings first (they unlock the most work), each kind in planning order."""
    jobs = list(jobs)
    return [j for j in jobs if j.kind == "pretrain"] + [j for j in jobs if j.kind != "pretrain"]


def _blocked(job: Job, jobs: dict[str, Job], outcome: Outcome) -> str | None:
    """Why `job` cannot run (its pretraining failed), or None."""
    if job.needs and job.needs in outcome.failed:
        return f"its pretraining {jobs[job.needs].folder.name} failed"
    return None


def _ready(job: Job, jobs: dict[str, Job]) -> bool:
    return job.needs is None or jobs[job.needs].done


def _describe(job: Job) -> str:
    users = job.used_by[0] + (f" (+{len(job.used_by) - 1} more)" if len(job.used_by) > 1 else "")
    return f"{job.kind} for {users} -> {job.folder}"


def _summary(result: dict) -> str:
    score = f", top-1 {result['top1']:.2f}%" if result.get("top1") is not None else ""
    return f"in {result['seconds'] / 60:.1f} min{score}"


def _run_here(pending: list[Job], jobs: dict[str, Job], outcome: Outcome, log) -> None:
    for number, job in enumerate(pending, 1):
        reason = _blocked(job, jobs, outcome)
        if reason:
            outcome.failed[job.key] = f"skipped: {reason}"
            continue
        log(f"[{time.strftime('%H:%M:%S')}] ({number}/{len(pending)}) {_describe(job)}")
        try:
            result = run_job(job)
        except JobStopped as error:
            log(f"stopped: {error}")
            outcome.stopped = True
            return
        except Exception as error:  # one broken variant should not lose the others' results
            (job.folder / "error.txt").write_text(traceback.format_exc())
            outcome.failed[job.key] = f"{type(error).__name__}: {error}".splitlines()[0]
            log(f"failed: {outcome.failed[job.key]} (traceback in {job.folder / 'error.txt'})")
            continue
        outcome.done.append(job.key)
        log(f"    done {_summary(result)}")


def _run_processes(
    pending: list[Job], jobs: dict[str, Job], outcome: Outcome, parallel: int, threads: int, log
) -> None:
    env = os.environ | {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    running: dict[str, subprocess.Popen] = {}
    stopping = []

    def stop(signum, frame):  # forward as SIGTERM: each job checkpoints at its next step
        stopping.append(signum)
        for process in running.values():
            process.send_signal(signal.SIGTERM)

    previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGTERM, signal.SIGINT)}
    log(f"{parallel} jobs at a time, {threads} thread(s) each; logs in each job's log.txt")
    try:
        while pending or running:
            for job in list(pending):
                if stopping or len(running) >= parallel:
                    break
                reason = _blocked(job, jobs, outcome)
                if reason:
                    outcome.failed[job.key] = f"skipped: {reason}"
                    pending.remove(job)
                elif _ready(job, jobs):
                    pending.remove(job)
                    running[job.key] = _start(job, env, threads)
                    log(f"[{time.strftime('%H:%M:%S')}] start {_describe(job)}")
            if not running:
                break  # nothing can start: stopping, or only jobs whose pretraining failed
            time.sleep(0.2)
            for key, process in list(running.items()):
                if process.poll() is None:
                    continue
                del running[key]
                _finished(jobs[key], process.returncode, outcome, log, stopping=bool(stopping))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    outcome.stopped = outcome.stopped or bool(stopping)
    for job in pending:
        if job.key not in outcome.failed and not outcome.stopped:
            outcome.failed[job.key] = f"skipped: {_blocked(job, jobs, outcome) or 'not started'}"


def _start(job: Job, env: dict, threads: int) -> subprocess.Popen:
    job.folder.mkdir(parents=True, exist_ok=True)
    spec = job.folder / "job.json"
    spec.write_text(json.dumps(job.to_dict(), indent=2))
    log_file = open(job.folder / "log.txt", "a")  # noqa: SIM115 - the child owns it from here
    command = [sys.executable, "-m", "openmae.recipes.ablate_run", str(spec), "--threads", str(threads)]
    # A session of its own: Ctrl-C reaches the scheduler alone, which stops the jobs gracefully.
    process = subprocess.Popen(
        command, env=env, stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True
    )
    log_file.close()
    return process


def _finished(job: Job, code: int, outcome: Outcome, log, stopping: bool) -> None:
    stamp = time.strftime("%H:%M:%S")
    if code == 0 and job.done:
        outcome.done.append(job.key)
        log(f"[{stamp}] done {job.kind} {job.folder.name} {_summary(job.result())}")
    elif code == STOPPED or (stopping and code != 0):  # a signal we sent, maybe before training began
        outcome.stopped = True
        log(f"[{stamp}] stopped {job.kind} {job.folder.name} (checkpoint kept)")
    else:
        outcome.failed[job.key] = f"exit code {code}, see {job.folder / 'log.txt'}"
        log(f"[{stamp}] failed {job.kind} {job.folder.name}: {outcome.failed[job.key]}")


def main(argv: list[str] | None = None) -> int:
    """Run the job described by a `job.json` (what the scheduler starts in each process)."""
    import argparse

    import torch

    parser = argparse.ArgumentParser(description="run one job of an ablation study")
    parser.add_argument("job", help="the job's job.json")
    parser.add_argument("--threads", type=int, default=None, help="torch threads")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    job = Job.from_dict(json.loads(Path(args.job).read_text()))
    try:
        run_job(job)
    except JobStopped as error:
        print(error, flush=True)
        return STOPPED
    return 0


if __name__ == "__main__":
    sys.exit(main())
