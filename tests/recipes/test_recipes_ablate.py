"""`mae ablate`: studies of the debug model on synthetic images, run, interrupted, resumed, reported."""

import json
import re
import signal

import pytest
import torch
import yaml

from openmae.cli import main
from openmae.data import DataConfig, SyntheticImages, build_dataset
from openmae.data.subsets import balanced_indices, balanced_subset, dataset_labels
from openmae.engine.loop import Trainer
from openmae.errors import UsageError
from openmae.recipes.ablate import plan
from openmae.recipes.ablate_report import judge
from openmae.recipes.ablate_study import list_studies, load_study
from openmae.recipes.pretrain import PretrainConfig, build_pretrain_model

RUN = {"device": "cpu", "log_every": 1, "optim": {"warmup_epochs": 0.5}}
STUDY = {
    "name": "tiny",
    "title": "Tiny mask-ratio study",
    "data": {"dataset": "synthetic", "synthetic_size": 32, "num_workers": 0},
    # 32 images / 8 = 4 steps an epoch, 8 in all; the held-out monitor runs once, at the end.
    "pretrain": {
        "model": "mae_vit_debug",
        "epochs": 2,
        "batch_size": 8,
        "vis_every": 2,
        "eval_images": 8,
        **RUN,
    },
    "sweep": {"mask_ratio": [0.5, 0.75]},
    "seeds": [0],
    "evals": {
        "linprobe": {"epochs": 1, "batch_size": 8, **RUN},
        "knn": {"device": "cpu", "pool": "avg", "k": 5},
    },
    "claims": [{"text": "75% beats 50%", "metric": "linprobe", "better": "0.75", "than": "0.5"}],
}


def write_study(folder, study=STUDY, name="study.yaml"):
    path = folder / name
    path.write_text(yaml.safe_dump(study, sort_keys=False))
    return path


def attempts(folder):
    return json.loads((folder / "attempts.json").read_text())


# ------------------------------------------------------------------------------------------------
# Labelled subsets


def test_balanced_subsets_keep_every_class_share_and_depend_on_the_seed_alone():
    labels = torch.tensor([0] * 100 + [1] * 50 + [2] * 10)[torch.randperm(160)]  # shuffled, unbalanced
    chosen = balanced_indices(labels, fraction=0.1, seed=3)
    counts = torch.bincount(labels[chosen], minlength=3).tolist()
    assert counts == [10, 5, 1]
    assert chosen == sorted(set(chosen)) and chosen == balanced_indices(labels.tolist(), fraction=0.1, seed=3)
    assert chosen != balanced_indices(labels, fraction=0.1, seed=4)
    per_class = balanced_indices(labels, per_class=7, seed=0)
    assert torch.bincount(labels[per_class]).tolist() == [7, 7, 7]
    assert balanced_indices(labels, fraction=1.0) == list(range(160))
    for bad in ({}, {"fraction": 0.0}, {"fraction": 0.5, "per_class": 2}, {"per_class": 0}):
        with pytest.raises(ValueError):
            balanced_indices(labels, **bad)


def test_balanced_subset_reads_labels_through_wrappers_without_loading_images():
    images = SyntheticImages(40, 8, 1, num_classes=4)
    subset = balanced_subset(images, fraction=0.5, seed=1)
    labels = dataset_labels(subset)
    assert len(subset) == 20 and [labels.count(c) for c in range(4)] == [5, 5, 5, 5]
    assert labels == [images[i][1] for i in subset.indices]


def test_train_fraction_trains_a_probe_on_the_balanced_share(tmp_path):
    out = tmp_path / "lp"
    args = [
        "linprobe",
        "checkpoint=none",
        "model=mae_vit_debug",
        "data.dataset=synthetic",
        "data.synthetic_size=32",
    ]
    args += ["device=cpu", "epochs=1", "batch_size=4", "train_fraction=0.25", f"output_dir={out}"]
    assert main(args) == 0
    assert json.loads((out / "results.json").read_text())["final"]["step"] == 2  # 8 of 32 images, 4 a step


# ------------------------------------------------------------------------------------------------
# The config switches the studies need


def test_pretraining_sets_the_decoder_shape_and_the_mask_token_baseline():
    cfg = PretrainConfig(model="mae_vit_debug", decoder_depth=3, decoder_embed_dim=24, decoder_num_heads=3)
    model = build_pretrain_model(cfg)
    assert len(model.decoder_blocks) == 3 and model.decoder_embed.out_features == 24
    assert (
        build_pretrain_model(PretrainConfig(model="mae_vit_debug")).config.decoder_depth == 1
    )  # the model's
    baseline = build_pretrain_model(PretrainConfig(model="mae_vit_debug", encoder_mask_tokens=True))
    assert baseline.config.encoder_mask_tokens and hasattr(baseline, "encoder_mask_token")


