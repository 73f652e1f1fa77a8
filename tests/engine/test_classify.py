"""Classification pieces: LARS as the probe uses it, layer decay, mixup targets, freezing, the probe head."""

import pytest
import torch

from openmae import create_model
from openmae.engine.classify import build_criterion, build_lars, build_mixup, train_only_last_blocks
from openmae.engine.optim import OptimConfig, build_optimizer, set_lr
from openmae.engine.tasks import ClassifyTask
from openmae.models.probe import LinearProbe
from openmae.models.vit import VisionTransformer


def debug_config(**changes):
    return create_model("mae_vit_debug").config.encoder_config(num_classes=5, **changes)


def test_lars_adapts_weight_matrices_with_zero_weight_decay_but_not_biases():
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 3)
    w, b = layer.weight.detach().clone(), layer.bias.detach().clone()
    optimizer = build_lars(layer, lr=0.5, weight_decay=0.0, momentum=0.9)
    layer(torch.randn(4, 6)).pow(2).sum().backward()
    gw, gb = layer.weight.grad.clone(), layer.bias.grad.clone()
    optimizer.step()
    # The reference: update = lr * 0.001 * |w| / |g| * g on matrices; plain SGD (momentum) on biases.
    torch.testing.assert_close(layer.weight.detach(), w - 0.5 * 0.001 * w.norm() / gw.norm() * gw)
    torch.testing.assert_close(layer.bias.detach(), b - 0.5 * gb)


def test_lars_skips_frozen_parameters():
    model = LinearProbe(debug_config())
    optimizer = build_lars(model, lr=0.1)
    params = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(params) == 2  # head.1 weight and bias: the BatchNorm has no affine, the rest is frozen
    assert {p.ndim for p in params} == {1, 2}


def test_layer_decay_gives_each_block_its_lr_scale():
    model = VisionTransformer(debug_config(global_pool="avg"))  # depth 2
    cfg = OptimConfig(name="adamw", layer_decay=0.75, weight_decay=0.05)
    optimizer = build_optimizer(model, cfg, lr=1.0)
    set_lr(optimizer, 1.0)
    lr_of = {}
    names = {id(p): n for n, p in model.named_parameters()}
    for group in optimizer.param_groups:
        for p in group["params"]:
            lr_of[names[id(p)]] = group["lr"]
    # Depth 2: embeddings 0.75^3, block 0 0.75^2, block 1 0.75, then fc_norm and head at 1.
    assert lr_of["patch_embed.proj.weight"] == pytest.approx(0.75**3)
    assert lr_of["cls_token"] == pytest.approx(0.75**3)
    assert lr_of["blocks.0.attn.qkv.weight"] == pytest.approx(0.75**2)
    assert lr_of["blocks.1.mlp.fc2.bias"] == pytest.approx(0.75)
    assert lr_of["fc_norm.weight"] == lr_of["head.weight"] == pytest.approx(1.0)
    assert "pos_embed" not in lr_of  # fixed sin-cos: not trained


@pytest.mark.parametrize(("mixup", "cutmix"), [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mixup_and_cutmix_targets_sum_to_one_and_replay_from_the_seeds(mixup, cutmix):
    mix = build_mixup(mixup, cutmix, smoothing=0.1, num_classes=5)
    seen = []

    def criterion(logits, targets):
        seen.append(targets)
        return logits.sum() * 0

    task = ClassifyTask(criterion, mix)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    images, labels = torch.rand(6, 3, 8, 8), torch.tensor([0, 1, 2, 3, 4, 0])
    for seeds in ([11] * 6, [11] * 6, [12] * 6):
        task(model, (images, labels, torch.tensor(seeds)), torch.device("cpu"))
    targets = seen[0]
    assert targets.shape == (6, 5)
    torch.testing.assert_close(targets.sum(1), torch.ones(6))
    assert torch.equal(seen[0], seen[1])  # same seeds, same mix...
    assert not torch.equal(seen[0], seen[2])  # ...other seeds, another one


def test_mixup_off_gives_plain_or_smoothed_cross_entropy():
    assert build_mixup(0.0, 0.0, 0.1, 5) is None
    logits, labels = torch.randn(4, 5), torch.tensor([0, 1, 2, 3])
    plain = torch.nn.functional.cross_entropy(logits, labels)
    assert build_criterion(None, 0.0)(logits, labels) == pytest.approx(float(plain))
    assert build_criterion(None, 0.1)(logits, labels) != pytest.approx(float(plain))


def test_partial_fine_tuning_updates_only_the_last_blocks_norms_and_head():
    torch.manual_seed(0)
    model = VisionTransformer(debug_config(global_pool="avg"))
    names = train_only_last_blocks(model, 1)
    assert all(n.startswith(("blocks.1.", "fc_norm.", "head.")) for n in names)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(("blocks.1.", "fc_norm.", "head.")) for n in changed)
    assert any(n.startswith("blocks.1.") for n in changed)
    with pytest.raises(ValueError, match="between 0 and the depth"):
        train_only_last_blocks(model, 3)


def test_linear_probe_head_folds_into_a_plain_classifier_with_the_same_logits():
    torch.manual_seed(0)
    probe = LinearProbe(debug_config())
    assert [n for n, p in probe.named_parameters() if p.requires_grad] == ["head.1.weight", "head.1.bias"]
    probe.train()
    images = torch.randn(8, 3, 32, 32)
    for _ in range(3):  # give the BatchNorm running statistics something to hold
        probe(images * 2 + 1)
    probe.eval()
    features = probe.forward_head(probe.forward_features(images), pre_logits=True)  # [B, D]
    torch.testing.assert_close(probe(features), probe(images))
    classifier = probe.to_classifier()
    assert type(classifier) is VisionTransformer and isinstance(classifier.head, torch.nn.Linear)
    torch.testing.assert_close(classifier(images), probe(images), atol=1e-5, rtol=1e-5)
