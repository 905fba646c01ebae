"""Image-caption pairs: the caption files of ``data.source: pairs``, and CLIP's prompt templates.

Image-text contrastive learning (CLIP) needs images with captions. They come in the layouts the
field exports, one image path and one caption per row:

- ``.tsv``: tab-separated with a header (open_clip's CSV loader default, columns ``filepath`` and
  ``title``); ``.csv``: the same, comma-separated; ``.jsonl``: one JSON object per line;
- the image column is ``filepath``, ``image`` or ``image_path``; the caption column ``title``,
  ``caption`` or ``text``; an optional ``label`` column gives each image's class.

Image paths are relative to the caption file's folder (not the working directory) and must
resolve inside it, so that the folder is the whole data set. Several rows with one image give it
several captions. A missing or undecodable image is skipped and counted, since large scraped sets
always have some; everything else that is wrong (no caption, a missing column, a path outside the
folder, conflicting labels, bad JSON) is a :class:`~contrastive.config.ConfigError` of one line
naming the file and the line. Captions keep their case; only whitespace is cleaned here (the
tokenizer lower-cases when it encodes). Nothing is written by this module.

When there are no captions, :func:`templated_captions` makes them from class names with CLIP's
prompt templates (:data:`TEMPLATES`), as CLIP does for zero-shot classification.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from contrastive.config import ConfigError

SUFFIXES = (".csv", ".tsv", ".jsonl")
IMAGE_COLUMNS = ("filepath", "image", "image_path")
CAPTION_COLUMNS = ("title", "caption", "text")
LABEL_COLUMN = "label"

TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a blurry photo of a {}.",
    "a black and white photo of a {}.",
    "a low contrast photo of a {}.",
    "a high contrast photo of a {}.",
    "a bad photo of a {}.",
    "a good photo of a {}.",
    "a photo of a small {}.",
    "a photo of a big {}.",
    "a photo of the {}.",
    "a blurry photo of the {}.",
    "a black and white photo of the {}.",
    "a low contrast photo of the {}.",
    "a high contrast photo of the {}.",
    "a bad photo of the {}.",
    "a good photo of the {}.",
    "a photo of the small {}.",
    "a photo of the big {}.",
)
"""CLIP's prompt templates for CIFAR (Radford et al. 2021, the prompt-engineering notebook): the
captions of a class name, for zero-shot classification and for the templated stand-in data."""

_LINE_BREAK = re.compile(r"\r\n|\r|\n")


def templated_captions(class_name: str, templates: Sequence[str] = TEMPLATES) -> list[str]:
    """The class name (underscores as spaces) in every template, in the templates' order."""
    name = class_name.replace("_", " ")
    return [template.format(name) for template in templates]


@dataclass(frozen=True)
class Pairs:
    """What a caption file holds, per distinct readable image in first-seen order."""

    images: list[Path]
    """Resolved, unique, in the order their first row comes in the file."""
    captions: list[list[str]]
    """Each image's cleaned captions, in row order; at least one an image."""
    labels: list[str] | None
    """Each image's ``label``; None when the file has no labels."""
    skipped: dict[str, int]
    """Images left out, by reason: ``missing image``, ``unreadable image``."""
    rows: int
    """Data rows read (blank lines and wholly empty rows not counted)."""


def read_pairs(path: str | Path, image_size: int) -> tuple[Pairs, np.ndarray]:
    """The pairs of caption file ``path`` and their images, uint8 ``(N, S, S, 3)`` in
    ``Pairs.images`` order, each image read once by :func:`contrastive.data.read_image`.

    Raises :class:`ConfigError` (one line naming the file, and the line where it is about one)
    for an unknown suffix, a missing file, bad JSON or CSV, a missing image or caption column, an
    empty caption or image path, a path outside the file's folder, an image with two labels, rows
    with and without labels, no rows, or no readable image.
    """
    from contrastive.data import read_image  # data imports this module; keep the graph one-way

    if image_size < 1:
        raise ValueError(f"image_size must be at least 1, got {image_size}")
    path = Path(path)
    if path.suffix.lower() not in SUFFIXES:
        raise ConfigError(f"{path}: unknown caption file type '{path.suffix}'; "
                          f"allowed: {', '.join(SUFFIXES)}")
    if not path.is_file():
        raise ConfigError(f"{path}: caption file not found")
    folder = path.parent.resolve()

    order: dict[Path, int] = {}  # image -> its index in the lists below
    written: list[str] = []  # each image's path as the file gives it, for messages
    captions: list[list[str]] = []
    labels: list[tuple[str, int] | None] = []  # (label, line it was first given on)
    labelled = unlabelled = None  # the first line with a label, the first without one
    rows = 0
    for line, row in _rows(path):
        rows += 1
        image_key = _key(row, IMAGE_COLUMNS, path, line)
        caption_key = _key(row, CAPTION_COLUMNS, path, line)
        caption = _clean(_text(row, caption_key, path, line))
        if not caption:
            raise ConfigError(f"{path}: line {line}: empty caption; every row needs one")
        given = _text(row, image_key, path, line).strip()
        if not given:
            raise ConfigError(f"{path}: line {line}: empty image path; every row needs one")
        try:
            image = (folder / given).resolve()
        except (OSError, RuntimeError, ValueError) as exc:  # a NUL byte, a symlink loop
            raise ConfigError(f"{path}: line {line}: image {given!r} is no usable path "
                              f"({type(exc).__name__}: {exc})") from None
        if not image.is_relative_to(folder):
            raise ConfigError(f"{path}: line {line}: image '{given}' lies outside the caption "
                              f"file's folder; give paths inside {folder}")
        label = _clean(_text(row, LABEL_COLUMN, path, line)) if LABEL_COLUMN in row else ""
        if label:
            labelled = labelled or line
        else:
            unlabelled = unlabelled or line
        if labelled and unlabelled:
            raise ConfigError(f"{path}: line {unlabelled}: no label, but line {labelled} has "
                              "one; give every row a label, or none")

        if image not in order:
            order[image] = len(captions)
            written.append(given)
            captions.append([])
            labels.append((label, line) if label else None)
        index = order[image]
        first = labels[index]
        if first is not None and first[0] != label:
            raise ConfigError(f"{path}: line {line}: image '{given}' has label '{label}' here "
                              f"but '{first[0]}' on line {first[1]}; one image, one label")
        captions[index].append(caption)
    if rows == 0:
        raise ConfigError(f"{path}: no rows; give a row per caption with an image column "
                          f"({' or '.join(IMAGE_COLUMNS)}) and a caption column "
                          f"({' or '.join(CAPTION_COLUMNS)})")

    skipped: dict[str, int] = {}
    example: dict[str, str] = {}  # reason -> the first image skipped for it
    kept: list[tuple[Path, int]] = []
    arrays: list[np.ndarray] = []
    for image, index in order.items():
        reason = None
        if not image.is_file():
            reason = "missing image"
        else:
            try:
                arrays.append(read_image(image, image_size))
            except Exception:  # any decoder failure means: skip this image and count it
                reason = "unreadable image"
        if reason is None:
            kept.append((image, index))
        else:
            skipped[reason] = skipped.get(reason, 0) + 1
            example.setdefault(reason, written[index])
    if not kept:
        counts = ", ".join(f"{n} {reason} (e.g. '{example[reason]}')"
                           for reason, n in skipped.items())
        raise ConfigError(f"{path}: none of its {len(order)} images could be read ({counts}); "
                          f"image paths are relative to {folder}")

    image_labels = [labels[i] for _, i in kept]
    pairs = Pairs(
        images=[image for image, _ in kept],
        captions=[captions[i] for _, i in kept],
        labels=None if labelled is None else [lab[0] for lab in image_labels if lab is not None],
        skipped=skipped,
        rows=rows,
    )
    return pairs, np.stack(arrays)


