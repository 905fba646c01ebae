"""SimCLR random views, drawn independently for every image and applied to whole batches.

The recipe is SimCLR's (Chen, Kornblith, Norouzi and Hinton, "A Simple Framework for Contrastive
Learning of Visual Representations", ICML 2020, arXiv:2002.05709, appendix A): random resized
crop, horizontal flip, colour jitter applied with probability 0.8 (brightness, contrast and
saturation 0.8 s, hue 0.2 s for strength s), random grayscale with probability 0.2 and Gaussian
blur (kernel 10% of the image side, sigma ~ U(0.1, 2.0)). The numbers come from
:class:`~contrastive.config.AugmentConfig`; its defaults are SimCLR's CIFAR-10 setting (strength
s = 0.5 and no blur, appendix B.9) with a crop scale of at least 0.2.

Why not torchvision: its v2 transforms draw *one* set of random parameters per call, so applied to
a batch every image would get the same crop, flip and jitter, and applying them image by image in a
DataLoader is slow. Here every operation draws a parameter per sample and is one tensor operation
on the whole batch, on whatever device holds the images. All randomness comes from the caller's
``torch.Generator``, so the same generator state gives exactly the same views (reproducible runs,
exact resume).

A view is drawn first (:meth:`SimCLRViews.draw`: every random number, for the whole batch, in a
fixed order) and then applied (:meth:`SimCLRViews.apply`), on the CPU a cache-sized chunk of
images at a time, the chunks spread over one single-threaded worker per CPU thread (see
:data:`CPU_CHUNK_PIXELS`).

The small per-sample functions (:func:`adjust_brightness`, :func:`adjust_hue`, ...) follow the
maths of ``torchvision.transforms.v2.functional`` and are public so the tests can compare them.
Where this module deliberately differs from torchvision:

- crop boxes are not rounded to whole pixels, and the resize is ``roi_align``'s bilinear sampling
  with an adaptive number of samples per output pixel (see :func:`resized_crop`) instead of
  ``resize(antialias=True)``: the same when enlarging, a milder anti-aliasing when shrinking;
- colour jitter applies brightness, contrast, saturation, hue in this fixed order, where
  torchvision's ``ColorJitter`` shuffles the order on every call;
- the grayscale weights are torchvision's (0.2989, 0.587, 0.114), not exactly ITU-R 601-2's 0.299.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.machinery
import importlib.util
import math
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from contrastive.config import AugmentConfig

CROP_TRIES = 10
"""Candidate boxes drawn per image, as in torchvision's ``RandomResizedCrop``."""

GRAY_WEIGHTS = (0.2989, 0.587, 0.114)
"""Luma weights of ``torchvision``'s ``rgb_to_grayscale`` (ITU-R 601-2, red rounded to 0.2989)."""

_TINY = torch.finfo(torch.float32).tiny


def _per_sample(values: torch.Tensor) -> torch.Tensor:
    """(N,) -> (N, 1, 1, 1), to broadcast one value per image over (N, C, H, W)."""
    return values.view(-1, 1, 1, 1)


def _uniform(
    n: int, low: float, high: float, generator: torch.Generator, device: torch.device
) -> torch.Tensor:
    """N float32 samples from U(low, high)."""
    return torch.rand(n, generator=generator, device=device).mul_(high - low).add_(low)


