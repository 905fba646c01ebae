"""SimCLR views: per-sample randomness, reproducibility, and torchvision's maths for each op."""

from __future__ import annotations

import colorsys
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import torchvision.transforms.v2.functional as TF

from contrastive.augment import (
    CPU_CHUNK_PIXELS,
    SimCLRViews,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    blur_kernel_size,
    gaussian_blur,
    hsv_to_rgb,
    resized_crop,
    rgb_to_grayscale,
    rgb_to_hsv,
    sample_crop_boxes,
)
from contrastive.config import AugmentConfig


def _plain(**overrides: object) -> AugmentConfig:
    """Every random op off and the crop the whole image, except for ``overrides``."""
    fields = {"hflip": 0.0, "jitter_prob": 0.0, "grayscale_prob": 0.0, "blur_prob": 0.0}
    fields |= {"crop_scale": (1.0, 1.0), "crop_ratio": (1.0, 1.0)}
    return AugmentConfig(**(fields | overrides))


def _images(n: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, height, width, 3), dtype=torch.uint8, generator=generator)


def _as_float(images: torch.Tensor) -> torch.Tensor:
    return images.permute(0, 3, 1, 2).float() / 255


def _hard_colours(n: int = 6, size: int = 8) -> torch.Tensor:
    """Random float RGB images with the pixels colour code gets wrong: black, white, gray,
    saturated channels (0 and 1) and ties for the largest channel."""
    x = torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(1))
    x[:, :, 0, 0] = 0.0
    x[:, :, 0, 1] = 1.0
    x[:, :, 0, 2] = 0.5
    x[:, :, 1, :3] = torch.tensor([[1.0, 1.0, 1.0], [0.0, 0.5, 1.0], [0.3, 0.3, 0.0]])
    x[:, :, 2, 0] = torch.tensor([0.7, 0.7, 0.2])  # red and green tie for the largest
    x[:, :, 2, 1] = torch.tensor([0.2, 0.7, 0.7])  # green and blue tie
    x[:, :, 2, 2] = torch.tensor([0.7, 0.2, 0.7])  # red and blue tie
    return x


def _views(cfg: AugmentConfig, size: int, images: torch.Tensor, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator(device=images.device).manual_seed(seed)
    return SimCLRViews(cfg, size)(images, generator)


# --- the public call ------------------------------------------------------------------------------


@pytest.mark.parametrize(("height", "width", "size"), [(16, 16, 16), (8, 8, 16), (24, 20, 12)])
def test_views_have_the_requested_shape_dtype_and_range(height: int, width: int, size: int) -> None:
    cfg = AugmentConfig(blur_prob=0.5)
    out = _views(cfg, size, _images(32, height, width))
    assert out.shape == (32, 3, size, size)
    assert out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert out.std() > 0.05  # not collapsed to a constant


def test_rejects_images_that_are_not_uint8_nhwc() -> None:
    views = SimCLRViews(AugmentConfig(), 8)
    with pytest.raises(ValueError, match="uint8"):
        views(torch.rand(2, 8, 8, 3), torch.Generator())
    with pytest.raises(ValueError, match="uint8"):
        views(torch.zeros(2, 3, 8, 8, dtype=torch.uint8), torch.Generator())
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="generator"):
            views(torch.zeros(2, 8, 8, 3, dtype=torch.uint8, device="cuda"), torch.Generator())


def test_identical_images_get_different_views() -> None:
    batch = _images(1, 16, 16).expand(16, -1, -1, -1)
    for cfg in (AugmentConfig(), _plain(jitter_prob=1.0)):
        out = _views(cfg, 16, batch).flatten(1)
        distances = torch.cdist(out, out)
        distances.fill_diagonal_(math.inf)
        assert distances.min() > 1e-3, "two images drew the same view: draws are not per sample"


def test_same_seed_same_views_and_other_seed_other_views() -> None:
    images = _images(16, 16, 16)
    cfg = AugmentConfig(blur_prob=0.5)
    assert torch.equal(_views(cfg, 16, images, seed=3), _views(cfg, 16, images, seed=3))
    assert not torch.allclose(_views(cfg, 16, images, seed=3), _views(cfg, 16, images, seed=4))
    # the two views of a pair come from successive draws of one generator
    views, generator = SimCLRViews(cfg, 16), torch.Generator().manual_seed(3)
    assert not torch.allclose(views(images, generator), views(images, generator))


def test_cpu_chunks_give_the_same_views_as_one_pass() -> None:
    images = _images(40, 24, 24)
    views = SimCLRViews(AugmentConfig(blur_prob=0.5), 64)
    assert CPU_CHUNK_PIXELS // 64**2 < 40  # so the call below runs in more than one chunk
    chunked = views(images, torch.Generator().manual_seed(7))
    params = views.draw(40, 24, 24, torch.Generator().manual_seed(7))
    torch.testing.assert_close(chunked, views.apply(images, params), rtol=0, atol=1e-6)