# --- reading rows -------------------------------------------------------------------------------


def _rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    """``(line, row)`` for each data row of a caption file, ``line`` counting the file's lines
    from 1 (a CSV header is line 1) where the row starts; blank lines and wholly empty rows are
    skipped."""
    try:
        if path.suffix.lower() == ".jsonl":
            yield from _json_rows(path)
        else:
            yield from _csv_rows(path, "\t" if path.suffix.lower() == ".tsv" else ",")
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{path}: not UTF-8 text ({exc.reason} at byte {exc.start}); "
                          "save it as UTF-8") from None


def _json_rows(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    with path.open(encoding="utf-8-sig") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as exc:
                raise ConfigError(f"{path}: line {line}: not JSON ({exc.msg} at column "
                                  f"{exc.colno}); give one JSON object per line") from None
            if not isinstance(row, dict):
                raise ConfigError(f"{path}: line {line}: a JSON {type(row).__name__}, not an "
                                  "object with an image and a caption")
            yield line, row


def _csv_rows(path: Path, delimiter: str) -> Iterator[tuple[int, dict[str, Any]]]:
    # utf-8-sig: spreadsheet exports start with a byte-order mark, which would rename column 1
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            header = reader.fieldnames
            if not header:
                return  # an empty file: no rows
            reader.fieldnames = [name.strip() for name in header]
            for names in (IMAGE_COLUMNS, CAPTION_COLUMNS):
                _key(dict.fromkeys(reader.fieldnames), names, path, None)
            for row in reader:
                values = [v for v in row.values() if isinstance(v, str)]
                if all(not v.strip() for v in values):
                    continue
                breaks = sum(len(_LINE_BREAK.findall(v)) for v in values)
                yield reader.line_num - breaks, row
        except csv.Error as exc:
            kind = "TSV" if delimiter == "\t" else "CSV"
            raise ConfigError(f"{path}: line {reader.line_num}: not {kind} ({exc})") from None


def _key(row: dict[str, Any], names: Sequence[str], path: Path, line: int | None) -> str:
    """The one of ``names`` (the image or the caption columns) that ``row`` has: none or two is
    a ConfigError, naming ``line`` unless it is None (a CSV header)."""
    found = [name for name in names if name in row]
    where = f"{path}: line {line}" if line is not None else str(path)
    what = "image" if names == IMAGE_COLUMNS else "caption"
    if len(found) > 1:
        raise ConfigError(f"{where}: both {' and '.join(map(repr, found))} given as the {what} "
                          "column; keep one")
    if not found:
        present = ", ".join(repr(str(k)) for k in row if k is not None) or "none"
        raise ConfigError(f"{where}: no {what} column; accepted: "
                          f"{', '.join(map(repr, names))}; found {present}")
    return found[0]


def _text(row: dict[str, Any], key: str, path: Path, line: int) -> str:
    """``row[key]`` as text: a missing or null value is empty, a JSON number becomes its digits,
    anything else (a list, an object, true/false) is a ConfigError."""
    value = row.get(key)
    if value is None:
        return ""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ConfigError(f"{path}: line {line}: '{key}' is a {type(value).__name__}; "
                          "give a string")
    return str(value)


def _clean(text: str) -> str:
    """Runs of whitespace (tabs, newlines, non-breaking spaces) as one space, the ends stripped.

    Not :func:`contrastive.text.clean`: that one needs the trained tokenizer, and also applies
    NFKC and lower case, which encoding does anyway; captions are stored as written.
    """
    return " ".join(text.split())
