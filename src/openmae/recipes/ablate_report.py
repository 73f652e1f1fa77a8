"""A study's results: one JSON file per variant, a summary table (markdown + JSON), a plot with
error bars over seeds, the paper's numbers and findings next to ours, and Figure-6 mask pictures.

Everything here reads the jobs' `result.json` files, so a report can be rewritten at any time,
also of a study that is still running or was stopped (missing numbers show as "—").

A study's `claims` say what the paper found, as comparisons of two variants on one metric (or of
two metrics, `metric: [a, b]`, e.g. two methods on the same variant):

    claims:
      - {text: "75% beats 25% masking on the linear probe", metric: linprobe, better: "0.75", than: "0.25"}
      - {text: "fine-tuning is flat from 50% to 75%", metric: finetune, same: ["0.5", "0.75"]}

A difference counts when it exceeds twice its standard error over seeds, sqrt(s_a^2/n_a + s_b^2/n_b);
a point run with one seed borrows the study's pooled seed-to-seed spread of that metric. With two
seeds a spread is a rough estimate: "inconclusive" means the difference is within it.
"""

from __future__ import annotations

import json
import math
import statistics
from pathlib import Path

from openmae.recipes.ablate import Job, Run, slug
from openmae.recipes.ablate_study import Study

# Series a plot panel or a claim can name besides the evaluations: numbers of the pretraining.
PRETRAIN_SERIES = {
    "pretrain_minutes": ("pretraining wall time (min)", lambda r: r["seconds"] / 60),
    "pretrain_images_per_s": ("pretraining images/s", lambda r: r.get("images_per_s")),
    "train_loss": ("final pretraining loss", lambda r: r.get("train_loss")),
}


def collect(study: Study, runs: list[Run], jobs: dict[str, Job]) -> list[dict]:
    """Per variant: its results seed by seed (None where a job has not finished)."""
    records = []
    for variant in study.variants:
        seeds = {}
        for run in (r for r in runs if r.study == study.name and r.variant.name == variant.name):
            pretrain = jobs[run.pretrain] if run.pretrain else None
            seeds[run.seed] = {
                "pretrain": _job_record(pretrain) if pretrain else None,
                "evals": {name: _job_record(jobs[key]) for name, key in run.evals.items()},
            }
        if seeds:
            records.append(
                {"name": variant.name, "x": variant.x, "reference": variant.reference, "seeds": seeds}
            )
    return records


def _job_record(job: Job) -> dict:
    return {"folder": str(job.folder), "result": job.result()}


def series_values(record: dict, series: str) -> list[float]:
    """The per-seed values of an evaluation's top-1 or of a pretraining number."""
    values = []
    for seed in record["seeds"].values():
        if series in PRETRAIN_SERIES:
            result = (seed["pretrain"] or {}).get("result")
            value = PRETRAIN_SERIES[series][1](result) if result else None
        else:
            result = (seed["evals"].get(series) or {}).get("result")
            value = result.get("top1") if result else None
        if value is not None:
            values.append(float(value))
    return values


def describe(values: list[float]) -> dict:
    """Mean, sample standard deviation (None below two values), count and the values."""
    return {
        "mean": statistics.fmean(values) if values else None,
        "std": statistics.stdev(values) if len(values) > 1 else None,
        "n": len(values),
        "values": values,
    }


def study_series(study: Study) -> list[str]:
    """The table's metric columns: every evaluation, then the pretraining's time and throughput."""
    has_pretraining = any(v.pretrain is not None for v in study.variants)
    return [*study.eval_names, *(["pretrain_minutes", "pretrain_images_per_s"] if has_pretraining else [])]


def summarise(study: Study, records: list[dict]) -> dict:
    """The summary of a study as plain data (what summary.json holds)."""
    columns = study_series(study) + [s for s in _plot_series(study) if s not in study_series(study)]
    rows = []
    for record in records:
        rows.append(
            {
                "name": record["name"],
                "x": record["x"],
                "reference": record["reference"],
                "seeds": sorted(record["seeds"]),
                "metrics": {series: describe(series_values(record, series)) for series in columns},
                "paper": (study.paper.get("results") or {}).get(record["name"]),
            }
        )
    complete = all(r["metrics"][s]["n"] == len(r["seeds"]) for r in rows for s in _expected(study, r))
    summary = {
        "study": study.name,
        "title": study.title,
        "source": str(study.source),
        "description": study.description,
        "complete": complete and len(rows) == len(study.variants),
        "columns": columns,
        "rows": rows,
        "paper_finding": study.paper.get("finding"),
    }
    summary["claims"] = [judge(claim, summary) for claim in study.claims]
    return summary


