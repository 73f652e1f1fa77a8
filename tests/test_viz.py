"""Reconstruction figures: panel contents, norm-pix denormalisation, layout size, reproducibility."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

import openmae
from openmae import viz
from openmae.models.patches import patchify

MEAN3, STD3 = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
MEAN1, STD1 = (0.286,), (0.353,)


def make_model(in_chans: int = 3, **overrides) -> openmae.MaskedAutoencoder:
    torch.manual_seed(0)
    return openmae.create_model("mae_vit_debug", in_chans=in_chans, **overrides)


def make_imgs(batch: int, in_chans: int, size: int = 32) -> torch.Tensor:
    return torch.randn(batch, in_chans, size, size, generator=torch.Generator().manual_seed(1))


def run(model, imgs, seed: int = 0, mask_ratio: float = 0.75) -> viz.Reconstruction:
    return viz.reconstruct(model, imgs, mask_ratio, torch.Generator().manual_seed(seed))


def hidden_pixels(rec: viz.Reconstruction, model) -> torch.Tensor:
    """`[B, C, H, W]` bool, True on the pixels of hidden patches."""
    return viz.mask_to_pixels(rec.mask, model.patch_size, model.grid_size, rec.original.shape[1]).bool()


def predict_target(model) -> None:
    """Make `model` a perfect predictor: its `pred` is exactly its reconstruction target."""
    forward = model.forward

    def perfect(imgs, **kwargs):
        out = forward(imgs, **kwargs)
        out.pred = model.reconstruction_target(imgs)
        return out

    model.forward = perfect


@pytest.mark.parametrize("in_chans", [1, 3])
def test_panels_keep_visible_and_hide_masked_patches(in_chans):
    model = make_model(in_chans)
    imgs = make_imgs(2, in_chans)
    rec = run(model, imgs)
    hidden = hidden_pixels(rec, model)
    assert rec.mask.shape == (2, model.num_patches)
    assert rec.mask.sum(1).tolist() == [12.0, 12.0]  # int(16 * 0.25) = 4 patches kept
    for panel in rec.panels():
        assert panel.shape == imgs.shape
    assert torch.equal(rec.original, imgs)
    # pasted: the original bit for bit where visible, the prediction where hidden
    assert torch.equal(rec.pasted[~hidden], imgs[~hidden])
    assert torch.equal(rec.pasted[hidden], rec.reconstruction[hidden])
    assert not torch.equal(rec.pasted[hidden], imgs[hidden])
    # masked: visible kept, hidden blanked to 0 (the mean colour once un-normalised)
    assert torch.equal(rec.masked[~hidden], imgs[~hidden])
    assert bool((rec.masked[hidden] == 0).all())
    assert torch.isfinite(rec.loss) and rec.loss.ndim == 0
    assert rec.mask_ratio == 0.75


def test_mask_pixels_follow_the_patch_grid():
    mask = torch.zeros(1, 16)
    mask[0, 1] = 1  # first grid row, second column
    pixels = viz.mask_to_pixels(mask, 8, (4, 4), 3)
    expected = torch.zeros(1, 3, 32, 32, dtype=torch.bool)
    expected[:, :, 0:8, 8:16] = True
    assert torch.equal(pixels.bool(), expected)


@pytest.mark.parametrize("in_chans", [1, 3])
def test_norm_pix_reconstruction_is_denormalised_with_each_patch_statistics(in_chans):
    model = make_model(in_chans, norm_pix_loss=True)
    predict_target(model)
    imgs = make_imgs(2, in_chans)
    rec = run(model, imgs)
    torch.testing.assert_close(rec.reconstruction, imgs, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(rec.pasted, imgs, atol=1e-4, rtol=1e-4)
    # Without denormalisation the normalised target would be shown, which is not the image.
    assert not torch.allclose(patchify(rec.reconstruction, 8), model.reconstruction_target(imgs), atol=1e-2)


def test_pixel_target_perfect_prediction_is_exact():
    model = make_model(3, norm_pix_loss=False)
    predict_target(model)
    imgs = make_imgs(2, 3)
    assert torch.equal(run(model, imgs).reconstruction, imgs)


def test_seed_fixes_the_mask_and_mode_is_restored():
    model = make_model()
    imgs = make_imgs(2, 3)
    model.train()
    a, b, c = run(model, imgs, seed=3), run(model, imgs, seed=3), run(model, imgs, seed=4)
    assert model.training
    assert torch.equal(a.mask, b.mask) and torch.equal(a.reconstruction, b.reconstruction)
    assert not torch.equal(a.mask, c.mask)
    model.eval()
    run(model, imgs)
    assert not model.training


def test_reconstruct_runs_without_grad_and_leaves_weights_alone():
    model = make_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rec = run(model, make_imgs(2, 3))
    assert not rec.reconstruction.requires_grad
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_to_display_channels_and_clipping():
    imgs = torch.stack([torch.full((8, 8), v) for v in (-10.0, 0.0, 10.0, 0.5)])[None]  # [1, 4, 8, 8]
    shown = viz.to_display(imgs, (0.5,) * 4, (0.1,) * 4)
    assert shown.shape == (1, 3, 8, 8)  # >3 channels: the first three as RGB
    assert shown[0, :, 0, 0].tolist() == pytest.approx([0.0, 0.5, 1.0])
    gray = viz.to_display(imgs[:, :1] * 0 + 1.0, MEAN1, STD1)  # one channel -> gray
    assert gray.shape == (1, 3, 8, 8) and torch.equal(gray[:, 0], gray[:, 2])
    assert gray[0, 0, 0, 0].item() == pytest.approx(0.286 + 0.353)
    # Two channels -> channel 0 in gray; a single mean/std value serves every channel.
    two = viz.to_display(imgs[:, :2], (0.5,), (0.1,))
    assert torch.equal(two[:, 1], two[:, 0]) and two[0, 0, 0, 0].item() == 0.0
    with pytest.raises(ValueError, match="mean has 2 values"):
        viz.to_display(imgs[:, :3], (0.5, 0.5), STD3)


def png_bytes(model, imgs, mean, std, seed, tmp_path) -> bytes:
    path = viz.save_reconstruction_grid(model, imgs, tmp_path / f"grid-{seed}.png", mean, std, seed=seed)
    return path.read_bytes()


def test_same_seed_same_png_other_seed_differs(tmp_path):
    model = make_model()
    imgs = make_imgs(2, 3)
    first = png_bytes(model, imgs, MEAN3, STD3, 0, tmp_path)
    assert png_bytes(model, imgs, MEAN3, STD3, 0, tmp_path / "again") == first
    assert png_bytes(model, imgs, MEAN3, STD3, 1, tmp_path) != first


@pytest.mark.parametrize(
    ("in_chans", "size", "patch", "batch", "expected"),
    [
        (3, 32, 8, 2, (4 * 128 + 3 * 2, 16 + 2 * 128 + 2)),  # 32 px -> x4
        (1, 32, 8, 3, (4 * 128 + 3 * 2, 16 + 3 * 128 + 2 * 2)),
        (1, 28, 7, 1, (4 * 112 + 3 * 2, 16 + 112)),  # Fashion-MNIST size -> x4
    ],
)
def test_png_size(tmp_path, in_chans, size, patch, batch, expected):
    model = make_model(in_chans, img_size=size, patch_size=patch)
    imgs = make_imgs(batch, in_chans, size)
    mean, std = (MEAN1, STD1) if in_chans == 1 else (MEAN3, STD3)
    path = viz.save_reconstruction_grid(model, imgs, tmp_path / "sub" / "grid.png", mean, std)
    with Image.open(path) as png:
        assert png.format == "PNG" and png.mode == "RGB"
        assert png.size == expected == viz.grid_size_px(batch, size, size, viz.auto_scale(size, size))


def test_explicit_scale_and_no_titles():
    model = make_model()
    rec = run(model, make_imgs(2, 3))
    assert viz.make_grid_image(rec, MEAN3, STD3, scale=1, titles=False).size == (4 * 32 + 6, 2 * 32 + 2)
    assert viz.make_grid_image(rec, MEAN3, STD3, scale=2).size == (4 * 64 + 6, 16 + 2 * 64 + 2)
    assert viz.auto_scale(224, 224) == 1 and viz.auto_scale(28, 28) == 4 and viz.auto_scale(8, 16) == 7
    with pytest.raises(ValueError, match="scale"):
        viz.make_grid_image(rec, MEAN3, STD3, scale=0)


def test_grid_panels_show_the_reconstruction():
    """In the rendered grid, columns are original | masked | reconstruction | pasted, rows are images."""
    model = make_model()
    imgs = make_imgs(2, 3)
    rec = run(model, imgs)
    grid = np.asarray(viz.make_grid_image(rec, MEAN3, STD3, scale=1, titles=False))  # [H', W', 3]
    for row in range(2):
        for col, panel in enumerate(rec.panels()):
            y, x = row * (32 + viz.SEPARATOR), col * (32 + viz.SEPARATOR)
            shown = torch.from_numpy(grid[y : y + 32, x : x + 32].copy()).permute(2, 0, 1)
            expected = (viz.to_display(panel[row : row + 1], MEAN3, STD3)[0] * 255).round().to(torch.uint8)
            assert torch.equal(shown, expected)
    assert (grid[32 : 32 + viz.SEPARATOR] == 255).all()  # the separator between rows


def test_the_tensorboard_image_matches_the_png(tmp_path):
    model = make_model(1)
    imgs = make_imgs(2, 1)
    tensor = viz.image_to_tensor(viz.reconstruction_grid(model, imgs, MEAN1, STD1, seed=5))
    path = viz.save_reconstruction_grid(model, imgs, tmp_path / "g.png", MEAN1, STD1, seed=5)
    with Image.open(io.BytesIO(path.read_bytes())) as png:
        expected = torch.from_numpy(np.asarray(png, dtype=np.float32) / 255).permute(2, 0, 1)
    assert tensor.dtype == torch.float32 and tensor.shape == (3, *expected.shape[1:])
    assert torch.equal(tensor, expected)


def test_load_images_converts_files_to_a_normalised_batch(tmp_path):
    paths = []
    for i in range(3):  # RGB files of another size, for a gray 32x32 model
        path = tmp_path / f"img{i}.png"
        Image.fromarray(np.full((40, 48, 3), 60 * i, dtype=np.uint8)).save(path)
        paths.append(path)
    batch = viz.load_images(paths, 32, 1, MEAN1, STD1)
    assert batch.shape == (3, 1, 32, 32)
    torch.testing.assert_close(
        batch[1:2], torch.full_like(batch[1:2], (60 / 255 - 0.286) / 0.353), atol=1e-3, rtol=0
    )
