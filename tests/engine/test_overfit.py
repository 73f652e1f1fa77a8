import torch

from openmae.data import SyntheticImages
from openmae.engine.optim import OptimConfig, build_optimizer
from openmae.models import create_model


def test_a_fixed_small_batch_is_overfit():
    torch.manual_seed(0)
    model = create_model("mae_vit_debug", norm_pix_loss=False)
    images = torch.stack([SyntheticImages(8, 32, 3, seed=0)[i][0] for i in range(8)])  # [8, 3, 32, 32]
    noise = torch.rand(8, model.num_patches)  # the same masks every step
    optimizer = build_optimizer(model, OptimConfig(weight_decay=0.0), lr=3e-3)
    losses = []
    for _ in range(150):
        loss = model(images, noise=noise).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] / 4, (losses[0], losses[-1])