def test_augmentation_switches_none_and_colour_jitter():
    images = SyntheticImages(4, 16, 3)
    data = {"dataset": "synthetic", "synthetic_size": 4, "mean": (0.0,) * 3, "std": (1.0,) * 3}
    plain = build_dataset(DataConfig(**data, random_crop=False, hflip=False), "train", 16, 3)
    assert torch.allclose(plain[1][0], images[1][0], atol=1e-6)  # the image as it is: no crop, no flip
    torch.manual_seed(0)
    jittered = build_dataset(
        DataConfig(**data, random_crop=False, hflip=False, color_jitter=0.4), "train", 16, 3
    )
    assert not torch.allclose(jittered[0][0], plain[0][0])
    with pytest.raises(ValueError, match="1 or 3 channels"):
        build_dataset(DataConfig(dataset="synthetic", color_jitter=0.4), "train", 16, 4)


# ------------------------------------------------------------------------------------------------
# Study files


def test_a_grid_gives_one_variant_per_value_and_coinciding_runs_share_their_jobs(tmp_path):
    named = {
        **STUDY,
        "name": "named",
        "sweep": [
            {"name": "default", "x": 0.75, "evals": ["linprobe", "knn"]},  # the grid's 0.75 again
            {"name": "1 block", "linprobe.epochs": 2, "evals": ["linprobe"], "seeds": [0, 1]},
            {"name": "pixels", "pretrain": "none", "evals": ["logreg"]},
        ],
        "evals": {**STUDY["evals"], "logreg": {"img_size": 32, "in_chans": 3}},
    }
    grid = load_study(write_study(tmp_path, STUDY, "grid.yaml"))
    listed = load_study(write_study(tmp_path, named, "named.yaml"))
    assert [v.name for v in grid.variants] == ["0.5", "0.75"] and [v.x for v in grid.variants] == [0.5, 0.75]
    assert grid.variants[0].pretrain["mask_ratio"] == 0.5 and grid.eval_names == ["linprobe", "knn"]
    jobs, runs = plan([grid, listed], tmp_path / "out")
    by_label = {(r.study, r.variant.name, r.seed): r for r in runs}
    shared = by_label[("tiny", "0.75", 0)]
    assert by_label[("named", "default", 0)].pretrain == shared.pretrain
    assert by_label[("named", "default", 0)].evals == shared.evals  # the same probe and k-NN too
    one_block = [by_label[("named", "1 block", s)] for s in (0, 1)]
    assert (
        one_block[0].pretrain == shared.pretrain
        and one_block[0].evals["linprobe"] != shared.evals["linprobe"]
    )
    assert jobs[one_block[0].evals["linprobe"]].config["epochs"] == 2 and one_block[1].seed == 1
    pixels = by_label[("named", "pixels", 0)]
    assert pixels.pretrain is None and jobs[pixels.evals["logreg"]].needs is None
    probe = jobs[shared.evals["linprobe"]]
    assert probe.needs == shared.pretrain
    assert probe.config["checkpoint"] == str(jobs[shared.pretrain].folder / "model.safetensors")
    # 3 pretrainings (0.5, 0.75, 0.75 seed 1), 2 x (probe, k-NN), 2 one-block probes, 1 pixel baseline
    assert len(jobs) == 10 and not any(job.folder.exists() for job in jobs.values())