def _equal(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a == b`` as 0.0 / 1.0 in a float tensor (a weight for :func:`torch.lerp`).

    Written straight into a float tensor: on the CPU this is several times faster than a bool mask,
    and a 0/1 ``lerp`` weight is several times faster than ``torch.where``.
    """
    return torch.eq(a, b, out=torch.empty_like(a))


def _select(mask: torch.Tensor, if_true: torch.Tensor, if_false: torch.Tensor) -> torch.Tensor:
    """Per image, ``if_true[i]`` where ``mask[i]`` else ``if_false[i]``; like ``torch.where``.

    ``torch.lerp`` with a weight of exactly 0 or 1 returns exactly one of its inputs, and is about
    four times faster than ``torch.where`` on the CPU.
    """
    return torch.lerp(if_false, if_true, _per_sample(mask.to(if_true.dtype)))


def _coin(n: int, p: float, generator: torch.Generator, device: torch.device) -> torch.Tensor:
    """N booleans, each True with probability ``p``."""
    return torch.rand(n, generator=generator, device=device) < p


# --- geometry -------------------------------------------------------------------------------------


def sample_crop_boxes(
    n: int,
    height: int,
    width: int,
    scale: tuple[float, float],
    ratio: tuple[float, float],
    generator: torch.Generator,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Draw one ``RandomResizedCrop`` box per image; returns float32 (N, 4) ``x1, y1, x2, y2``.

    Same distribution as torchvision's rejection loop, vectorised: every image gets
    :data:`CROP_TRIES` candidates with area fraction ~ U(scale) and log aspect ratio ~ U(log ratio);
    the first candidate that fits inside the image is kept, and an image whose candidates all fail
    gets torchvision's fallback (the largest central box whose aspect ratio lies within ``ratio``).
    The offset is uniform over the room left. Unlike torchvision, sides and offsets are not rounded
    to whole pixels: :func:`resized_crop` samples sub-pixel positions anyway.
    Box coordinates are pixel edges: ``(0, 0, width, height)`` is the whole image.
    """
    area = float(height * width)
    target_area = area * _uniform(n * CROP_TRIES, *scale, generator, device)
    log_ratio = _uniform(n * CROP_TRIES, math.log(ratio[0]), math.log(ratio[1]), generator, device)
    aspect = torch.exp(log_ratio)
    w = torch.sqrt(target_area * aspect).view(n, CROP_TRIES)  # (N, tries)
    h = torch.sqrt(target_area / aspect).view(n, CROP_TRIES)
    fits = (w <= width) & (h <= height)
    first = fits.int().argmax(dim=1, keepdim=True)  # index of the first fitting try (0 if none)
    w = w.gather(1, first).squeeze(1)
    h = h.gather(1, first).squeeze(1)

    # torchvision's fallback when no try fits: a central crop, clamped to the allowed ratios.
    in_ratio = width / height
    if in_ratio < min(ratio):
        fallback_w, fallback_h = float(width), width / min(ratio)
    elif in_ratio > max(ratio):
        fallback_w, fallback_h = height * max(ratio), float(height)
    else:
        fallback_w, fallback_h = float(width), float(height)
    found = fits.any(dim=1)
    w = torch.where(found, w, fallback_w)
    h = torch.where(found, h, fallback_h)

    offset = torch.rand(2, n, generator=generator, device=device)
    x1 = torch.where(found, offset[0] * (width - w), (width - w) / 2)
    y1 = torch.where(found, offset[1] * (height - h), (height - h) / 2)
    return torch.stack((x1, y1, x1 + w, y1 + h), dim=1)


def resized_crop(images: torch.Tensor, boxes: torch.Tensor, size: int) -> torch.Tensor:
    """Crop box ``i`` out of image ``i`` and resize it to ``size`` x ``size``, for all i at once.

    ``images``: float (N, C, H, W); ``boxes``: float (N, 4) ``x1, y1, x2, y2`` in pixel edges.
    One ``roi_align`` call with ``aligned=True`` (pixel centres at half-integers, as in
    ``interpolate(align_corners=False)``) and ``sampling_ratio=0``: each output pixel averages
    ceil(box side / size) bilinear samples per axis. When the crop is enlarged (the common case)
    that is one sample, plain bilinear interpolation, equal to torchvision's ``resize``, and an
    identity box returns the image unchanged; when it is shrunk the box average of the samples
    damps aliasing, less than the triangle filter of torchvision's ``antialias=True``. A fixed
    ``sampling_ratio=2`` would blur enlarged crops instead.
    """
    index = torch.arange(images.shape[0], device=boxes.device, dtype=boxes.dtype)
    rois = torch.cat((index[:, None], boxes), dim=1)  # (N, 5): batch index, x1, y1, x2, y2
    spatial_scale, sampling_ratio, aligned = 1.0, 0, True
    return _roi_align()(images, rois, spatial_scale, size, size, sampling_ratio, aligned)


@functools.cache
def _roi_align() -> Callable[..., torch.Tensor]:
    """torchvision's compiled ``roi_align`` kernel, loaded without importing torchvision.

    ``import torchvision`` (or ``torchvision.ops``) imports ``torch._dynamo``: about 1.7 s at the
    start of every pretraining here, for one kernel. The kernel (with its autograd) lives in
    torchvision's extension library, which this loads as ``torchvision.extension`` does; where
    that library is not found under a known name, torchvision itself is imported.
    """
    spec = importlib.util.find_spec("torchvision")  # finds the package without importing it
    if spec is not None and spec.submodule_search_locations:
        loaders = (importlib.machinery.ExtensionFileLoader, importlib.machinery.EXTENSION_SUFFIXES)
        finder = importlib.machinery.FileFinder(spec.submodule_search_locations[0], loaders)
        for name in ("_C_stable", "_C"):  # torchvision >= 0.29, and before
            library = finder.find_spec(name)
            if library is not None and library.origin is not None:
                torch.ops.load_library(library.origin)
                return torch.ops.torchvision.roi_align
    import torchvision.ops  # noqa: F401  (loads the library under whatever name it has)

    return torch.ops.torchvision.roi_align


def hflip(images: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """Mirror image ``i`` left-right where ``flip[i]`` is True; (N, C, H, W) -> same."""
    return _select(flip, images.flip(-1), images)


# --- colour (float images in [0, 1], (N, 3, H, W); one factor per image) --------------------------


def rgb_to_grayscale(images: torch.Tensor) -> torch.Tensor:
    """Luma of float RGB images: (N, 3, H, W) -> (N, 1, H, W), as torchvision computes it."""
    r, g, b = images.unbind(dim=1)
    wr, wg, wb = GRAY_WEIGHTS
    return r.mul(wr).add_(g, alpha=wg).add_(b, alpha=wb).unsqueeze(1)


def _blend(images: torch.Tensor, other: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """``factor * images + (1 - factor) * other``, clamped to [0, 1] (torchvision's ``_blend``)."""
    f = _per_sample(factors)
    return images.mul(f).add_(other * (1 - f)).clamp_(0, 1)


def adjust_brightness(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Scale image ``i`` by ``factors[i]`` (>= 0), clamped to [0, 1]."""
    return images.mul(_per_sample(factors)).clamp_(0, 1)


def adjust_contrast(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend image ``i`` with the mean of its grayscale version, by ``factors[i]`` (>= 0)."""
    mean = rgb_to_grayscale(images).mean(dim=(1, 2, 3), keepdim=True)
    return _blend(images, mean, factors)


def adjust_saturation(images: torch.Tensor, factors: torch.Tensor) -> torch.Tensor:
    """Blend image ``i`` with its grayscale version, by ``factors[i]`` (>= 0)."""
    return _blend(images, rgb_to_grayscale(images), factors)


def _hue_and_chroma(images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Hue in turns (in [-1/6, 5/6), not yet wrapped), value and chroma; each (N, H, W).

    Value is the largest channel, chroma the largest minus the smallest. Same conventions as
    torchvision's private ``_rgb2hsv``: a gray pixel gets hue 0 (its numerators are 0, so any
    positive divisor does), and ties for the largest channel favour red, then green.
    """
    r, g, b = images.unbind(dim=1)
    value = images.amax(dim=1)
    chroma = value - images.amin(dim=1)
    sixth = chroma.clamp_min(_TINY).mul_(6)
    hue_if_blue_max = (r - g).div_(sixth).add_(4 / 6)
    hue_if_green_max = (b - r).div_(sixth).add_(2 / 6)
    hue_if_red_max = (g - b).div_(sixth)
    hue = torch.lerp(hue_if_blue_max, hue_if_green_max, _equal(g, value))  # green before blue
    hue = torch.lerp(hue, hue_if_red_max, _equal(r, value))  # red before both
    return hue, value, chroma


def _rgb_from_hue(hue: torch.Tensor, value: torch.Tensor, chroma: torch.Tensor) -> torch.Tensor:
    """RGB (N, 3, H, W) from hue (turns, any real), value and chroma (= value * saturation).

    The closed form ``c = value - chroma * clamp(min(k, 4 - k), 0, 1)`` with
    ``k = (n + 6 hue) mod 6`` and ``n = 5, 3, 1`` for red, green, blue: the same numbers as
    torchvision's sector table in ``_hsv2rgb``, with no integer indexing.
    """
    n = torch.arange(5.0, 0.0, -2.0, device=hue.device).view(1, 3, 1, 1)
    k = hue.unsqueeze(1).mul(6) + n  # (N, 3, H, W)
    k = k.sub_(k.div(6).floor_().mul_(6))  # mod 6 (torch.remainder is several times slower)
    weight = torch.minimum(k, 4 - k).clamp_(0, 1)
    return value.unsqueeze(1) - chroma.unsqueeze(1) * weight


def rgb_to_hsv(images: torch.Tensor) -> torch.Tensor:
    """Float RGB (N, 3, H, W) in [0, 1] -> HSV, every channel in [0, 1] (hue in turns)."""
    hue, value, chroma = _hue_and_chroma(images)
    saturation = chroma / value.clamp_min(_TINY)  # 0 for black, where chroma is 0 too
    return torch.stack((hue.remainder_(1.0), saturation, value), dim=1)


def hsv_to_rgb(hsv: torch.Tensor) -> torch.Tensor:
    """HSV (N, 3, H, W), every channel in [0, 1] -> float RGB in [0, 1]."""
    hue, saturation, value = hsv.unbind(dim=1)
    return _rgb_from_hue(hue, value, value * saturation)


def adjust_hue(images: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of image ``i`` by ``shifts[i]`` turns (in [-0.5, 0.5]).

    torchvision's RGB -> HSV -> shift hue -> RGB, fused: value and chroma pass straight through,
    and the hue wraps into [0, 1) inside the conversion back.
    """
    hue, value, chroma = _hue_and_chroma(images)
    return _rgb_from_hue(hue.add_(shifts.view(-1, 1, 1)), value, chroma)


# --- blur -----------------------------------------------------------------------------------------


def blur_kernel_size(image_size: int) -> int:
    """SimCLR's kernel side: about 10% of the image side, odd, at least 3 (23 for 224)."""
    size = round(0.1 * image_size)
    return max(3, size if size % 2 else size + 1)


def gaussian_blur(images: torch.Tensor, sigmas: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """Blur image ``i`` with a Gaussian of std ``sigmas[i]``; (N, C, H, W) -> same.

    torchvision's kernel (weights exp(-t^2 / 2 sigma^2) at integer offsets t, normalised) and
    reflect padding, applied separably: a grouped conv with one kernel per (image, channel), first
    along the rows, then along the columns.
    """
    n, c, height, width = images.shape
    half = kernel_size // 2
    t = torch.arange(-half, half + 1, device=images.device, dtype=images.dtype)
    kernel = torch.softmax(-0.5 * (t / sigmas[:, None]).square(), dim=1)  # (N, k), rows sum to 1
    kernel = kernel.repeat_interleave(c, dim=0)  # (N * C, k): one kernel per image channel
    x = F.pad(images.reshape(1, n * c, height, width), (half, half, half, half), mode="reflect")
    x = F.conv2d(x, kernel.view(n * c, 1, 1, kernel_size), groups=n * c)
    x = F.conv2d(x, kernel.view(n * c, 1, kernel_size, 1), groups=n * c)
    return x.view(n, c, height, width)


# --- the views ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ViewParams:
    """The random parameters of one view of every image of a batch; ``None``: the op is skipped.

    Drawing them all first, then applying them, makes the result independent of how the batch is
    split into chunks (see :data:`CPU_CHUNK_PIXELS`).
    """

    boxes: torch.Tensor  # (N, 4) crop boxes x1, y1, x2, y2 in pixels
    flip: torch.Tensor | None = None  # (N,) bool
    jitter: torch.Tensor | None = None  # (N,) bool: colour jitter applied
    brightness: torch.Tensor | None = None  # (N,) factors, 1 where not jittered
    contrast: torch.Tensor | None = None  # (N,) factors, 1 where not jittered
    saturation: torch.Tensor | None = None  # (N,) factors, 1 where not jittered
    hue: torch.Tensor | None = None  # (N,) shifts in turns, used where jittered
    gray: torch.Tensor | None = None  # (N,) bool
    blur: torch.Tensor | None = None  # (N,) bool
    sigma: torch.Tensor | None = None  # (N,) blur standard deviation

    def __getitem__(self, rows: slice) -> ViewParams:
        """The parameters of images ``rows`` of the batch."""
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return ViewParams(**{k: None if v is None else v[rows] for k, v in fields.items()})


CPU_CHUNK_PIXELS = 128 * 32 * 32
"""Output pixels per chunk on the CPU (128 images of 32 x 32: 1.5 MB per float tensor).

On the CPU a view is computed a chunk of images at a time: each op is memory-bound and allocates
its output, and with small tensors the intermediates stay in the 2 MB L2 cache and the allocator
reuses their memory instead of faulting in fresh pages; measured about 2x faster than one pass over
512 images of 32 x 32. On CUDA the whole batch is one chunk.

The chunks run in parallel, one chunk per worker thread, and every op inside a chunk runs on that
one thread (:func:`_cpu_pool`). Spreading each op over torch's intra-op threads instead puts
about 40 tiny parallel regions (one per op) in every chunk, each ending in a barrier where all
threads wait for the slowest: on a machine whose cores are shared with other processes, one
descheduled thread stalls every op for a scheduler time slice, and views were measured 20x slower
than on one thread (bench/views.py, docs/benchmarks.md). Whole chunks per thread need no barrier
but the last one, and give the same numbers.
"""

_pool_lock = threading.Lock()
_pool: tuple[int, ThreadPoolExecutor] | None = None


def _forget_pool() -> None:
    """After a fork the child has none of the parent's threads: start a new pool when needed."""
    global _pool
    _pool = None


os.register_at_fork(after_in_child=_forget_pool)


def _cpu_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of ``workers`` threads whose torch ops each run on one thread (created once).

    ``torch.set_num_threads`` sets the calling thread's OpenMP thread count, and also a process-wide
    default that threads created later start from; every worker sets 1 for itself, then the
    default is put back, so the caller and any later thread keep their thread count.
    """
    global _pool
    with _pool_lock:
        if _pool is not None and _pool[0] == workers:
            return _pool[1]
        if _pool is not None:
            _pool[1].shutdown(wait=False)
        ready = threading.Barrier(workers + 1)

        def single_threaded() -> None:
            torch.get_num_threads()  # torch's lazy per-thread set-up first, so it cannot undo ours
            torch.set_num_threads(1)
            ready.wait()

        pool = ThreadPoolExecutor(workers, "simclr-views", initializer=single_threaded)
        for _ in range(workers):  # start every thread now: each waits in its initializer
            pool.submit(int)
        ready.wait()
        torch.set_num_threads(workers)  # the default for threads created from now on
        _pool = (workers, pool)
        return pool


class SimCLRViews:
    """SimCLR's random view of every image of a batch (Chen et al. 2020, appendix A).

    Call it twice on the same batch to get the two views of the contrastive pair. Operations run in
    SimCLR's order (crop, flip, colour jitter, grayscale, blur); each draws its parameters per image
    from the given generator, and one whose probability or strength is 0 is skipped entirely.
    """

    def __init__(self, cfg: AugmentConfig, image_size: int) -> None:
        self.cfg = cfg
        self.image_size = image_size
        self.blur_kernel_size = blur_kernel_size(image_size)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """One random view per image.

        ``images``: uint8 (N, H, W, 3) on any device (H, W may differ from ``image_size``);
        ``generator``: a ``torch.Generator`` on the same device, the only source of randomness.
        Returns float32 (N, 3, image_size, image_size) in [0, 1].
        """
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"expected uint8 images (N, H, W, 3), got {images.dtype} {tuple(images.shape)}"
            )
        if generator.device.type != images.device.type:
            raise ValueError(
                f"generator is on {generator.device} but images are on {images.device}"
            )
        n, height, width, _ = images.shape
        if images.device.type != "cpu":
            return self.apply(images, self.draw(n, height, width, generator))
        workers = torch.get_num_threads()
        chunk = max(1, min(CPU_CHUNK_PIXELS // self.image_size**2, -(-n // workers)))
        if workers == 1:
            params = self.draw(n, height, width, generator)
            parts = [self.apply(images[i : i + chunk], params[i : i + chunk])
                     for i in range(0, n, chunk)]
            return parts[0] if len(parts) == 1 else torch.cat(parts)
        # Everything runs on the single-threaded workers, even the draw (its small ops would
        # otherwise open intra-op parallel regions), and each worker writes its chunk into the
        # output itself: the calling thread only waits.
        pool = _cpu_pool(workers)
        params = pool.submit(self.draw, n, height, width, generator).result()
        out = torch.empty(n, 3, self.image_size, self.image_size, dtype=torch.float32)
        # Grad and inference mode are per thread: the workers run in the caller's.
        inference, grad = torch.is_inference_mode_enabled(), torch.is_grad_enabled()

        def one_chunk(i: int) -> None:
            with torch.inference_mode(inference), torch.set_grad_enabled(grad):
                out[i : i + chunk] = self.apply(images[i : i + chunk], params[i : i + chunk])

        for done in pool.map(one_chunk, range(0, n, chunk)):
            del done  # re-raises a worker's exception here
        return out

    def draw(self, n: int, height: int, width: int, generator: torch.Generator) -> ViewParams:
        """Draw the parameters of one view of ``n`` images of ``height`` x ``width``.

        Colour jitter follows torchvision's ``RandomApply([ColorJitter(b, c, s, h)], p)``: factors
        ~ U(max(0, 1 - b), 1 + b), hue shift ~ U(-h, h), drawn per image; images that are not
        jittered get the neutral factor 1, which is exactly the identity.
        """
        cfg, device = self.cfg, generator.device

        def uniform(low: float, high: float) -> torch.Tensor:
            return _uniform(n, low, high, generator, device)

        def coin(p: float) -> torch.Tensor:
            return _coin(n, p, generator, device)

        boxes = sample_crop_boxes(
            n, height, width, cfg.crop_scale, cfg.crop_ratio, generator, device
        )
        params: dict[str, torch.Tensor] = {"boxes": boxes}
        if cfg.hflip > 0:
            params["flip"] = coin(cfg.hflip)
        strengths = {
            "brightness": cfg.brightness,
            "contrast": cfg.contrast,
            "saturation": cfg.saturation,
        }
        if cfg.jitter_prob > 0 and (cfg.hue > 0 or any(v > 0 for v in strengths.values())):
            params["jitter"] = jitter = coin(cfg.jitter_prob)
            for name, strength in strengths.items():
                if strength > 0:
                    factors = uniform(max(0.0, 1 - strength), 1 + strength)
                    params[name] = torch.where(jitter, factors, 1.0)
            if cfg.hue > 0:
                params["hue"] = uniform(-cfg.hue, cfg.hue)
        if cfg.grayscale_prob > 0:
            params["gray"] = coin(cfg.grayscale_prob)
        if cfg.blur_prob > 0:
            params["blur"] = coin(cfg.blur_prob)
            params["sigma"] = uniform(*cfg.blur_sigma)
        return ViewParams(**params)

    def apply(self, images: torch.Tensor, params: ViewParams) -> torch.Tensor:
        """Apply drawn ``params`` to uint8 (N, H, W, 3) ``images``, in SimCLR's order.

        Colour jitter runs brightness, contrast, saturation, hue in this fixed order (torchvision
        shuffles the order per call).
        """
        # roi_align is linear, so crop the 0..255 values and scale only the (smaller) output.
        chw = images.permute(0, 3, 1, 2).to(torch.float32, memory_format=torch.contiguous_format)
        x = resized_crop(chw, params.boxes, self.image_size).div_(255)
        if params.flip is not None:
            x = hflip(x, params.flip)
        if params.brightness is not None:
            x = adjust_brightness(x, params.brightness)
        if params.contrast is not None:
            x = adjust_contrast(x, params.contrast)
        if params.saturation is not None:
            x = adjust_saturation(x, params.saturation)
        if params.hue is not None and params.jitter is not None:
            x = _select(params.jitter, adjust_hue(x, params.hue), x)
        if params.gray is not None:
            x = _select(params.gray, rgb_to_grayscale(x), x)
        if params.blur is not None and params.sigma is not None:
            x = _select(params.blur, gaussian_blur(x, params.sigma, self.blur_kernel_size), x)
        return x
