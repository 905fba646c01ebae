"""The ``prepare`` stage: load a source, clean it, split it, write the prepared format.

Every source (``digits``, ``cifar10``, ``stl10``, ``npz``, ``imagefolder``, ``pairs``) becomes the
same thing: images resized to ``image_size`` x ``image_size`` RGB, exact duplicates dropped so
that no image can land in two splits, and a stratified, seeded train/val/test split in which every
class appears in every split (a caption file without labels is split as one pool, every ``y``
:data:`UNLABELLED`, no classes). The output directory holds::

    train.npz, val.npz, test.npz   x uint8 (N, H, W, 3), y int64 (N,)
    manifest.json                  classes, counts, train mean/std, content hashes, what was dropped
    captions.json, tokenizer.json  ``pairs`` only: each image's captions per split, and the BPE
                                   tokenizer learned from the training captions

Outputs are deterministic (no timestamps, uncompressed ``np.savez``), so the same params give
byte-identical files and ``data_hash`` identifies the prepared data downstream. The directory is
built beside its target and renamed into place at the end: a failure leaves an earlier good
output untouched. Bad params or files raise :class:`~contrastive.config.ConfigError` with one
line naming the key or file, before any heavy work where possible.
"""

from __future__ import annotations

import hashlib
import json
import struct
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from tokenizers import Tokenizer

from contrastive import paths
from contrastive.config import ConfigError, DataConfig
from contrastive.files import atomic_path, write_json
from contrastive.text import TOKENIZER_FILE, load_tokenizer, save_tokenizer, train_tokenizer

SPLITS = ("train", "val", "test")
UNLABELLED = -1
"""The ``y`` of every image of data without classes (a caption file with no ``label`` column)."""
CAPTIONS = "captions.json"
"""``pairs``: ``{split: [[caption, ...] per image]}`` in the prepared folder."""
TOKENIZER = TOKENIZER_FILE
"""``pairs``: the BPE tokenizer learned from the training captions, in the prepared folder."""

_NPZ_HELP = "give an .npz file with x uint8 (N,H,W,C) and y int (N,)"
_FOLDER_HELP = (
    "give a folder with one sub-folder of images per class, "
    "or train/ and test/ each holding class sub-folders"
)
_TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "stl10": "stl10_binary"}


@dataclass
class _Loaded:
    """Images as a source delivers them, already converted to the prepared size and RGB."""

    x: np.ndarray  # uint8 (N, S, S, 3)
    y: np.ndarray  # int64 (N,), values in 0..len(classes)-1; all UNLABELLED when classes is empty
    classes: list[str]
    is_test: np.ndarray | None = None  # bool (N,): the source's own test split; None if it has none
    skipped: list[dict[str, str]] = field(default_factory=list)
    captions: list[list[str]] | None = None  # ``pairs``: each image's captions, cleaned
    captions_from: str | None = None  # ``pairs``: "file" or "templates"


# --- public API ---------------------------------------------------------------------------------


def prepare(
    cfg: DataConfig,
    seed: int,
    out_dir: str | Path = paths.PREPARED,
    raw_dir: str | Path = "data/raw",
) -> dict[str, Any]:
    """Load ``cfg.source``, clean and split it, write ``out_dir``; return the manifest.

    ``raw_dir`` is where cifar10/stl10 live when ``cfg.path`` is not set. ``seed`` alone decides
    the split. Raises :class:`ConfigError` for bad params or input; ``out_dir`` is then left as it
    was.
    """
    loaded = _LOADERS[cfg.source](cfg, Path(raw_dir))
    where = f"data.path: {cfg.path}" if cfg.path else f"data.source: {cfg.source}"

    keep, duplicates = _deduplicate(loaded.x, loaded.y)
    x, y = loaded.x[keep], loaded.y[keep]
    is_test = None if loaded.is_test is None else loaded.is_test[keep]
    if loaded.classes:
        _check_classes(y, is_test, loaded.classes, where)
    elif len(y) < len(SPLITS):
        raise ConfigError(f"{where}: {len(y)} distinct readable images; at least "
                          f"{len(SPLITS)} are needed, one per split")

    indices = _split(y, is_test, cfg, seed, loaded.classes)
    arrays = {name: (x[idx], y[idx]) for name, idx in indices.items()}
    manifest = _manifest(cfg, seed, loaded, arrays, duplicates, test_given=is_test is not None)

    split_captions = None
    if loaded.captions is not None:
        kept = [loaded.captions[i] for i in keep.tolist()]
        split_captions = {name: [kept[i] for i in idx.tolist()] for name, idx in indices.items()}
        manifest["captions"] = _caption_summary(split_captions, loaded.captions_from,
                                                cfg.vocab_size)
        identity = manifest["data_hash"] + manifest["captions"]["hash"]
        manifest["data_hash"] = hashlib.sha256(identity.encode()).hexdigest()

    with atomic_path(out_dir) as tmp:
        tmp.mkdir()
        for name, (split_x, split_y) in arrays.items():
            np.savez(tmp / f"{name}.npz", x=split_x, y=split_y)
        if split_captions is not None:
            write_json(tmp / CAPTIONS, split_captions)
            train_captions = (c for image in split_captions["train"] for c in image)
            save_tokenizer(train_tokenizer(train_captions, cfg.vocab_size), tmp / TOKENIZER)
        write_json(tmp / "manifest.json", manifest)
    return manifest