def test_sweep_keys_reach_one_evaluation_or_every_evaluation(tmp_path):
    study = {**STUDY, "sweep": {"evals.seed": [5]}, "evals": {"linprobe": {}, "probe2": {"kind": "linprobe"}}}
    (variant,) = load_study(write_study(tmp_path, study)).variants
    assert all(e.updates["seed"] == 5 for e in variant.evals)
    blocks = {
        **STUDY,
        "sweep": {"finetune.trainable_blocks": [1, None]},
        "evals": {"finetune": {}, "knn": {}},
    }
    variants = load_study(write_study(tmp_path, blocks)).variants
    assert [v.evals[0].updates.get("trainable_blocks") for v in variants] == [1, None]
    assert (
        "trainable_blocks" not in variants[0].evals[1].updates
        and variants[0].pretrain == variants[1].pretrain
    )
    # `--set data.k=v` reaches every run; other keys the pretraining, or the evaluation they name.
    overrides = ["data.synthetic_size=16", "linprobe.epochs=3"]
    (variant,) = load_study(write_study(tmp_path, study), overrides).variants
    assert variant.pretrain["data"]["synthetic_size"] == "16" and "epochs" not in variant.evals[1].updates
    assert all(e.updates["data"]["synthetic_size"] == "16" for e in variant.evals)
    assert variant.evals[0].updates["epochs"] == "3"
    # A model from scratch is the pretraining's size unless it names one.
    scratch = {**STUDY, "sweep": None, "evals": {"scratch": {"kind": "finetune", "checkpoint": "none"}}}
    (variant,) = load_study(write_study(tmp_path, scratch), ["model=mae_vit_tiny_patch4_32"]).variants
    assert (
        variant.evals[0].updates["model"] == "mae_vit_tiny_patch4_32"
        and not variant.evals[0].needs_pretraining
    )


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sweep": {"mask_ratoi": [0.5]}}, "mask_ratoi"),
        ({"sweep": {"linprobe.epoks": [1]}}, "epoks"),
        ({"evals": {"probe": {"kind": "svm"}}}, "svm"),
        ({"sweeps": {}}, "sweeps"),
        ({"sweep": [{"name": "a"}, {"name": "a"}]}, "repeat"),
        ({"sweep": [{"name": "pixels", "pretrain": "none"}]}, "checkpoint"),
    ],
)
def test_bad_studies_fail_in_one_line_before_anything_is_written(tmp_path, capsys, change, message):
    path = write_study(tmp_path, {**STUDY, **change})
    assert main(["ablate", str(path), "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err.strip()
    assert message in error and len(error.splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_the_shipped_studies_load_and_share_their_default_pretraining(tmp_path):
    studies = [load_study(name) for name in list_studies()]
    assert {s.name for s in studies} == {
        "mask_ratio", "decoder_depth", "decoder_width", "mask_tokens", "target", "augmentation",
        "mask_sampling", "partial_finetune", "labels_scarce",
    }  # fmt: skip
    jobs, runs = plan(studies, tmp_path)
    default = {  # 75% random masking, normalised pixels, crops, the model's 64 x 2 decoder
        ("mask_ratio", "0.75"), ("decoder_depth", "2"), ("decoder_width", "64"),
        ("target", "normalised pixels"), ("mask_tokens", "encoder without mask tokens (MAE)"),
        ("augmentation", "crop"), ("mask_sampling", "random"),
    }  # fmt: skip
    seed0 = [r for r in runs if r.seed == 0]
    shared = {r.pretrain for r in seed0 if (r.study, r.variant.name) in default}
    assert len(shared) == 1
    studies_of_the_default = ("partial_finetune", "labels_scarce")
    assert all(
        r.pretrain in shared for r in seed0 if r.study in studies_of_the_default and not r.variant.reference
    )
    assert sum(job.kind == "pretrain" for job in jobs.values()) == 2 * 15  # 15 pretrainings, 2 seeds
    baselines = {r.evals["linprobe"] for r in runs if r.variant.reference and r.seed == 0}
    assert len(baselines) == 1 and all(r.pretrain is None for r in runs if r.variant.reference)
    assert not (tmp_path / "runs").exists()


# ------------------------------------------------------------------------------------------------
# Running, stopping, resuming, reporting


def test_a_two_variant_sweep_writes_results_summary_and_plot(tmp_path):
    out = tmp_path / "out"
    assert main(["ablate", str(write_study(tmp_path)), "--out", str(out)]) == 0
    report = out / "tiny"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["complete"] and [r["name"] for r in summary["rows"]] == ["0.5", "0.75"]
    for row in summary["rows"]:
        for column in ("linprobe", "knn", "pretrain_minutes", "pretrain_images_per_s"):
            assert row["metrics"][column]["n"] == 1, column
        assert 0 <= row["metrics"]["linprobe"]["mean"] <= 100
    assert summary["claims"][0]["verdict"].startswith("inconclusive")  # one seed each: no spread
    variant = json.loads((report / "variants" / "0.75.json").read_text())
    assert variant["seeds"]["0"]["pretrain"]["result"]["steps"] == 8
    assert (report / "plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (report / "summary.md").read_text()
    assert "| 0.5 | 0 |" in table and "linprobe top-1 (%)" in table and "75% beats 50%" in table


def test_an_interrupted_study_skips_finished_variants_and_resumes_the_stopped_one(
    tmp_path, monkeypatch, capsys
):
    path, out = write_study(tmp_path), tmp_path / "out"
    assert main(["ablate", str(path), "--out", str(out), "--only", "0.5"]) == 0
    capsys.readouterr()
    rows = json.loads((out / "tiny" / "summary.json").read_text())["rows"]
    assert [r["metrics"]["linprobe"]["n"] for r in rows] == [1, 0]  # the report has every variant
    # SIGTERM during the second variant's pretraining, at step 5 (after the epoch-1 checkpoint).
    train_step, signalled = Trainer.train_step, []

    def signal_at_step_5(self, batches):
        result = train_step(self, batches)
        if self.progress.step == 5 and self.model.config.mask_ratio == 0.75 and not signalled:
            signalled.append(True)
            signal.raise_signal(signal.SIGTERM)
        return result

    monkeypatch.setattr(Trainer, "train_step", signal_at_step_5)
    assert main(["ablate", str(path), "--out", str(out)]) == 3
    assert "run the same command again" in capsys.readouterr().out
    jobs, runs = plan([load_study(path)], out)
    first, second = (next(r for r in runs if r.variant.name == name) for name in ("0.5", "0.75"))
    stopped = jobs[second.pretrain]
    assert not stopped.done and [a["completed"] for a in attempts(stopped.folder)] == [False]
    summary = json.loads((out / "tiny" / "summary.json").read_text())
    assert not summary["complete"] and summary["rows"][1]["metrics"]["linprobe"]["n"] == 0

    assert main(["ablate", str(path), "--out", str(out)]) == 0
    resumed = re.search(r"resumed from \S+ at step (\d+)", capsys.readouterr().out)
    assert resumed and 5 <= int(resumed.group(1)) < 8  # the stop's own checkpoint, not epoch 1's (step 4)
    assert [a["completed"] for a in attempts(stopped.folder)] == [False, True]
    assert stopped.result()["steps"] == 8 and stopped.result()["attempts"] == 2
    for key in (first.pretrain, *first.evals.values()):  # finished before: not run again
        assert len(attempts(jobs[key].folder)) == 1
    assert json.loads((out / "tiny" / "summary.json").read_text())["complete"]


def test_judging_a_finding_uses_the_seed_spread():
    def summary(a, b):
        rows = [
            {"name": n, "metrics": {"lp": {"mean": sum(v) / len(v), "n": len(v), "std": s}}}
            for n, v, s in (a, b)
        ]
        return {"rows": rows}

    claim = {"metric": "lp", "better": "a", "than": "b"}
    assert judge(claim, summary(("a", [80.0, 81.0], 0.7), ("b", [70.0, 71.0], 0.7)))["verdict"] == "agrees"
    assert judge(claim, summary(("a", [70.0, 71.0], 0.7), ("b", [80.0, 81.0], 0.7)))["verdict"] == "disagrees"
    assert judge(claim, summary(("a", [80.0, 81.0], 0.7), ("b", [80.2, 80.4], 0.14)))["verdict"].startswith(
        "inconclusive"
    )
    same = {"metric": "lp", "same": ["a", "b"]}
    assert judge(same, summary(("a", [80.0, 81.0], 0.7), ("b", [80.2, 80.4], 0.14)))["verdict"].startswith(
        "agrees"
    )
    # A one-seed point borrows the spread of the points that have several.
    assert judge(claim, summary(("a", [85.0], None), ("b", [80.0, 81.0], 0.7)))["verdict"] == "agrees"
    assert judge(claim, summary(("a", [85.0], None), ("b", [80.0], None)))["verdict"].startswith(
        "inconclusive"
    )
    # Two metrics of one variant (two methods on the same labelled subset).
    ft, lr = {"mean": 70.0, "n": 2, "std": 1.0}, {"mean": 60.0, "n": 2, "std": 1.0}
    verdict = judge(
        {"metric": ["ft", "lr"], "better": "1%", "than": "1%"},
        {"rows": [{"name": "1%", "metrics": {"ft": ft, "lr": lr}}]},
    )
    assert verdict["verdict"] == "agrees" and verdict["first"] == "ft at 1%" and verdict["difference"] == 10.0


@pytest.mark.slow
def test_parallel_jobs_run_in_their_own_processes_and_agree_with_one_process(tmp_path):
    study = {
        **STUDY,
        "sweep": {"mask_ratio": [0.75]},
        "seeds": [0, 1],
        "evals": {"knn": STUDY["evals"]["knn"]},
    }
    path = write_study(tmp_path, study)
    assert main(["ablate", str(path), "--out", str(tmp_path / "here")]) == 0
    assert main(["ablate", str(path), "--out", str(tmp_path / "procs"), "--parallel", "2"]) == 0
    here, procs = (
        json.loads((tmp_path / d / "tiny" / "summary.json").read_text()) for d in ("here", "procs")
    )
    assert here["rows"][0]["metrics"]["knn"]["values"] == procs["rows"][0]["metrics"]["knn"]["values"]
    logs = list((tmp_path / "procs" / "runs").glob("*/log.txt"))
    assert len(logs) == 4


def test_load_study_rejects_what_a_run_would_trip_on(tmp_path):
    with pytest.raises(UsageError, match="not found"):
        load_study(tmp_path / "missing.yaml")
