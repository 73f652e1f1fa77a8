"""`mae linprobe | finetune | eval | knn` end to end: debug model, synthetic images, a few steps."""

import json

import pytest
import torch
from safetensors.torch import load_file

from openmae import create_model
from openmae.checkpoint import save_checkpoint
from openmae.cli import main
from openmae.interop import load_checkpoint

DATA = ["data.dataset=synthetic", "data.synthetic_size=32", "data.num_workers=0", "device=cpu"]
SCHEDULE = ["batch_size=8", "log_every=1", "optim.warmup_epochs=0.5"]
TRAIN = [*DATA, "epochs=2", *SCHEDULE]
TRAIN_1_EPOCH = [*DATA, "epochs=1", *SCHEDULE]  # the command line gives each key once


@pytest.fixture(scope="module")
def mae_checkpoint(tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("mae") / "mae.safetensors"
    save_checkpoint(create_model("mae_vit_debug"), path)
    return path


def encoder_weights(state):
    return {
        k: v
        for k, v in state.items()
        if not k.startswith(("decoder_", "mask_token", "head", "norm", "fc_norm"))
    }


def epoch_records(folder):
    lines = [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]
    return [r for r in lines if "train_loss" in r]


@pytest.mark.parametrize("augment", [False, True])
def test_linprobe_leaves_every_encoder_weight_unchanged_and_writes_a_plain_classifier(
    tmp_path, mae_checkpoint, augment
):
    out = tmp_path / "lp"
    code = main(
        ["linprobe", *TRAIN, f"checkpoint={mae_checkpoint}", f"augment={augment}", f"output_dir={out}"]
    )
    assert code == 0
    before, after = load_file(mae_checkpoint), load_file(out / "model.safetensors")
    encoder = encoder_weights(before)
    assert encoder and all(torch.equal(after[k], v) for k, v in encoder.items())
    assert torch.equal(after["norm.weight"], before["norm.weight"])  # the final norm is frozen too
    assert "head.0.running_var" in load_file(out / "checkpoint-00000008.safetensors")  # resumable as trained
    classifier = load_checkpoint(out / "model.safetensors")  # BatchNorm folded: a plain linear head
    assert isinstance(classifier.head, torch.nn.Linear) and classifier.head.out_features == 10
    epochs = epoch_records(out)
    assert [r["epoch"] for r in epochs] == [1, 2] and all("val_top1" in r and "val_top5" in r for r in epochs)
    results = json.loads((out / "results.json").read_text())
    assert 0 <= results["final"]["top1"] <= results["final"]["top5"] <= 100
    assert (out / "best.safetensors").exists()


def test_eval_scores_a_saved_classifier_as_the_run_did(tmp_path, mae_checkpoint, capsys):
    out = tmp_path / "lp"
    assert main(["linprobe", *TRAIN_1_EPOCH, f"checkpoint={mae_checkpoint}", f"output_dir={out}"]) == 0
    final = json.loads((out / "results.json").read_text())["final"]
    scores = tmp_path / "eval.json"
    assert main(["eval", *DATA, f"checkpoint={out / 'model.safetensors'}", f"output={scores}"]) == 0
    metrics = json.loads(scores.read_text())
    assert metrics["images"] == 32
    assert metrics["top1"] == pytest.approx(final["top1"]) and metrics["top5"] == pytest.approx(final["top5"])
    assert "top-1" in capsys.readouterr().out


def test_a_run_stopped_after_an_evaluation_scores_its_final_weights(tmp_path, mae_checkpoint):
    # Epoch 1 (4 steps) is evaluated; the run then stops at step 6, inside epoch 2.
    out = tmp_path / "lp"
    args = ["linprobe", *TRAIN, "eval_every=1", "max_steps=6", f"checkpoint={mae_checkpoint}"]
    assert main([*args, f"output_dir={out}"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["best"]["step"] == 4 and results["final"]["step"] == 6
    scores = tmp_path / "eval.json"
    assert main(["eval", *DATA, f"checkpoint={out / 'model.safetensors'}", f"output={scores}"]) == 0
    assert json.loads(scores.read_text())["top1"] == pytest.approx(results["final"]["top1"])


def test_finetune_with_mixup_trains_every_block_and_keeps_the_best_checkpoint(tmp_path, mae_checkpoint):
    out = tmp_path / "ft"
    code = main(["finetune", *TRAIN, f"checkpoint={mae_checkpoint}", f"output_dir={out}", "drop_path=0.1"])
    assert code == 0
    before, after = load_file(mae_checkpoint), load_file(out / "model.safetensors")
    for key in (
        "patch_embed.proj.weight",
        "blocks.0.attn.qkv.weight",
        "blocks.1.mlp.fc2.weight",
        "head.weight",
    ):
        assert not torch.equal(after[key], before.get(key, torch.zeros_like(after[key]))), key
    assert "norm.weight" not in after and "fc_norm.weight" in after  # average pooling, as the recipe says
    best = load_checkpoint(out / "best.safetensors")
    assert best.config.global_pool == "avg" and best.config.num_classes == 10
    assert all("val_top1" in r for r in epoch_records(out))


def test_partial_finetune_updates_only_the_last_block(tmp_path, mae_checkpoint):
    out = tmp_path / "partial"
    args = [
        *TRAIN_1_EPOCH,
        f"checkpoint={mae_checkpoint}",
        f"output_dir={out}",
        "trainable_blocks=1",
        "mixup=0",
    ]
    assert main(["finetune", *args]) == 0
    before, after = load_file(mae_checkpoint), load_file(out / "model.safetensors")
    for key, value in encoder_weights(before).items():
        frozen = not key.startswith("blocks.1.")
        assert torch.equal(after[key], value) == frozen, key


@pytest.mark.filterwarnings("ignore:decoder_num_heads is not stored")  # the reference file has no config
def test_from_scratch_baselines_and_reference_checkpoints(tmp_path, mae_checkpoint, capsys):
    # checkpoint=none: a random init of a named size (the from-scratch baseline).
    assert main(["knn", *DATA, "checkpoint=none", "model=mae_vit_debug", "k=5"]) == 0
    assert "k-NN top-1" in capsys.readouterr().out
    # A reference-code training checkpoint (`{"model": state_dict}` in a .pth) is read too.
    reference = tmp_path / "checkpoint-799.pth"
    torch.save({"model": load_file(mae_checkpoint), "epoch": 799}, reference)
    scores = tmp_path / "knn.json"
    assert main(["knn", *DATA, f"checkpoint={reference}", "num_heads=2", "pool=avg", f"output={scores}"]) == 0
    metrics = json.loads(scores.read_text())
    assert metrics["bank_images"] == metrics["query_images"] == 32
    assert 0 <= metrics["knn_top1"] <= metrics["knn_top5"] <= 100


@pytest.mark.parametrize(
    ("command", "args", "message"),
    [
        ("linprobe", ["checkpoint=none"], "model=NAME"),
        ("finetune", ["checkpoint=/no/such.safetensors"], "/no/such.safetensors"),
        ("finetune", ["checkpoint=none", "model=mae_vit_debug", "batch_size=7"], "even"),
        ("eval", ["checkpoint=none"], "none"),
    ],
)
def test_bad_input_is_a_one_line_error_with_exit_code_2(tmp_path, capsys, command, args, message):
    out = [] if command == "eval" else [f"output_dir={tmp_path / 'run'}"]
    code = main([command, *DATA, *args, *out])
    err = capsys.readouterr().err.strip()
    assert code == 2
    assert message in err and len(err.splitlines()) == 1, err
    assert not (tmp_path / "run").exists()


def test_eval_on_a_labelled_image_folder(tmp_path):
    import numpy as np
    from PIL import Image

    from openmae.models.vit import VisionTransformer

    rng = np.random.default_rng(0)
    for i in range(6):
        folder = tmp_path / "val" / ("cat" if i % 2 else "dog")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 255, (40, 40, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    torch.manual_seed(0)
    classifier = VisionTransformer(create_model("mae_vit_debug").config.encoder_config(num_classes=2))
    save_checkpoint(classifier, tmp_path / "classifier.safetensors")
    scores = tmp_path / "eval.json"
    checkpoint = tmp_path / "classifier.safetensors"
    args = [f"checkpoint={checkpoint}", f"data.val_path={tmp_path / 'val'}", f"output={scores}"]
    assert main(["eval", "data.num_workers=0", "device=cpu", *args]) == 0
    metrics = json.loads(scores.read_text())
    assert metrics["images"] == 6 and metrics["top5"] == 100.0  # two classes: always in the top 5
    assert metrics["top1"] in {100 * k / 6 for k in range(7)}


def separable_folder(root, per_class):
    """Two classes a linear probe tells apart at once: bright stripes across, or down, on noise."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, count in (("train", per_class), ("val", per_class // 2)):
        for name in ("across", "down"):
            folder = root / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                image = rng.integers(0, 128, (40, 40, 3)).astype(np.uint8)
                if name == "across":
                    image[::4] += 120
                else:
                    image[:, ::4] += 120
                Image.fromarray(image).save(folder / f"{i}.png")
    return root


def test_the_default_linear_probe_learns_in_a_few_epochs_on_a_small_folder(tmp_path, capsys):
    # 64 training images, fewer than the default batch of 256: it falls back to 8 (8 steps an epoch).
    data = separable_folder(tmp_path / "data", 32)
    args = ["linprobe", "checkpoint=none", "model=mae_vit_debug", f"data.path={data / 'train'}",
            f"data.val_path={data / 'val'}", "data.num_workers=0", "epochs=5"]  # fmt: skip
    assert main([*args, f"output_dir={tmp_path / 'probe'}"]) == 0
    out = capsys.readouterr().out
    assert "using batch_size 8" in out and "trains at 3,200 x the lr below" in out, out
    final = json.loads((tmp_path / "probe" / "results.json").read_text())["final"]
    assert final["top1"] >= 90, final  # two classes: chance is 50%
    # The paper's rule alone (0.1 x 8 / 256) on the same 5 epochs: the head hardly moves.
    assert main([*args, "lars_reference_images=0", f"output_dir={tmp_path / 'rule'}"]) == 0
    rule = json.loads((tmp_path / "rule" / "results.json").read_text())["final"]
    assert rule["top1"] < 80, rule


def test_finetune_keeps_a_weight_average_validated_alongside_and_saved_beside_the_weights(
    tmp_path, mae_checkpoint
):
    out = tmp_path / "ft"
    args = ["finetune", *TRAIN, f"checkpoint={mae_checkpoint}", "ema_decay=0.5", f"output_dir={out}"]
    assert main(args) == 0
    epochs = epoch_records(out)
    assert all("ema_top1" in r and "val_top1" in r for r in epochs)
    results = json.loads((out / "results.json").read_text())
    assert results["ema"]["top1"] == epochs[-1]["ema_top1"]
    average, final = load_file(out / "ema.safetensors"), load_file(out / "model.safetensors")
    assert set(average) == set(final)
    assert any(not torch.equal(average[k], final[k]) for k in final)  # an average, not a copy
    start = load_file(mae_checkpoint)
    assert any(not torch.equal(average[k], start[k]) for k in final if k in start)  # it moved
    assert load_checkpoint(out / "ema.safetensors").config.num_classes == 10
    # Off by default.
    assert main(["finetune", *TRAIN, f"checkpoint={mae_checkpoint}", f"output_dir={tmp_path / 'plain'}"]) == 0
    assert not (tmp_path / "plain" / "ema.safetensors").exists()


@pytest.mark.parametrize("workers", [0, 2])
def test_a_stopped_finetune_resumes_exactly_with_every_augmentation_on(tmp_path, mae_checkpoint, workers):
    # RandAugment draws from Python's and NumPy's RNGs (seeded per image), mixup from both (seeded per
    # batch), drop path from torch's global RNG in the forward pass (its state is in the checkpoint,
    # and starting the loader draws nothing from it): the weights, and their average, resume bit
    # for bit.
    augment = ["mixup=0.8", "cutmix=1.0", "auto_augment=rand-m9-mstd0.5-inc1", "drop_path=0.1", "reprob=0.25"]
    train = [arg for arg in TRAIN if not arg.startswith("data.num_workers=")]
    base = ["finetune", *train, f"checkpoint={mae_checkpoint}", "ema_decay=0.5", *augment,
            f"data.num_workers={workers}"]  # fmt: skip
    assert main([*base, f"output_dir={tmp_path / 'full'}"]) == 0
    assert main([*base, "max_steps=5", f"output_dir={tmp_path / 'cut'}"]) == 0  # stops mid-epoch 2
    assert main([*base, "resume=auto", f"output_dir={tmp_path / 'cut'}"]) == 0
    for name in ("model.safetensors", "ema.safetensors"):
        full, resumed = load_file(tmp_path / "full" / name), load_file(tmp_path / "cut" / name)
        assert all(torch.equal(full[k], resumed[k]) for k in full), name
    average, weights = (
        load_file(tmp_path / "full" / "ema.safetensors"),
        load_file(tmp_path / "full" / "model.safetensors"),
    )
    assert any(not torch.equal(average[k], weights[k]) for k in average)  # the comparison can fail


@pytest.mark.parametrize("train_images", [600, 10_000, 60_000, 2_000_000])
def test_no_lars_step_moves_the_probe_matrix_by_more_than_the_cap(train_images):
    # Fashion-MNIST's 1% (600 images) at lr 2 once asked for steps of 4.3x the matrix's norm: NaN.
    from openmae.engine.classify import build_lars
    from openmae.recipes.linprobe import (
        IMAGENET_TRAIN_IMAGES,
        MAX_LARS_STEP,
        LinprobeConfig,
        lars_matrix_scale,
    )

    lr = 2.0
    scale = lars_matrix_scale(LinprobeConfig(), train_images, lr)
    uncapped = max(1.0, IMAGENET_TRAIN_IMAGES / train_images)
    assert 1.0 <= scale <= uncapped
    torch.manual_seed(0)
    head = torch.nn.Linear(64, 10)
    optimizer = build_lars(head, lr, matrix_lr_scale=scale)
    before = head.weight.detach().clone()
    torch.nn.functional.cross_entropy(head(torch.randn(32, 64)), torch.randint(0, 10, (32,))).backward()
    optimizer.step()
    moved = (head.weight.detach() - before).norm() / before.norm()
    assert moved == pytest.approx(lr * scale * 1e-3, rel=1e-4)  # a trust-ratio step: lr x 0.001 of the norm
    assert moved <= MAX_LARS_STEP * (1 + 1e-4)
    if train_images == 2_000_000:
        assert scale == 1.0  # more images than ImageNet: the paper's rule as it is