def _expected(study: Study, row: dict) -> list[str]:
    variant = next(v for v in study.variants if v.name == row["name"])
    pretrain = ["pretrain_minutes"] if variant.pretrain is not None else []
    return [e.name for e in variant.evals] + pretrain


def _plot_series(study: Study) -> list[str]:
    return [s for panel in study.plot.get("panels", []) for s in panel.get("series", [])]


def pooled_std(summary: dict, metric: str) -> float | None:
    """The root mean seed-to-seed variance of `metric` over the variants run with several seeds."""
    variances = [
        r["metrics"][metric]["std"] ** 2 for r in summary["rows"] if r["metrics"][metric]["std"] is not None
    ]
    return math.sqrt(statistics.fmean(variances)) if variances else None


def judge(claim: dict, summary: dict) -> dict:
    """Our verdict on one of the paper's findings: agrees / disagrees / inconclusive, and why."""
    metrics = claim["metric"] if isinstance(claim["metric"], list) else [claim["metric"]] * 2
    if "same" in claim:
        first, second = (str(v) for v in claim["same"])
    else:
        first, second = str(claim["better"]), str(claim["than"])
    rows = {r["name"]: r["metrics"] for r in summary["rows"]}
    a, b = rows.get(first, {}).get(metrics[0]), rows.get(second, {}).get(metrics[1])
    verdict = {"text": claim.get("text", ""), "metric": " vs ".join(dict.fromkeys(metrics))}
    verdict |= {"first": _side(first, metrics[0], metrics), "second": _side(second, metrics[1], metrics)}
    if not a or not b or not a["n"] or not b["n"]:
        return verdict | {"verdict": "not run", "difference": None, "stderr": None}
    sides = ((a["std"], metrics[0]), (b["std"], metrics[1]))
    spread = [std if std is not None else pooled_std(summary, metric) for std, metric in sides]
    difference = a["mean"] - b["mean"]
    stderr = None if None in spread else math.sqrt(spread[0] ** 2 / a["n"] + spread[1] ** 2 / b["n"])
    verdict |= {"difference": difference, "stderr": stderr}
    if stderr is None:
        return verdict | {"verdict": "inconclusive (one seed each: no spread to judge by)"}
    significant = abs(difference) > 2 * stderr
    if "same" in claim:
        word = "disagrees" if significant else "agrees (the difference is within the seed spread)"
    elif significant:
        word = "agrees" if difference > 0 else "disagrees"
    else:
        word = "inconclusive (the difference is within the seed spread)"
    return verdict | {"verdict": word}


def _side(variant: str, metric: str, metrics: list[str]) -> str:
    """How a claim's side is named: the variant, and the metric when the two sides differ in it."""
    return variant if metrics[0] == metrics[1] else f"{metric} at {variant}"


# ------------------------------------------------------------------------------------------------
# Writing


def write_report(study: Study, runs: list[Run], jobs: dict[str, Job], out: Path) -> dict:
    """Write `out/STUDY/`: variants/*.json, summary.json, summary.md, plot.png (and masks.png)."""
    folder = out / study.name
    (folder / "variants").mkdir(parents=True, exist_ok=True)
    records = collect(study, runs, jobs)
    summary = summarise(study, records)
    for record, row in zip(records, summary["rows"], strict=True):
        path = folder / "variants" / f"{slug(record['name'])}.json"
        path.write_text(json.dumps(record | {"metrics": row["metrics"]}, indent=2))
    if any(row["metrics"][s]["n"] for row in summary["rows"] for s in summary["columns"]):
        plot_study(study, summary, folder / "plot.png")
        summary["plot"] = "plot.png"
    if study.pictures:
        from openmae.recipes.ablate_pictures import mask_pictures

        if mask_pictures(study, runs, jobs, folder / "masks.png", **study.pictures):
            summary["pictures"] = "masks.png"
    (folder / "summary.json").write_text(json.dumps(summary, indent=2))
    (folder / "summary.md").write_text(markdown(summary))
    return summary


def label_of(series: str) -> str:
    return PRETRAIN_SERIES[series][0] if series in PRETRAIN_SERIES else f"{series} top-1 (%)"


def format_stat(stat: dict | None, digits: int = 2) -> str:
    if not stat or not stat["n"]:
        return "—"
    text = f"{stat['mean']:.{digits}f}"
    return text + (f" ± {stat['std']:.{digits}f}" if stat["std"] is not None else "")


