"""Study files for `mae ablate`: what a study says, read and checked before anything runs.

A study file names a base pretraining (the keys of `mae pretrain`), a sweep of variants, the seeds,
and the evaluations every pretraining gets:

    name: mask_ratio
    data: {dataset: fashion_mnist}               # every run's data section
    pretrain: {model: mae_vit_mini_patch4_28, epochs: 10}
    sweep: {mask_ratio: [0.25, 0.5, 0.75, 0.9]}  # a grid: several keys give their product
    seeds: [0, 1]
    evals:                                       # the table's columns; `kind` defaults to the name
      linprobe: {epochs: 90}
      knn: {pool: avg}
      scratch: {kind: finetune, checkpoint: none, model: mae_vit_mini_patch4_28}

- `sweep` may instead list named variants, each with its overrides and optionally `seeds`, `x`
  (its place on the plot's axis), `evals` (the columns it runs) and `pretrain: none` (a baseline):
  `[{name: random}, {name: block, mask_sampling: block}]`.
- Sweep keys are dotted config keys: of the pretraining (`mask_ratio`, `data.random_crop`), of one
  evaluation (`finetune.trainable_blocks`), or of every evaluation that has the key
  (`evals.train_fraction`).
- An evaluation without `checkpoint` starts from its variant's pretraining; one with
  `checkpoint: none` (a model from scratch, of the pretraining's `model` unless it names one) or of
  kind `logreg` (pixels) needs none. `like: NAME` starts from another evaluation's settings.
- `evaluate: [names]` picks the study's columns among those defined; `references` lists baselines
  (named variants, e.g. a random encoder) drawn as lines across the plot; `extends: FILE` starts
  from another study file (relative to this one), so studies share one budget. `plot`, `pictures`,
  `paper` and `claims` shape the report (see `ablate_report`).
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from openmae.config import merge_updates, nest_dotted, parse_overrides
from openmae.configs import find_yaml
from openmae.errors import UsageError
from openmae.recipes.finetune import FinetuneConfig
from openmae.recipes.knn import KnnConfig
from openmae.recipes.linprobe import LinprobeConfig
from openmae.recipes.logreg import LogregConfig
from openmae.recipes.pretrain import PretrainConfig

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
    "name", "title", "description", "extends", "data", "pretrain", "sweep", "references", "seeds", "evals",
    "evaluate", "plot", "pictures", "paper", "claims",
}  # fmt: skip
VARIANT_KEYS = {"name", "seeds", "x", "evals", "pretrain"}


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
    reference: bool = False  # a baseline drawn as a line across the plot (e.g. a random encoder)


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


# ------------------------------------------------------------------------------------------------
# Study files


def find_study(name_or_path: str | Path) -> Path:
    """A study file as given if it exists, else the shipped study of that name."""
    return find_yaml(name_or_path, STUDY_DIR, "study", list_studies)


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
    keys of a sweep (`mask_ratio=0.5`, `linprobe.epochs=10`), except that `data.k=v` sets every
    run's data (`data.path=/images`); `seeds` replaces every variant's seeds. Raises UsageError
    on anything a run would trip on later."""
    path = find_study(name_or_path)
    data = read_study_file(path)
    name = str(data.get("name") or path.stem)
    overrides = parse_overrides(list(overrides))
    shared = {"data": _section(data, "data", path)}  # every run's data section, `--set data.k=v` too
    for key, value in overrides:
        if key.startswith("data."):
            shared = merge_updates(shared, nest_dotted({key: value}))
    base_pretrain = merge_updates(shared, _section(data, "pretrain", path))
    evals = _read_evals(data.get("evals") or {}, path)
    if data.get("evaluate") is not None:  # the columns this study uses of those defined (e.g. by `extends`)
        chosen = [str(name) for name in data["evaluate"]]
        unknown = [name for name in chosen if name not in {e.name for e in evals}]
        if unknown:
            raise UsageError(f"study {path}: evaluate names unknown evaluations {unknown}")
        evals = [next(e for e in evals if e.name == name) for name in chosen]
    base_evals = {e.name: Eval(e.name, e.kind, merge_updates(shared, e.updates)) for e in evals}
    study_seeds = [int(s) for s in (seeds or data.get("seeds") or [0])]
    variants = _read_sweep(data.get("sweep"), base_pretrain, base_evals, study_seeds, path)
    variants += _references(data.get("references") or [], base_pretrain, base_evals, study_seeds, path)
    model = next((v for k, v in reversed(overrides) if k in ("model", "pretrain.model")), None)
    model = model or base_pretrain.get("model") or PretrainConfig.model
    for variant in variants:
        _override(variant, [(k, v) for k, v in overrides if not k.startswith("data.")], base_evals)
        _scratch_models(variant, str(model))
        if seeds:
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
    targets = _targets(key, evals)
    if not (head == "evals" or head in evals) or not rest:
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


def _override(variant: Variant, overrides: list[tuple[str, Any]], evals: dict[str, Eval]) -> None:
    """`--set` overrides, over the variant's own, each to those of the variant's runs it concerns."""
    own = {e.name: e for e in variant.evals}
    for key, value in overrides:
        head = key.partition(".")[0]
        if head == "evals" or head in evals:  # evaluation keys: to this variant's evaluations that have them
            if not _targets(key, evals):
                raise UsageError(f"--set {key}: no evaluation of the study has that key")
            if not _targets(key, own):
                continue
        elif variant.pretrain is None:  # a baseline without pretraining
            continue
        variant.pretrain, own = _apply(key, value, variant.pretrain, own, f"--set {key}")
    variant.evals = list(own.values())


def _scratch_models(variant: Variant, model: str) -> None:
    """A model from scratch (`checkpoint: none`) without a `model` of its own is the study's size."""
    for i, ev in enumerate(variant.evals):
        scratch = "checkpoint" in ev.updates and str(ev.updates["checkpoint"]).lower() in ("none", "null")
        if scratch and "model" not in ev.updates:
            variant.evals[i] = Eval(ev.name, ev.kind, ev.updates | {"model": model})


def _targets(key: str, evals: dict[str, Eval]) -> list[str]:
    """The evaluations a dotted key sets: every one with the field (`evals.k`), the one it names."""
    head, _, rest = key.partition(".")
    if head == "evals" and rest:
        return [n for n, e in evals.items() if rest.partition(".")[0] in CONFIGS[e.kind].__dataclass_fields__]
    return [head] if head in evals and rest else []


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


def _references(
    entries: list, pretrain: dict, evals: dict[str, Eval], seeds: list[int], path: Path
) -> list[Variant]:
    """Baselines listed under `references` (named variants), with the study's evaluations they name."""
    variants = []
    for entry in entries:
        if not isinstance(entry, dict):
            raise UsageError(
                f"study {path}: each reference is a mapping like a listed variant, got {entry!r}"
            )
        chosen = [e for e in entry.get("evals", list(evals)) if e in evals]
        if not chosen:  # none of its evaluations is a column of this study
            continue
        known = {k: v for k, v in entry.items() if k.partition(".")[0] in (*VARIANT_KEYS, *chosen)}
        variant = _named_variant(known | {"evals": chosen}, pretrain, evals, seeds, path)
        variant.x, variant.reference = None, True
        variants.append(variant)
    return variants


def _check_names(study: Study) -> None:
    names = [v.name for v in study.variants]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise UsageError(f"study {study.source}: variant names repeat: {duplicates}")


__all__ = ["Eval", "Study", "Variant", "find_study", "list_studies", "load_study"]