# --- crop and flip --------------------------------------------------------------------------------


def test_identity_crop_returns_the_image() -> None:
    images = _images(8, 16, 16)
    out = _views(_plain(), 16, images)
    torch.testing.assert_close(out, _as_float(images), rtol=0, atol=1e-6)


def test_identity_crop_to_a_larger_size_is_a_bilinear_resize() -> None:
    images = _images(8, 8, 8)
    out = _views(_plain(), 16, images)
    expected = TF.resize(_as_float(images), [16, 16], antialias=True)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    assert not torch.allclose(out, F.interpolate(_as_float(images), size=16, mode="nearest"))


def test_resized_crop_is_torchvisions_roi_align() -> None:
    from torchvision.ops import roi_align

    images = torch.rand(4, 3, 20, 20, generator=torch.Generator().manual_seed(0))
    boxes = torch.tensor([[0, 0, 20, 20], [2, 3, 15, 18], [1.5, 2.2, 9.9, 12.0], [0, 0, 40, 40.0]])
    rois = torch.cat((torch.arange(4.0)[:, None], boxes), dim=1)
    expected = roi_align(images, rois, output_size=12, sampling_ratio=0, aligned=True)
    assert torch.equal(resized_crop(images, boxes, 12), expected)


def test_pretraining_imports_neither_torchvision_nor_sklearn() -> None:
    """Each costs over a second at every pretraining start; views need only roi_align's kernel."""
    code = (
        "import sys, torch, contrastive.train; "
        "from contrastive.augment import SimCLRViews; "
        "from contrastive.config import AugmentConfig; "
        "images = torch.randint(0, 256, (4, 12, 12, 3), dtype=torch.uint8); "
        "views = SimCLRViews(AugmentConfig(), 8)(images, torch.Generator().manual_seed(0)); "
        "assert views.shape == (4, 3, 8, 8), views.shape; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torchvision', 'sklearn'}))"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout.strip() == "[]"


def test_hflip_one_mirrors_every_image() -> None:
    images = _images(8, 16, 16)
    out = _views(_plain(hflip=1.0), 16, images)
    torch.testing.assert_close(out, _as_float(images).flip(-1), rtol=0, atol=1e-6)


def test_hflip_half_mirrors_some_images_exactly_and_keeps_the_others() -> None:
    images = _images(64, 8, 8)
    out = _views(_plain(hflip=0.5), 8, images)
    x = _as_float(images)
    kept = (out - x).abs().amax(dim=(1, 2, 3)) < 1e-6
    mirrored = (out - x.flip(-1)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert torch.all(kept | mirrored)
    assert 16 < mirrored.sum() < 48


@pytest.mark.parametrize(("height", "width"), [(32, 32), (20, 30), (40, 12)])
def test_crop_boxes_fit_and_follow_scale_and_ratio(height: int, width: int) -> None:
    scale, ratio = (0.2, 0.9), (0.75, 4 / 3)
    boxes = sample_crop_boxes(4096, height, width, scale, ratio, torch.Generator().manual_seed(0))
    x1, y1, x2, y2 = boxes.unbind(1)
    w, h = x2 - x1, y2 - y1
    assert boxes.shape == (4096, 4) and boxes.dtype == torch.float32
    assert x1.min() >= 0 and y1.min() >= 0
    assert x2.max() <= width + 1e-4 and y2.max() <= height + 1e-4
    fraction = w * h / (height * width)
    assert fraction.min() >= scale[0] - 1e-5 and fraction.max() <= scale[1] + 1e-5
    assert (w / h).min() >= ratio[0] - 1e-5 and (w / h).max() <= ratio[1] + 1e-5
    # offsets are spread over the free room, not centred
    room = width - w
    assert ((x1 / room.clamp_min(1e-6))[room > 1]).std() > 0.2


def test_crop_falls_back_to_torchvision_central_box_when_no_try_fits() -> None:
    # ratio 3..4 on a square image: no box of area >= 90% fits, so torchvision's fallback applies
    boxes = sample_crop_boxes(8, 30, 30, (0.9, 1.0), (3.0, 4.0), torch.Generator().manual_seed(0))
    expected = torch.tensor([0.0, 10.0, 30.0, 20.0]).expand(8, 4)  # full width, height 30 / 3
    torch.testing.assert_close(boxes, expected)


# --- colour ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("ours", "theirs", "factors", "atol"),
    [
        (adjust_brightness, TF.adjust_brightness, [0.0, 0.6, 1.0, 1.4, 2.5, 0.9], 1e-6),
        (adjust_contrast, TF.adjust_contrast, [0.0, 0.6, 1.0, 1.4, 2.5, 0.9], 1e-5),
        (adjust_saturation, TF.adjust_saturation, [0.0, 0.6, 1.0, 1.4, 2.5, 0.9], 1e-5),
        (adjust_hue, TF.adjust_hue, [-0.5, -0.1, 0.0, 0.05, 0.3, 0.5], 1e-5),
    ],
)
def test_colour_ops_match_torchvision_per_sample(ours, theirs, factors: list[float], atol: float):
    x = _hard_colours(len(factors))
    out = ours(x, torch.tensor(factors))
    for image, got, factor in zip(x, out, factors, strict=True):
        torch.testing.assert_close(got, theirs(image, factor), rtol=0, atol=atol)


def test_grayscale_matches_torchvision() -> None:
    x = _hard_colours()
    torch.testing.assert_close(rgb_to_grayscale(x), TF.rgb_to_grayscale(x), rtol=0, atol=1e-6)


def test_hsv_matches_colorsys_and_round_trips() -> None:
    x = _hard_colours(2)
    hsv = rgb_to_hsv(x)
    pixels = x.permute(0, 2, 3, 1).reshape(-1, 3).tolist()
    expected = torch.tensor([colorsys.rgb_to_hsv(*p) for p in pixels])
    torch.testing.assert_close(hsv.permute(0, 2, 3, 1).reshape(-1, 3), expected, atol=1e-6, rtol=0)
    torch.testing.assert_close(hsv_to_rgb(hsv), x, rtol=0, atol=1e-6)


def test_grayscale_prob_one_makes_every_view_gray() -> None:
    cfg = AugmentConfig(grayscale_prob=1.0)
    out = _views(cfg, 16, _images(8, 16, 16))
    assert torch.equal(out[:, 0], out[:, 1]) and torch.equal(out[:, 1], out[:, 2])


def test_jitter_prob_half_changes_some_images_and_leaves_the_others_exactly() -> None:
    images = _images(64, 8, 8)
    cfg = _plain(jitter_prob=0.5)
    out = _views(cfg, 8, images)
    unchanged = (out - _as_float(images)).abs().amax(dim=(1, 2, 3)) < 1e-6
    assert 16 < unchanged.sum() < 48


# --- blur -----------------------------------------------------------------------------------------


def test_blur_kernel_size_is_about_a_tenth_odd_and_at_least_three() -> None:
    assert [blur_kernel_size(s) for s in (8, 32, 96, 224)] == [3, 3, 11, 23]


def test_blur_with_tiny_sigma_is_the_identity() -> None:
    x = torch.rand(4, 3, 16, 16)
    torch.testing.assert_close(gaussian_blur(x, torch.full((4,), 1e-3), 5), x, rtol=0, atol=1e-6)


def test_blur_matches_torchvision_per_sample_and_smooths() -> None:
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    sigmas = [0.3, 1.0, 2.0]
    out = gaussian_blur(x, torch.tensor(sigmas), 5)
    for image, got, sigma in zip(x, out, sigmas, strict=True):
        expected = TF.gaussian_blur(image, [5, 5], [sigma, sigma])
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
    assert torch.all(out.var(dim=(1, 2, 3)) < x.var(dim=(1, 2, 3)))
    assert out.var(dim=(1, 2, 3))[2] < out.var(dim=(1, 2, 3))[0]  # larger sigma, smoother


def test_blur_prob_one_smooths_the_views() -> None:
    images = _images(16, 32, 32)
    sharp = _views(_plain(crop_scale=(0.2, 1.0), crop_ratio=(0.75, 4 / 3)), 32, images)
    blurred = _views(
        _plain(
            crop_scale=(0.2, 1.0), crop_ratio=(0.75, 4 / 3), blur_prob=1.0, blur_sigma=(1.0, 2.0)
        ),
        32,
        images,
    )
    # blur comes last, so both draw the same crops; blurring lowers every image's variance
    assert torch.all(blurred.var(dim=(1, 2, 3)) < sharp.var(dim=(1, 2, 3)))


# --- CUDA -----------------------------------------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_views_on_cuda_are_reproducible_and_match_cpu_ops() -> None:
    images = _images(64, 20, 20).cuda()
    cfg = AugmentConfig(blur_prob=0.5)
    out = _views(cfg, 16, images, seed=5)
    assert out.device.type == "cuda" and out.shape == (64, 3, 16, 16) and out.dtype == torch.float32
    assert out.min() >= 0 and out.max() <= 1
    assert torch.equal(out, _views(cfg, 16, images, seed=5))
    x, factors = _hard_colours(), torch.tensor([-0.5, -0.1, 0.0, 0.05, 0.3, 0.5])
    for op in (adjust_brightness, adjust_contrast, adjust_saturation):
        torch.testing.assert_close(op(x.cuda(), factors.cuda() + 1).cpu(), op(x, factors + 1))
    torch.testing.assert_close(adjust_hue(x.cuda(), factors.cuda()).cpu(), adjust_hue(x, factors))