def markdown(summary: dict, heading: str = "##") -> str:
    """The study's table (mean ± std over seeds), the paper's numbers and the verdicts."""
    columns = summary["columns"]
    paper_keys = sorted({k for r in summary["rows"] for k in (r["paper"] or {})})
    lines = [f"{heading} {summary['title']}", ""]
    if summary["description"]:
        lines += [summary["description"], ""]
    state = "complete" if summary["complete"] else "**incomplete** (some jobs have not finished)"
    lines += [f"Study `{summary['study']}` ({state}); mean ± standard deviation over the seeds.", ""]
    header = ["variant", "seeds", *(label_of(c) for c in columns), *(f"paper {k}" for k in paper_keys)]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in summary["rows"]:
        cells = [row["name"], ", ".join(str(s) for s in row["seeds"])]
        cells += [format_stat(row["metrics"][c], 1 if c in PRETRAIN_SERIES else 2) for c in columns]
        cells += [str((row["paper"] or {}).get(k, "")) for k in paper_keys]
        lines.append("| " + " | ".join(cells) + " |")
    if summary["paper_finding"]:
        lines += ["", f"Paper: {summary['paper_finding']}"]
    if summary["claims"]:
        lines += ["", "| the paper's finding | ours (difference ± 2 s.e.) | verdict |", "|---|---|---|"]
        for claim in summary["claims"]:
            ours = "—"
            if claim["difference"] is not None:
                error = f" ± {2 * claim['stderr']:.2f}" if claim["stderr"] is not None else ""
                ours = f"{claim['first']} − {claim['second']}: {claim['difference']:+.2f}{error}"
            lines.append(f"| {claim['text']} ({claim['metric']}) | {ours} | {claim['verdict']} |")
    for key, title in (("plot", "plot"), ("pictures", "mask pictures")):
        if summary.get(key):
            lines += ["", f"![{title}]({summary[key]})"]
    return "\n".join(lines) + "\n"


def plot_study(study: Study, summary: dict, path: Path) -> Path:
    """One panel per evaluation (or as the study's `plot.panels` say): mean ± std over seeds, every
    seed as a dot. Numeric variant values (`x`) make a numeric axis, others one tick per variant;
    reference variants (baselines) are horizontal lines at their mean."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    spec = study.plot
    panels = spec.get("panels") or [{"title": name, "series": [name]} for name in study.eval_names]
    rows = [r for r in summary["rows"] if not r.get("reference")]
    references = [r for r in summary["rows"] if r.get("reference")]
    numeric = all(isinstance(r["x"], (int, float)) and not isinstance(r["x"], bool) for r in rows)
    positions = [r["x"] if numeric else i for i, r in enumerate(rows)]
    figure, axes = plt.subplots(1, len(panels), figsize=(4.4 * len(panels), 3.6), squeeze=False)
    for axis, panel in zip(axes[0], panels, strict=True):
        for series in panel["series"]:
            points = [
                (x, r["metrics"][series])
                for x, r in zip(positions, rows, strict=True)
                if r["metrics"][series]["n"]
            ]
            if not points:
                continue
            xs = [x for x, _ in points]
            means = [s["mean"] for _, s in points]
            errors = [s["std"] or 0.0 for _, s in points]
            line = axis.errorbar(
                xs,
                means,
                yerr=errors,
                marker="o",
                capsize=3,
                label=panel.get("labels", {}).get(series, series),
            )
            dots_x = [x for x, s in points for _ in s["values"]]
            dots_y = [v for _, s in points for v in s["values"]]
            axis.scatter(dots_x, dots_y, s=10, alpha=0.5, color=line[0].get_color())
        for reference, style in zip(references, ("--", ":", "-."), strict=False):
            for series in panel["series"]:
                stat = reference["metrics"].get(series)
                if stat and stat["n"]:
                    label = f"{reference['name']}" + ("" if len(panel["series"]) == 1 else f" ({series})")
                    axis.axhline(stat["mean"], color="gray", linestyle=style, linewidth=1, label=label)
        axis.set_title(panel.get("title", ""))
        axis.set_ylabel(
            panel.get("y_label")
            or (label_of(panel["series"][0]) if len(panel["series"]) == 1 else "top-1 (%)")
        )
        axis.set_xlabel(spec.get("x_label", ""))
        if not numeric:
            axis.set_xticks(range(len(rows)), [r["name"] for r in rows], rotation=25, ha="right")
        else:
            if spec.get("log_x"):
                axis.set_xscale("log")
                axis.minorticks_off()
            axis.set_xticks(sorted(set(positions)), [f"{x:g}" for x in sorted(set(positions))])
        if len(panel["series"]) > 1 or references:
            axis.legend(fontsize=7)
        axis.grid(alpha=0.3)
    figure.suptitle(summary["title"])
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    plt.close(figure)
    return path


__all__ = ["collect", "judge", "markdown", "plot_study", "summarise", "write_report"]