def has_labels(manifest: dict[str, Any]) -> bool:
    """Whether the prepared data have classes; only a caption file without a ``label`` column
    has none, and then only image-text Recall@K can measure a model of it."""
    return manifest["num_classes"] > 0


def load_captions(prepared_dir: str | Path) -> dict[str, list[list[str]]] | None:
    """Each split's captions, per image in the split's order; None for data without captions."""
    path = Path(prepared_dir) / CAPTIONS
    return json.loads(path.read_text()) if path.is_file() else None


def load_prepared_tokenizer(prepared_dir: str | Path) -> Tokenizer | None:
    """The tokenizer ``prepare`` learned from the training captions; None without captions."""
    path = Path(prepared_dir) / TOKENIZER
    return load_tokenizer(path) if path.is_file() else None


def _caption_summary(split_captions: dict[str, list[list[str]]], source: str | None,
                     vocab_size: int) -> dict[str, Any]:
    """For the manifest: where the captions come from, how many each split has, the tokenizer's
    size, and a hash of both (part of ``data_hash``)."""
    identity = json.dumps({"captions": split_captions, "vocab_size": vocab_size})
    return {
        "from": source,
        "counts": {name: sum(len(c) for c in images) for name, images in split_captions.items()},
        "vocab_size": vocab_size,
        "hash": hashlib.sha256(identity.encode()).hexdigest(),
    }


