"""`mae ablate STUDY.yaml`: the paper's ablations (Table 1, Figures 5, 6, 9), rerun on your own data.

A study file names a base pretraining (the keys of `mae pretrain`), a sweep of variants, the seeds,
and the evaluations every pretraining gets:

    name: mask_ratio
    data: {dataset: fashion_mnist}               # every run's data section
    pretrain: {model: mae_vit_mini_patch4_28, epochs: 10}
    sweep: {mask_ratio: [0.25, 0.5, 0.75, 0.9]}  # a grid: several keys give their product
    seeds: [0, 1]
    evals:                                       # table columns; `kind` defaults to the name
      linprobe: {epochs: 90}
      knn: {pool: avg}
      scratch: {kind: finetune, checkpoint: none, model: mae_vit_mini_patch4_28}

or a list of named variants, each with its own overrides (and optionally `seeds`, `x` for the
plot, `evals` to run a subset of the columns, `pretrain: none` for a baseline without one;
`evaluate: [names]` at the top picks the study's columns among the evaluations defined):

    sweep:
      - {name: random}
      - {name: block, mask_sampling: block}

Sweep keys are dotted config keys: of the pretraining (`mask_ratio`, `data.random_crop`), of one
evaluation (`finetune.trainable_blocks`), or of every evaluation that has the key
(`evals.train_fraction`). `like: NAME` starts an evaluation from another one's settings. An
evaluation without `checkpoint` starts from its variant's pretraining; one with `checkpoint: none`
(a model from scratch) or of kind `logreg` (pixels) needs none. `extends: FILE` starts from another
study file (relative to this one), so studies can share one budget.

Every (variant, seed) becomes jobs, a pretraining and one job per evaluation, each in a folder named
by a hash of its resolved config: variants and studies that coincide share a job when they run into
the same `--out` folder, and a job whose result is on disk is never run again. See `ablate_run`
(running the jobs, resuming them) and `ablate_report` (tables, plots, the paper's findings).
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openmae.config import (
    ConfigError,
    config_from_dict,
    config_to_dict,
    merge_updates,
    nest_dotted,
    parse_overrides,
)
from openmae.errors import UsageError
from openmae.models import model_config
from openmae.recipes.classify import FinetuneConfig, LinprobeConfig
from openmae.recipes.knn import KnnConfig
from openmae.recipes.logreg import LogregConfig
from openmae.recipes.pretrain import PretrainConfig, model_overrides

STUDY_DIR = Path(__file__).resolve().parent.parent / "configs" / "ablations"
CONFIGS: dict[str, type] = {
    "pretrain": PretrainConfig,
    "linprobe": LinprobeConfig,
    "finetune": FinetuneConfig,
    "knn": KnnConfig,
    "logreg": LogregConfig,
}
EVAL_KINDS = ("linprobe", "finetune", "knn", "logreg")
STUDY_KEYS = {
    "name", "title", "description", "extends", "data", "pretrain", "sweep", "seeds", "evals", "evaluate",
    "plot", "pictures", "paper", "claims",
}  # fmt: skip
VARIANT_KEYS = {"name", "seeds", "x", "evals", "pretrain"}
# Fields that say where a run writes (or resumes), not what it computes: left out of a job's hash.
PLACE_FIELDS = ("output_dir", "resume", "output", "checkpoint")


@dataclass(frozen=True)
class Eval:
    """One column of a study: an evaluation of a kind, with its config updates (nested)."""

    name: str
    kind: str
    updates: dict

    @property
    def needs_pretraining(self) -> bool:
        """Starts from the variant's pretraining (no `checkpoint` of its own, not on pixels)."""
        return self.kind != "logreg" and "checkpoint" not in self.updates


@dataclass
class Variant:
    """One row of a study: config updates for the pretraining (None: no pretraining) and its evals."""

    name: str
    x: Any
    seeds: list[int]
    pretrain: dict | None
    evals: list[Eval]


@dataclass
class Study:
    name: str
    title: str
    source: Path
    variants: list[Variant]
    eval_names: list[str]  # the columns, in the file's order
    description: str = ""
    plot: dict = field(default_factory=dict)
    pictures: dict | None = None
    paper: dict = field(default_factory=dict)
    claims: list = field(default_factory=list)


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
# Study files


def find_study(name_or_path: str | Path) -> Path:
    """A study file as given if it exists, else the shipped study of that name."""
    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = STUDY_DIR / f"{path.name.removesuffix('.yaml')}.yaml"
    if shipped.is_file():
        return shipped
    names = ", ".join(list_studies())
    raise UsageError(f"study {str(name_or_path)!r} not found (a YAML file, or a shipped study: {names})")


def list_studies() -> list[str]:
    """The shipped studies (files starting with `_` hold shared settings, not a study)."""
    return sorted(p.stem for p in STUDY_DIR.glob("*.yaml") if not p.name.startswith("_"))


