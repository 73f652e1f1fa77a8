"""`mae ablate STUDY...`: run studies (see `ablate_study` for their files) and write their reports.

Every (variant, seed) of a study becomes jobs, a pretraining and one job per evaluation, each in a
folder named by a hash of its resolved config: variants and studies that coincide share a job when
they run into the same `--out` folder, and a job whose result is on disk is never run again. See
`ablate_run` (running the jobs, resuming them) and `ablate_report` (tables, plots, the paper's
findings).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import re
from dataclasses import dataclass, field
from pathlib import Path

from openmae.config import ConfigError, config_from_dict, config_to_dict, merge_updates
from openmae.errors import UsageError
from openmae.models import model_config
from openmae.recipes.ablate_study import CONFIGS, Study, Variant, load_study
from openmae.recipes.pretrain import model_overrides

# Fields that say where a run writes (or resumes), not what it computes: left out of a job's hash.
PLACE_FIELDS = ("output_dir", "resume", "output", "checkpoint")


@dataclass
class Job:
    """A pretraining or an evaluation, run once into `folder` whichever variants share it."""

    key: str
    kind: str
    config: dict  # the resolved config as a plain nested dict, output paths set
    folder: Path
    needs: str | None = None  # key of the pretraining this evaluation starts from
    used_by: list[str] = field(default_factory=list)  # "study / variant / seed N[ / evaluation]"

    @property
    def result_path(self) -> Path:
        return self.folder / "result.json"

    @property
    def done(self) -> bool:
        return self.result_path.exists()

    def result(self) -> dict | None:
        return json.loads(self.result_path.read_text()) if self.done else None

    def to_dict(self) -> dict:
        return {
            "key": self.key,
            "kind": self.kind,
            "config": self.config,
            "folder": str(self.folder),
            "needs": self.needs,
            "used_by": self.used_by,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Job:
        return cls(**{**data, "folder": Path(data["folder"])})


@dataclass
class Run:
    """One (variant, seed) of a study and the keys of its jobs."""

    study: str
    variant: Variant
    seed: int
    pretrain: str | None  # job key
    evals: dict[str, str]  # eval name -> job key


# ------------------------------------------------------------------------------------------------
# From studies to jobs


def plan(studies: list[Study], out: Path, only: list[str] | None = None) -> tuple[dict[str, Job], list[Run]]:
    """The jobs of every (variant, seed) of `studies` (shared where they coincide) and the runs.

    `only` keeps the variants whose name matches one of its entries (shell-style patterns).
    Every config is resolved here, so a bad key fails before anything runs.
    """
    jobs: dict[str, Job] = {}
    runs: list[Run] = []
    for study in studies:
        for variant in study.variants:
            if only and not any(_matches(variant.name, pattern) for pattern in only):
                continue
            for seed in variant.seeds:
                label = f"{study.name} / {variant.name} / seed {seed}"
                pretrain_key = None
                if variant.pretrain is not None:
                    pretrain_key = _add(jobs, _job("pretrain", variant.pretrain, seed, out, label), label)
                keys = {}
                for ev in variant.evals:
                    needs = pretrain_key if ev.needs_pretraining else None
                    job = _job(ev.kind, ev.updates, seed, out, label, needs, jobs)
                    keys[ev.name] = _add(jobs, job, f"{label} / {ev.name}")
                runs.append(Run(study.name, variant, seed, pretrain_key, keys))
    return jobs, runs


def _matches(name: str, pattern: str) -> bool:
    from fnmatch import fnmatchcase

    return name == pattern or fnmatchcase(name, pattern)


def _add(jobs: dict[str, Job], job: Job, label: str) -> str:
    jobs.setdefault(job.key, job).used_by.append(label)
    return job.key


def _job(
    kind: str,
    updates: dict,
    seed: int,
    out: Path,
    label: str,
    needs: str | None = None,
    jobs: dict[str, Job] | None = None,
) -> Job:
    """The job of a config: its hash decides its folder; output paths and the checkpoint are set."""
    cls = CONFIGS[kind]
    try:
        cfg = config_from_dict(cls, merge_updates(updates, {"seed": seed}))
    except ConfigError as error:
        raise UsageError(f"{label}: {kind}: {error}") from error
    config = config_to_dict(cfg)
    identity = {k: v for k, v in config.items() if k not in PLACE_FIELDS or (k == "checkpoint" and not needs)}
    if kind == "pretrain":  # the model as built: `decoder_depth: 2` and the model's own 2 are one job
        try:
            model = dataclasses.asdict(model_config(cfg.model, **model_overrides(cfg)))
        except ValueError as error:
            raise UsageError(f"{label}: pretrain: {error}") from error
        identity = {k: v for k, v in identity.items() if k not in model} | {"model": model}
    digest = hashlib.sha1(json.dumps([kind, needs, identity], sort_keys=True).encode()).hexdigest()[:12]
    folder = out / "runs" / f"{kind}-{digest}"
    places = {"output_dir": str(folder), "resume": "auto", "output": str(folder / "metrics.json")}
    config |= {k: v for k, v in places.items() if k in config}
    if needs is not None:
        config["checkpoint"] = str(jobs[needs].folder / "model.safetensors")
    return Job(digest, kind, config, folder, needs)


def ablate(
    studies: list[str | Path],
    out: str | Path = "runs/ablations",
    parallel: int = 1,
    threads: int | None = None,
    only: list[str] | None = None,
    overrides: list[str] = (),
    seeds: list[int] | None = None,
    dry_run: bool = False,
    log=print,
) -> int:
    """Run studies into `out` (jobs they share run once) and write each one's report.

    Returns 0 when every job of the selected variants is done, 1 when some failed, `STOPPED` (3)
    when a signal stopped the run (the same call continues it).
    """
    from openmae.recipes.ablate_report import write_report
    from openmae.recipes.ablate_run import STOPPED, run_jobs

    if parallel < 1:
        raise UsageError(f"--parallel must be at least 1, got {parallel}")
    out = Path(out)
    loaded = [load_study(s, list(overrides), seeds) for s in studies]
    jobs, runs = plan(loaded, out, only)
    if only and not runs:
        raise UsageError(f"no variant matches --only {' '.join(only)}")
    if dry_run:
        for job in jobs.values():
            log(f"{'done' if job.done else 'todo'}  {job.kind:9s} {job.folder}  <- {'; '.join(job.used_by)}")
        return 0
    with _exclusive(out):
        outcome = run_jobs(jobs, parallel, threads, log)
    every_job, every_run = plan(loaded, out) if only else (jobs, runs)  # reports show all that is done
    for study in loaded:
        summary = write_report(study, every_run, every_job, out)
        state = "complete" if summary["complete"] else "incomplete"
        log(f"{study.name}: {state}; {out / study.name / 'summary.md'}")
    for key, reason in outcome.failed.items():
        log(f"failed: {jobs[key].kind} {jobs[key].folder}: {reason}")
    if outcome.stopped:
        log("stopped: run the same command again to continue (finished jobs are kept, stopped ones resume)")
        return STOPPED
    return 0 if outcome.ok else 1


@contextlib.contextmanager
def _exclusive(out: Path):
    """Hold `out/.lock` while jobs run: two schedulers on one folder would run the same jobs twice."""
    import fcntl  # POSIX

    out.mkdir(parents=True, exist_ok=True)
    with open(out / ".lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as error:
            raise UsageError(
                f"another `mae ablate` is running into {out}; wait for it or use another --out"
            ) from error
        yield


def slug(name: str) -> str:
    """A file name for a variant name: `mask_ratio=0.25, seed` -> `mask_ratio-0.25-seed`."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "variant"


__all__ = ["Job", "Run", "ablate", "plan", "slug"]