def load_split(prepared_dir: str | Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Read one prepared split: ``x`` uint8 (N, H, W, 3) and ``y`` int64 (N,)."""
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' unknown; allowed: {', '.join(SPLITS)}")
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.is_file():
        raise ConfigError(f"{path}: prepared split not found; run the prepare stage first")
    with np.load(path, allow_pickle=False) as npz:
        x, y = npz["x"], npz["y"]
    if x.dtype != np.uint8 or x.ndim != 4 or x.shape[3] != 3 or y.dtype != np.int64:
        raise ConfigError(f"{path}: not in the prepared format; run the prepare stage again")
    return x, y


@dataclass(frozen=True)
class MappedArray:
    """Where an array of an uncompressed ``.npz`` lies in the file: enough to map it from any
    process (a DataLoader worker reopens it from these four fields; the mapping itself is never
    pickled)."""

    path: str
    offset: int
    dtype: str
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * np.dtype(self.dtype).itemsize

    def open(self) -> np.ndarray:
        """The array as a copy-on-write memory map: rows are read from disk when touched, and
        the result is writable (torch.from_numpy warns on read-only arrays) without ever
        writing to the file."""
        return np.memmap(self.path, np.dtype(self.dtype), "c", self.offset, self.shape)


def map_npz_member(path: str | Path, name: str) -> MappedArray:
    """Locate array ``name`` of the ``.npz`` at ``path`` without reading it.

    ``np.savez`` stores each array as ``name.npy`` in a ZIP_STORED member: its bytes are the
    ``.npy`` file as is, at the member's local header offset + 30 + the lengths of the header's
    file name and extra field (the zip64 extra field of large members included). The ``.npy``
    header that follows gives dtype, shape and where the data start. Compressed members
    (``np.savez_compressed``) and Fortran order cannot be mapped: :class:`ConfigError`.
    """
    path = Path(path)
    try:
        with zipfile.ZipFile(path) as archive:
            info = archive.getinfo(f"{name}.npy")
    except (OSError, zipfile.BadZipFile, KeyError) as exc:
        raise ConfigError(f"{path}: cannot map '{name}' ({type(exc).__name__}: {exc})") from None
    if info.compress_type != zipfile.ZIP_STORED:
        raise ConfigError(
            f"{path}: '{name}' is compressed and cannot be memory-mapped; "
            "write it with np.savez (uncompressed), as the prepare stage does"
        )
    with path.open("rb") as handle:
        handle.seek(info.header_offset)
        local = handle.read(30)
        if local[:4] != b"PK\x03\x04":
            raise ConfigError(f"{path}: bad zip local header for '{name}'")
        name_length, extra_length = struct.unpack("<HH", local[26:30])
        handle.seek(info.header_offset + 30 + name_length + extra_length)
        version = np.lib.format.read_magic(handle)
        read_header = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, fortran_order, dtype = read_header(handle)
        offset = handle.tell()
    if fortran_order or dtype.hasobject:
        raise ConfigError(f"{path}: '{name}' is Fortran-ordered or of objects; cannot map it")
    return MappedArray(str(path), offset, dtype.str, tuple(int(d) for d in shape))


def map_split(prepared_dir: str | Path, split: str) -> tuple[MappedArray, np.ndarray]:
    """One prepared split without reading its images: where ``x`` lies (uint8 (N, H, W, 3)),
    and ``y`` int64 (N,) read into memory (8 bytes an image). For splits larger than memory."""
    if split not in SPLITS:
        raise ConfigError(f"split '{split}' unknown; allowed: {', '.join(SPLITS)}")
    path = Path(prepared_dir) / f"{split}.npz"
    if not path.is_file():
        raise ConfigError(f"{path}: prepared split not found; run the prepare stage first")
    x = map_npz_member(path, "x")
    with np.load(path, allow_pickle=False) as npz:
        y = npz["y"]  # reads this member only
    if (
        np.dtype(x.dtype) != np.uint8 or len(x.shape) != 4 or x.shape[3] != 3
        or y.dtype != np.int64 or len(y) != x.shape[0]
    ):
        raise ConfigError(f"{path}: not in the prepared format; run the prepare stage again")
    return x, y


def load_manifest(prepared_dir: str | Path) -> dict[str, Any]:
    """Read ``manifest.json`` of a prepared directory."""
    path = Path(prepared_dir) / "manifest.json"
    if not path.is_file():
        raise ConfigError(f"{path}: prepared manifest not found; run the prepare stage first")
    return json.loads(path.read_text())


# --- sources ------------------------------------------------------------------------------------


def _load_digits(cfg: DataConfig, raw_dir: Path) -> _Loaded:
    """scikit-learn's 1,797 8x8 digits (values 0..16): offline, the default source."""
    from sklearn.datasets import load_digits  # slow import (~3 s); only this source needs it

    bunch = load_digits()
    x = np.rint(bunch.images * 255 / 16).astype(np.uint8)
    y = bunch.target.astype(np.int64)
    return _Loaded(standardize_images(x, cfg.image_size), y, [str(k) for k in range(10)])


def _load_torchvision(cfg: DataConfig, raw_dir: Path) -> _Loaded:
    """CIFAR-10 or STL-10 (labelled part) in torchvision's format; their test split is kept."""
    root = Path(cfg.path or raw_dir)
    folder = root / _TORCHVISION_FOLDERS[cfg.source]
    missing = (
        f"data.path: {cfg.source} files not found or corrupted in {folder}; "
        f"set data.download: true, or place the torchvision files under {root}"
    )
    if not cfg.download and not folder.is_dir():
        raise ConfigError(missing)
    try:
        train_x, train_y, classes = _open_torchvision(cfg.source, root, False, cfg.download)
        test_x, test_y, _ = _open_torchvision(cfg.source, root, True, False)
    except Exception as exc:  # network, archive and integrity errors all mean "no usable files"
        if not cfg.download:
            raise ConfigError(missing) from None
        reason = " ".join(f"{type(exc).__name__}: {exc}".split())
        raise ConfigError(
            f"data.download: getting {cfg.source} into {root} failed ({reason}); "
            f"place the torchvision files under {root}"
        ) from None
    x = standardize_images(np.concatenate([train_x, test_x]), cfg.image_size)
    y = np.concatenate([train_y, test_y]).astype(np.int64)
    is_test = np.repeat([False, True], [len(train_y), len(test_y)])
    return _Loaded(x, y, classes, is_test)


def _open_torchvision(
    source: str, root: Path, test: bool, download: bool
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """One split of a torchvision dataset as (x uint8 NHWC, y, class names)."""
    from torchvision import datasets  # slow import; only these sources need it

    if source == "cifar10":
        cifar = datasets.CIFAR10(root, train=not test, download=download)
        return np.asarray(cifar.data), np.asarray(cifar.targets), list(cifar.classes)
    stl = datasets.STL10(root, split="test" if test else "train", download=download)
    classes = list(getattr(stl, "classes", [])) or [str(k) for k in range(10)]
    return stl.data.transpose(0, 2, 3, 1), np.asarray(stl.labels), classes


def _load_npz(cfg: DataConfig, raw_dir: Path) -> _Loaded:
    """``data.path`` (and ``data.test_path``, which then becomes the test split) as .npz files."""
    files = {"data.path": str(cfg.path)}
    if cfg.test_path:
        files["data.test_path"] = cfg.test_path
    read = {key: _read_npz(key, Path(path)) for key, path in files.items()}

    named = [(key, names) for key, (_, _, names) in read.items() if names is not None]
    if len(named) == 2 and named[0][1] != named[1][1]:
        raise ConfigError(
            f"data.test_path: {cfg.test_path}: key 'classes' differs from the one in data.path"
        )
    highest = max(int(y.max()) for _, y, _ in read.values())
    classes = named[0][1] if named else [str(k) for k in range(highest + 1)]
    for key, (_, y, _) in read.items():
        if y.max() >= len(classes):
            raise ConfigError(
                f"{key}: {files[key]}: key 'y' has label {y.max()}, but 'classes' names only "
                f"{len(classes)} classes; labels must be 0..{len(classes) - 1}"
            )

    x = np.concatenate([standardize_images(x, cfg.image_size) for x, _, _ in read.values()])
    y = np.concatenate([y for _, y, _ in read.values()]).astype(np.int64)
    is_test = None
    if cfg.test_path:
        sizes = [len(y) for _, y, _ in read.values()]
        is_test = np.repeat([False, True], sizes)
    return _Loaded(x, y, classes, is_test)


def _read_npz(key: str, path: Path) -> tuple[np.ndarray, np.ndarray, list[str] | None]:
    """Read and validate one .npz file; errors name the params key, the file and the array."""
    where = f"{key}: {path}"
    if path.is_dir():
        raise ConfigError(f"{where} is a folder; an .npz file is expected: {_NPZ_HELP}")
    if not path.is_file():
        raise ConfigError(f"{where} does not exist; {_NPZ_HELP}")
    try:
        npz = np.load(path, allow_pickle=False)
    except Exception as exc:  # zip, format and pickle errors all mean "not a usable .npz"
        raise ConfigError(
            f"{where}: not a readable .npz ({type(exc).__name__}); {_NPZ_HELP}"
        ) from None
    if not isinstance(npz, np.lib.npyio.NpzFile):
        raise ConfigError(f"{where}: a single array, not an .npz archive; {_NPZ_HELP}")
    with npz:
        for name in ("x", "y"):
            if name not in npz.files:
                raise ConfigError(f"{where}: key '{name}' missing (has {npz.files}); {_NPZ_HELP}")
        try:
            x, y = npz["x"], npz["y"]
            names = npz["classes"] if "classes" in npz.files else None
        except ValueError:  # object arrays need pickle, which is never allowed for input data
            raise ConfigError(f"{where}: holds pickled objects; {_NPZ_HELP}") from None

    if x.dtype != np.uint8:
        raise ConfigError(f"{where}: key 'x' has dtype {x.dtype}; it must be uint8 (0..255)")
    if not (x.ndim == 3 or (x.ndim == 4 and x.shape[3] in (1, 3))) or 0 in x.shape[1:3]:
        raise ConfigError(
            f"{where}: key 'x' has shape {x.shape}; allowed: (N,H,W) or (N,H,W,C), C 1 or 3"
        )
    if y.ndim != 1 or not np.issubdtype(y.dtype, np.integer):
        raise ConfigError(
            f"{where}: key 'y' is {y.dtype} {y.shape}; it must be integer labels (N,)"
        )
    if len(x) != len(y):
        raise ConfigError(f"{where}: keys 'x' and 'y' differ in length ({len(x)} vs {len(y)})")
    if len(y) == 0:
        raise ConfigError(f"{where}: key 'x' holds no images; {_NPZ_HELP}")
    if y.min() < 0:
        raise ConfigError(f"{where}: key 'y' has label {y.min()}; labels must be 0..K-1")

    classes = None
    if names is not None:
        if names.ndim != 1 or names.dtype.kind not in "US":
            raise ConfigError(f"{where}: key 'classes' must be a 1-D array of strings")
        classes = [n.decode() if isinstance(n, bytes) else str(n) for n in names.tolist()]
        if len(set(classes)) != len(classes):
            raise ConfigError(f"{where}: key 'classes' repeats a name; names must be unique")
    return x, y, classes


def _load_imagefolder(cfg: DataConfig, raw_dir: Path) -> _Loaded:
    """A folder of class sub-folders, or train/ and test/ each holding class sub-folders."""
    root = Path(str(cfg.path))
    if not root.is_dir():
        raise ConfigError(f"data.path: {root} is not a folder; {_FOLDER_HELP}")
    top = [p.name for p in _subfolders(root)]
    if sorted(top) == ["test", "train"]:
        pools = [root / "train", root / "test"]
        classes = sorted({p.name for pool in pools for p in _subfolders(pool)})
    else:
        pools, classes = [root], top

    images: list[np.ndarray] = []
    labels: list[int] = []
    in_test: list[bool] = []
    skipped: list[dict[str, str]] = []
    for i, pool in enumerate(pools):
        pool_images, pool_labels = _read_class_folders(pool, root, classes, cfg.image_size, skipped)
        images += pool_images
        labels += pool_labels
        in_test += [i == 1] * len(pool_images)
    if not images:
        raise ConfigError(
            f"data.path: {root} holds no readable image ({len(skipped)} files skipped); "
            f"{_FOLDER_HELP}"
        )
    is_test = np.array(in_test) if len(pools) == 2 else None
    x = np.stack(images)
    return _Loaded(x, np.array(labels, dtype=np.int64), classes, is_test, skipped)


def _subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _read_class_folders(
    folder: Path, root: Path, classes: list[str], size: int, skipped: list[dict[str, str]]
) -> tuple[list[np.ndarray], list[int]]:
    """Read every file under ``folder/<class>/``; files that fail to decode go to ``skipped``."""
    for path in sorted(folder.iterdir()):
        if path.is_file() and not path.name.startswith("."):
            skipped.append(
                {"file": path.relative_to(root).as_posix(), "reason": "not in a class folder"}
            )
    images: list[np.ndarray] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        class_dir = folder / name
        if not class_dir.is_dir():
            continue
        for path in sorted(class_dir.rglob("*")):
            hidden = any(part.startswith(".") for part in path.relative_to(class_dir).parts)
            if hidden or not path.is_file():
                continue
            relative = path.relative_to(root).as_posix()
            try:
                images.append(read_image(path, size))
            except Exception as exc:  # any decoder failure means: skip this file and say why
                reason = " ".join(f"{type(exc).__name__}: {exc}".split())
                reason = reason.replace(str(path), relative)
                skipped.append({"file": relative, "reason": reason})
                continue
            labels.append(label)
    return images, labels


def read_image(path: Path, size: int) -> np.ndarray:
    """Decode a whole image file (truncated files raise), upright, RGB, resized: uint8 (S, S, 3).

    16-bit greyscale (PIL modes ``I;16*``, and ``I`` as older Pillow opens such PNGs) is scaled to
    8 bits (65535 -> 255): PIL's own conversion clips every value above 255, leaving a nearly
    black-and-white image.
    """
    with Image.open(path) as image:
        upright = ImageOps.exif_transpose(image)
        if upright.mode == "I" or upright.mode.startswith("I;16"):
            wide = np.clip(np.asarray(upright).astype(np.float64), 0, 65535)
            upright = Image.fromarray(np.rint(wide / 257).astype(np.uint8))
        rgb = upright.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(rgb)


def _load_pairs(cfg: DataConfig, raw_dir: Path) -> _Loaded:
    """Images with captions: a caption file (:func:`contrastive.captions.read_pairs`), or the
    images of an ``.npz`` (unset: the digits) captioned from their class names by CLIP's prompt
    templates, a stand-in for real captions that needs no download."""
    from contrastive import captions

    suffix = Path(cfg.path).suffix.lower() if cfg.path else None
    if suffix in captions.SUFFIXES:
        pairs, x = captions.read_pairs(cfg.path, cfg.image_size)
        if pairs.labels is None:  # the usual layout (COCO, Flickr30k): captions are the labels
            classes, y = [], np.full(len(x), UNLABELLED, dtype=np.int64)
        else:
            classes = sorted(set(pairs.labels))
            y = np.array([classes.index(label) for label in pairs.labels], dtype=np.int64)
        skipped = [{"reason": reason, "count": str(count)}
                   for reason, count in sorted(pairs.skipped.items())]
        return _Loaded(x, y, classes, skipped=skipped, captions=pairs.captions,
                       captions_from="file")
    if suffix not in (None, ".npz"):
        raise ConfigError(
            f"data.path: {cfg.path}: data.source 'pairs' reads a caption file "
            f"({', '.join(captions.SUFFIXES)}) or an .npz whose class names become captions"
        )
    loaded = _load_npz(cfg, raw_dir) if cfg.path else _load_digits(cfg, raw_dir)
    per_class = [captions.templated_captions(name) for name in loaded.classes]
    loaded.captions = [per_class[k] for k in loaded.y.tolist()]
    loaded.captions_from = "templates"
    return loaded


_LOADERS: dict[str, Callable[[DataConfig, Path], _Loaded]] = {
    "digits": _load_digits,
    "cifar10": _load_torchvision,
    "stl10": _load_torchvision,
    "npz": _load_npz,
    "imagefolder": _load_imagefolder,
    "pairs": _load_pairs,
}


# --- cleaning and splitting ---------------------------------------------------------------------


def standardize_images(x: np.ndarray, size: int) -> np.ndarray:
    """Images as the prepare stage stores them (also for galleries and anomaly scoring):
    uint8 (N, H, W), (N, H, W, 1) or (N, H, W, 3) -> uint8 (N, size, size, 3)."""
    if x.ndim == 3:
        x = x[..., None]
    if x.shape[3] == 1:
        x = np.repeat(x, 3, axis=3)
    if x.shape[1:3] == (size, size):
        return np.ascontiguousarray(x)
    # PIL's bilinear resize averages over the whole footprint when shrinking (antialiased) and
    # works in integer arithmetic, so it gives the same bytes on every machine; ~40 us per image.
    out = np.empty((len(x), size, size, 3), dtype=np.uint8)
    for i, image in enumerate(x):
        resized = Image.fromarray(image).resize((size, size), Image.Resampling.BILINEAR)
        out[i] = np.asarray(resized)
    return out


def _deduplicate(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, dict[str, int]]:
    """Indices of the first occurrence of each distinct image, and counts of what was dropped.

    Duplicates are byte-identical images (after resizing); the first one is kept even when a
    later copy carries another label, and those conflicts are counted apart.
    """
    first: dict[bytes, int] = {}
    keep: list[int] = []
    conflicting = 0
    for i, image in enumerate(x):
        j = first.setdefault(hashlib.sha256(image.tobytes()).digest(), i)
        if j == i:
            keep.append(i)
        elif y[j] != y[i]:
            conflicting += 1
    removed = {"total": len(x) - len(keep), "conflicting_labels": conflicting}
    return np.array(keep, dtype=np.int64), removed


def _check_classes(
    y: np.ndarray, is_test: np.ndarray | None, classes: list[str], where: str
) -> None:
    """At least two classes, and enough images in each for one in every split."""
    if len(classes) < 2:
        raise ConfigError(f"{where}: found {len(classes)} class(es) {classes}; need at least two")
    counts = np.bincount(y, minlength=len(classes))
    test_counts = np.bincount(y[is_test], minlength=len(classes)) if is_test is not None else None
    for k, name in enumerate(classes):
        if test_counts is None and counts[k] < 3:
            raise ConfigError(
                f"{where}: class '{name}' has {counts[k]} images after cleaning (unreadable files "
                "and duplicates dropped); each class needs at least 3, one per split"
            )
        if test_counts is not None and (counts[k] - test_counts[k] < 2 or test_counts[k] < 1):
            raise ConfigError(
                f"{where}: class '{name}' has {counts[k] - test_counts[k]} train and "
                f"{test_counts[k]} test images after cleaning; each class needs at least 2 train "
                "(train and val) and 1 test image"
            )


def _split(
    y: np.ndarray, is_test: np.ndarray | None, cfg: DataConfig, seed: int, classes: list[str]
) -> dict[str, np.ndarray]:
    """Stratified split: per class, a seeded permutation cut into test, val and train.

    Each split gets at least one image of each class. When the source has its own test split,
    only val is cut, as ``val_fraction`` of the training pool. Data without classes are cut as
    one pool. Indices come back sorted, so the order inside a split follows the source.
    """
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in SPLITS}
    groups = [(f"class '{name}'", y == k) for k, name in enumerate(classes)]
    for name, members in groups or [("the data", np.ones(len(y), dtype=bool))]:
        if is_test is None:
            pool = rng.permutation(np.flatnonzero(members))
            n_test = max(1, round(len(pool) * cfg.test_fraction))
        else:
            pool = rng.permutation(np.flatnonzero(members & ~is_test))
            n_test = 0
            parts["test"].append(np.flatnonzero(members & is_test))
        n_val = max(1, round(len(pool) * cfg.val_fraction))
        if len(pool) - n_test - n_val < 1:
            raise ConfigError(
                f"data.val_fraction, data.test_fraction: {cfg.val_fraction} and "
                f"{cfg.test_fraction} leave no training image of {name} "
                f"({len(pool)} images); lower them or add images"
            )
        parts["test"].append(pool[:n_test])
        parts["val"].append(pool[n_test : n_test + n_val])
        parts["train"].append(pool[n_test + n_val :])
    return {name: np.sort(np.concatenate(part)) for name, part in parts.items()}


# --- manifest -----------------------------------------------------------------------------------


def _manifest(
    cfg: DataConfig,
    seed: int,
    loaded: _Loaded,
    arrays: dict[str, tuple[np.ndarray, np.ndarray]],
    duplicates: dict[str, int],
    test_given: bool,
) -> dict[str, Any]:
    """Everything downstream needs to know about the prepared data; no timestamps."""
    classes = loaded.classes
    counts = {  # per class; empty for data without classes
        split: dict(zip(classes, np.bincount(y[y >= 0], minlength=len(classes)).tolist(),
                        strict=True))
        for split, (_, y) in arrays.items()
    }
    totals = {split: len(y) for split, (_, y) in arrays.items()}
    totals["all"] = sum(totals.values())
    hashes = {
        split: {"x": _sha256(x), "y": _sha256(y), "shape": list(x.shape)}
        for split, (x, y) in arrays.items()
    }
    identity = json.dumps({"classes": classes, "splits": hashes}, sort_keys=True)
    mean, std = _channel_stats(arrays["train"][0])
    return {
        "source": cfg.source,
        "image_size": cfg.image_size,
        "classes": classes,
        "num_classes": len(classes),
        "split": {
            "seed": seed,
            "val_fraction": cfg.val_fraction,
            "test_fraction": cfg.test_fraction,
            "test_from": "source" if test_given else "split",
        },
        "counts": counts,
        "totals": totals,
        "mean": mean,
        "std": std,
        "hashes": hashes,
        "data_hash": hashlib.sha256(identity.encode()).hexdigest(),
        "duplicates_removed": duplicates,
        "skipped": loaded.skipped,
    }


def _sha256(array: np.ndarray) -> str:
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()


def _channel_stats(x: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and std in [0, 1] scale, exact (from a 256-bin histogram per channel)."""
    values = np.arange(256) / 255
    mean, std = [], []
    for c in range(3):
        counts = np.bincount(x[..., c].ravel(), minlength=256)
        m = counts @ values / counts.sum()
        v = counts @ (values - m) ** 2 / counts.sum()
        mean.append(round(float(m), 6))
        std.append(round(float(np.sqrt(v)), 6))
    return mean, std