def read_study_file(path: Path, seen: tuple[Path, ...] = ()) -> dict:
    """The study mapping of `path`, laid over the file it `extends` (recursively)."""
    if path.resolve() in seen:
        raise UsageError(f"study files extend each other in a loop: {path}")
    try:
        data = yaml.safe_load(path.read_text()) or {}
    except (OSError, yaml.YAMLError) as error:
        raise UsageError(f"cannot read study {path}: {' '.join(str(error).split())}") from error
    if not isinstance(data, dict):
        raise UsageError(f"study {path} must hold a mapping of keys")
    unknown = set(data) - STUDY_KEYS
    if unknown:
        raise UsageError(f"study {path}: unknown keys {sorted(unknown)}; known: {sorted(STUDY_KEYS)}")
    base = data.pop("extends", None)
    if base is None:
        return data
    parent = read_study_file((path.parent / base), (*seen, path.resolve()))
    return merge_updates(parent, data)


def load_study(name_or_path: str | Path, overrides: list[str] = (), seeds: list[int] | None = None) -> Study:
    """Read and check a study. `overrides` are `key=value` settings on top of the file, with the
    keys of a sweep (`mask_ratio=0.5`, `linprobe.epochs=10`, `data.path=/images`); `seeds` replaces
    every variant's seeds. Raises UsageError on anything a run would trip on later."""
    path = find_study(name_or_path)
    data = read_study_file(path)
    name = str(data.get("name") or path.stem)
    shared = {"data": _section(data, "data", path)}  # every run's data section
    base_pretrain = merge_updates(shared, _section(data, "pretrain", path))
    evals = _read_evals(data.get("evals") or {}, path)
    if data.get("evaluate") is not None:  # the columns this study uses of those defined (e.g. by `extends`)
        chosen = [str(name) for name in data["evaluate"]]
        unknown = [name for name in chosen if name not in {e.name for e in evals}]
        if unknown:
            raise UsageError(f"study {path}: evaluate names unknown evaluations {unknown}")
        evals = [next(e for e in evals if e.name == name) for name in chosen]
    base_evals = {e.name: Eval(e.name, e.kind, merge_updates(shared, e.updates)) for e in evals}
    for key, value in parse_overrides(list(overrides)):
        base_pretrain, base_evals = _apply(key, value, base_pretrain, base_evals, f"--set {key}")
    study_seeds = [int(s) for s in (seeds or data.get("seeds") or [0])]
    variants = _read_sweep(data.get("sweep"), base_pretrain, base_evals, study_seeds, path)
    if seeds:
        for variant in variants:
            variant.seeds = list(study_seeds)
    study = Study(
        name=name,
        title=str(data.get("title") or name),
        source=path,
        variants=variants,
        eval_names=list(base_evals),
        description=str(data.get("description") or "").strip(),
        plot=dict(data.get("plot") or {}),
        pictures=dict(data["pictures"]) if data.get("pictures") else None,
        paper=dict(data.get("paper") or {}),
        claims=list(data.get("claims") or []),
    )
    _check_names(study)
    return study


def _section(data: dict, key: str, path: Path) -> dict:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise UsageError(f"study {path}: {key!r} must be a mapping of config keys")
    return value


def _read_evals(section: dict, path: Path) -> list[Eval]:
    if not isinstance(section, dict):
        raise UsageError(f"study {path}: 'evals' must map names to configs")
    evals: list[Eval] = []
    for name, updates in section.items():
        updates = dict(updates or {})
        like = updates.pop("like", None)
        if like is not None:  # another evaluation's settings, with these on top
            base = next((e for e in evals if e.name == like), None)
            if base is None:
                raise UsageError(f"study {path}: evaluation {name!r} is like {like!r}, not defined before it")
            updates = merge_updates(base.updates, updates)
            updates.setdefault("kind", base.kind)
        kind = updates.pop("kind", name)
        if kind not in EVAL_KINDS:
            raise UsageError(f"study {path}: evaluation {name!r} has kind {kind!r}; kinds: {EVAL_KINDS}")
        if name in ("evals", "pretrain") or name in {f for f in PretrainConfig.__dataclass_fields__}:
            raise UsageError(f"study {path}: {name!r} cannot name an evaluation (it is a pretraining key)")
        evals.append(Eval(str(name), kind, updates))
    return evals


def _apply(
    key: str, value: Any, pretrain: dict | None, evals: dict[str, Eval], where: str
) -> tuple[dict | None, dict[str, Eval]]:
    """One dotted override: to every evaluation (`evals.k`), to one (`NAME.k`), else to the pretraining."""
    head, _, rest = key.partition(".")
    if head == "evals" and rest:  # every evaluation whose config has the key
        field_name = rest.partition(".")[0]
        targets = [n for n, e in evals.items() if field_name in CONFIGS[e.kind].__dataclass_fields__]
    elif head in evals and rest:
        targets = [head]
    else:
        if pretrain is None:
            raise UsageError(f"{where}: this variant has no pretraining to set {key!r} on")
        key = rest if head == "pretrain" and rest else key
        return merge_updates(pretrain, nest_dotted({key: value})), evals
    if not targets:
        raise UsageError(f"{where}: no evaluation of the study has a key {rest!r} ({key!r})")
    changed = dict(evals)
    for name in targets:
        old = evals[name]
        changed[name] = Eval(name, old.kind, merge_updates(old.updates, nest_dotted({rest: value})))
    return pretrain, changed


def _read_sweep(
    sweep: Any, pretrain: dict, evals: dict[str, Eval], seeds: list[int], path: Path
) -> list[Variant]:
    """The variants of a grid (`{key: [values]}`) or of a list of named variants."""
    if sweep is None:
        return [Variant("base", None, seeds, pretrain, list(evals.values()))]
    if isinstance(sweep, dict):
        keys = list(sweep)
        for key in keys:
            if not isinstance(sweep[key], list) or not sweep[key]:
                raise UsageError(f"study {path}: sweep {key!r} must list its values")
        variants = []
        for values in itertools.product(*(sweep[k] for k in keys)):
            variant_pretrain, variant_evals = pretrain, evals
            for key, value in zip(keys, values, strict=True):
                variant_pretrain, variant_evals = _apply(
                    key, value, variant_pretrain, variant_evals, str(path)
                )
            pairs = zip(keys, values, strict=True)
            name = str(values[0]) if len(keys) == 1 else ", ".join(f"{k}={v}" for k, v in pairs)
            x = values[0] if len(keys) == 1 else None
            variants.append(Variant(name, x, list(seeds), variant_pretrain, list(variant_evals.values())))
        return variants
    if not isinstance(sweep, list):
        raise UsageError(f"study {path}: sweep must be a mapping (a grid) or a list of named variants")
    return [_named_variant(entry, pretrain, evals, seeds, path) for entry in sweep]


def _named_variant(
    entry: Any, pretrain: dict, evals: dict[str, Eval], seeds: list[int], path: Path
) -> Variant:
    if not isinstance(entry, dict) or "name" not in entry:
        raise UsageError(f"study {path}: each listed variant is a mapping with a 'name', got {entry!r}")
    name = str(entry["name"])
    where = f"study {path}, variant {name!r}"
    variant_pretrain = None if str(entry.get("pretrain", "")).lower() == "none" else pretrain
    if isinstance(entry.get("pretrain"), dict):
        variant_pretrain = merge_updates(pretrain, entry["pretrain"])
    chosen = entry.get("evals", list(evals))
    unknown = [e for e in chosen if e not in evals]
    if unknown:
        raise UsageError(f"{where}: unknown evaluations {unknown}; the study has {list(evals)}")
    variant_evals = {e: evals[e] for e in chosen}
    for key, value in entry.items():
        if key not in VARIANT_KEYS:
            variant_pretrain, variant_evals = _apply(key, value, variant_pretrain, variant_evals, where)
    if variant_pretrain is None and any(e.needs_pretraining for e in variant_evals.values()):
        raise UsageError(f"{where}: without a pretraining every evaluation needs a checkpoint (or none)")
    variant_seeds = [int(s) for s in entry.get("seeds", seeds)]
    return Variant(name, entry.get("x"), variant_seeds, variant_pretrain, list(variant_evals.values()))


def _check_names(study: Study) -> None:
    names = [v.name for v in study.variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"study {study.source}: variant names repeat: {duplicates}")


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
    outcome = run_jobs(jobs, parallel, threads, log)
    for study in loaded:
        summary = write_report(study, runs, jobs, out)
        state = "complete" if summary["complete"] else "incomplete"
        log(f"{study.name}: {state}; {out / study.name / 'summary.md'}")
    for key, reason in outcome.failed.items():
        log(f"failed: {jobs[key].kind} {jobs[key].folder}: {reason}")
    if outcome.stopped:
        log("stopped: run the same command again to continue (finished jobs are kept, stopped ones resume)")
        return STOPPED
    return 0 if outcome.ok else 1


def slug(name: str) -> str:
    """A file name for a variant name: `mask_ratio=0.25, seed` -> `mask_ratio-0.25-seed`."""
    return re.sub(r"[^A-Za-z0-9._]+", "-", name).strip("-") or "variant"


__all__ = [
    "Eval",
    "Job",
    "Run",
    "Study",
    "Variant",
    "ablate",
    "find_study",
    "list_studies",
    "load_study",
    "plan",
]
