"""Tests for the caption files of ``data.source: pairs`` (contrastive.captions): the three
layouts, paths relative to the file, skipped images, and one-line errors for bad input."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from contrastive.captions import TEMPLATES, Pairs, read_pairs, templated_captions
from contrastive.config import ConfigError

SIZE = 8
COLOURS = {"red.png": (255, 0, 0), "green.png": (0, 255, 0), "blue.png": (0, 0, 255)}


def write_images(folder: Path, names: list[str] | None = None) -> None:
    """Plain-coloured 4x4 PNGs (so resizing to SIZE keeps the colour exactly)."""
    for name in names or list(COLOURS):
        target = folder / name
        target.parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (4, 4), COLOURS[Path(name).name]).save(target)


def write_table(path: Path, header: list[str], rows: list[list[str]]) -> Path:
    delimiter = "\t" if path.suffix == ".tsv" else ","
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle, delimiter=delimiter)
        writer.writerow(header)
        writer.writerows(rows)
    return path


def write_jsonl(path: Path, rows: list[object]) -> Path:
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def one_line_error(path: Path, match: str, size: int = SIZE) -> str:
    """read_pairs(path) raises a one-line ConfigError matching ``match`` and naming the file."""
    with pytest.raises(ConfigError, match=match) as info:
        read_pairs(path, size)
    message = str(info.value)
    assert "\n" not in message
    assert path.name in message
    return message


def pixel(x: np.ndarray, i: int) -> tuple[int, ...]:
    assert (x[i] == x[i, 0, 0]).all()  # a plain image stays plain
    return tuple(int(v) for v in x[i, 0, 0])


# --- templates ----------------------------------------------------------------------------------


def test_templated_captions_put_the_class_name_with_spaces_in_every_template() -> None:
    captions = templated_captions("sports_car")
    assert len(TEMPLATES) == 18 and len(set(TEMPLATES)) == 18
    assert all(t.count("{}") == 1 for t in TEMPLATES)
    assert len(captions) == len(TEMPLATES)
    assert captions[0] == "a photo of a sports car."
    assert captions[-1] == "a photo of the big sports car."
    assert all("sports car" in c and "_" not in c for c in captions)
    assert templated_captions("dog", ("{} here", "a {}")) == ["dog here", "a dog"]


# --- round trips --------------------------------------------------------------------------------


def check_round_trip(pairs: Pairs, x: np.ndarray, folder: Path) -> None:
    assert pairs.images == [(folder / n).resolve() for n in ("red.png", "img/green.png")]
    assert pairs.captions == [["A red square", "red, again"], ["Green thing"]]
    assert pairs.rows == 3
    assert pairs.skipped == {}
    assert x.dtype == np.uint8 and x.shape == (2, SIZE, SIZE, 3)
    assert pixel(x, 0) == (255, 0, 0) and pixel(x, 1) == (0, 255, 0)


@pytest.mark.parametrize(
    ("suffix", "header"),
    [(".tsv", ["filepath", "title"]), (".csv", ["image", "caption"]),
     (".csv", ["image_path", "text"])],
)
def test_csv_and_tsv_round_trip(tmp_path: Path, suffix: str, header: list[str]) -> None:
    write_images(tmp_path, ["red.png", "img/green.png"])
    path = write_table(tmp_path / f"pairs{suffix}", header, [
        ["red.png", "  A red \t square "],
        ["img/green.png", "Green\n thing"],  # a quoted field with a line break
        ["red.png", "red, again"],
    ])
    pairs, x = read_pairs(path, SIZE)
    check_round_trip(pairs, x, tmp_path)
    assert pairs.labels is None


def test_jsonl_round_trip_skips_blank_lines(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png", "img/green.png"])
    path = tmp_path / "pairs.jsonl"
    path.write_text(
        json.dumps({"image": "red.png", "caption": "A red\u00a0 square"}) + "\n\n   \n"
        + json.dumps({"image": "img/green.png", "caption": " Green thing "}) + "\n"
        + json.dumps({"image": "./red.png", "caption": "red, again", "extra": 1}) + "\n",
        encoding="utf-8",
    )
    pairs, x = read_pairs(path, SIZE)
    check_round_trip(pairs, x, tmp_path)


def test_csv_with_byte_order_mark_and_empty_rows(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = tmp_path / "pairs.csv"
    path.write_text("\ufefffilepath,title\n\n,\n red.png ,a red square\n", encoding="utf-8")
    pairs, x = read_pairs(path, SIZE)
    assert pairs.rows == 1 and pairs.captions == [["a red square"]] and len(x) == 1


def test_captions_keep_their_case(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"image": "red.png", "text": "A RED Square"}])
    assert read_pairs(path, SIZE)[0].captions == [["A RED Square"]]


def test_labels_per_image(tmp_path: Path) -> None:
    write_images(tmp_path)
    path = write_table(tmp_path / "pairs.csv", ["filepath", "title", "label"], [
        ["blue.png", "blue one", " sky "],
        ["red.png", "red one", "fire"],
        ["blue.png", "blue two", "sky"],
        ["green.png", "green one", "grass"],
    ])
    pairs, x = read_pairs(path, SIZE)
    assert [p.name for p in pairs.images] == ["blue.png", "red.png", "green.png"]
    assert pairs.labels == ["sky", "fire", "grass"]
    assert pairs.captions == [["blue one", "blue two"], ["red one"], ["green one"]]
    assert [pixel(x, i) for i in range(3)] == [(0, 0, 255), (255, 0, 0), (0, 255, 0)]


def test_jsonl_numeric_labels_become_text(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png", "blue.png"])
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "red.png", "caption": "r", "label": 3},
        {"image": "blue.png", "caption": "b", "label": 7},
    ])
    assert read_pairs(path, SIZE)[0].labels == ["3", "7"]


# --- paths --------------------------------------------------------------------------------------


def test_paths_are_relative_to_the_file_not_the_cwd(tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    data = tmp_path / "data"
    data.mkdir()
    write_images(data, ["img/red.png"])
    elsewhere = tmp_path / "elsewhere"
    write_images(elsewhere, ["img/blue.png"])
    (elsewhere / "img" / "blue.png").rename(elsewhere / "img" / "red.png")  # a decoy in the cwd
    path = write_table(data / "pairs.tsv", ["filepath", "title"], [["img/red.png", "red"]])
    monkeypatch.chdir(elsewhere)
    pairs, x = read_pairs(Path("..") / "data" / "pairs.tsv", SIZE)
    assert pairs.images == [(data / "img" / "red.png").resolve()]
    assert pairs.images[0].is_absolute()
    assert pixel(x, 0) == (255, 0, 0)
    assert read_pairs(str(path), SIZE)[0] == pairs  # a str path works too


def test_an_absolute_path_inside_the_folder_is_allowed(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = write_table(tmp_path / "pairs.csv", ["image", "caption"],
                       [[str((tmp_path / "red.png").resolve()), "red"], ["red.png", "again"]])
    pairs, _ = read_pairs(path, SIZE)
    assert pairs.images == [(tmp_path / "red.png").resolve()]  # one image: the same file
    assert pairs.captions == [["red", "again"]]


@pytest.mark.parametrize("outside", ["../red.png", "img/../../red.png", "ABSOLUTE"])
def test_a_path_outside_the_folder_names_the_line(tmp_path: Path, outside: str) -> None:
    data = tmp_path / "data"
    write_images(data, ["red.png"])
    write_images(tmp_path, ["red.png"])  # it exists: the path is refused, not skipped
    if outside == "ABSOLUTE":
        outside = str(tmp_path / "red.png")
    path = write_table(data / "pairs.csv", ["image", "caption"],
                       [["red.png", "fine"], [outside, "outside"]])
    message = one_line_error(path, r"line 3: image .* lies outside")
    assert outside in message


# --- skipped images -----------------------------------------------------------------------------


def test_missing_and_unreadable_images_are_skipped_and_counted(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png", "blue.png"])
    (tmp_path / "broken.png").write_bytes(b"not a png at all")
    data = (tmp_path / "blue.png").read_bytes()
    (tmp_path / "truncated.png").write_bytes(data[: len(data) // 2])
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "gone.png", "caption": "missing"},
        {"image": "red.png", "caption": "red"},
        {"image": "broken.png", "caption": "broken"},
        {"image": "also/gone.png", "caption": "missing too"},
        {"image": "truncated.png", "caption": "truncated"},
        {"image": "blue.png", "caption": "blue"},
        {"image": "gone.png", "caption": "missing, second caption"},
    ])
    pairs, x = read_pairs(path, SIZE)
    assert pairs.skipped == {"missing image": 2, "unreadable image": 2}
    assert [p.name for p in pairs.images] == ["red.png", "blue.png"]
    assert pairs.captions == [["red"], ["blue"]]
    assert pairs.rows == 7
    assert len(x) == 2 and pixel(x, 0) == (255, 0, 0) and pixel(x, 1) == (0, 0, 255)


def test_no_readable_image_is_an_error(tmp_path: Path) -> None:
    (tmp_path / "broken.png").write_bytes(b"nope")
    path = write_table(tmp_path / "pairs.tsv", ["filepath", "title"],
                       [["gone.png", "a"], ["broken.png", "b"], ["gone.png", "c"]])
    message = one_line_error(path, "none of its 2 images could be read")
    assert "1 missing image (e.g. 'gone.png')" in message
    assert "1 unreadable image" in message


# --- bad input ----------------------------------------------------------------------------------


def test_unknown_suffix_lists_the_allowed_ones(tmp_path: Path) -> None:
    path = tmp_path / "pairs.json"
    path.write_text("[]")
    one_line_error(path, r"allowed: \.csv, \.tsv, \.jsonl")


def test_a_missing_caption_file(tmp_path: Path) -> None:
    one_line_error(tmp_path / "nothing.csv", "caption file not found")


@pytest.mark.parametrize(
    ("header", "missing", "accepted"),
    [(["path", "title"], "image", "'filepath', 'image', 'image_path'"),
     (["filepath", "description"], "caption", "'title', 'caption', 'text'")],
)
def test_a_missing_column_lists_the_accepted_names(tmp_path: Path, header: list[str],
                                                   missing: str, accepted: str) -> None:
    path = write_table(tmp_path / "pairs.csv", header, [["a.png", "a"]])
    message = one_line_error(path, f"no {missing} column; accepted: {accepted}")
    assert repr(header[0]) in message  # and what it found


def test_a_missing_column_is_found_even_without_rows(tmp_path: Path) -> None:
    path = write_table(tmp_path / "pairs.tsv", ["img", "title"], [])
    one_line_error(path, "no image column")


def test_a_missing_key_in_jsonl_names_the_line(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = write_jsonl(tmp_path / "pairs.jsonl",
                       [{"image": "red.png", "caption": "a"}, {"image": "red.png", "txt": "b"}])
    one_line_error(path, r"line 2: no caption column; accepted: 'title', 'caption', 'text'")


def test_two_image_columns_are_ambiguous(tmp_path: Path) -> None:
    path = write_table(tmp_path / "pairs.csv", ["image", "filepath", "title"], [["a", "b", "c"]])
    one_line_error(path, "both 'filepath' and 'image'")


@pytest.mark.parametrize("caption", ["", "   ", "\t \t"])
def test_an_empty_caption_names_the_line(tmp_path: Path, caption: str) -> None:
    write_images(tmp_path, ["red.png"])
    rows = [["red.png", f"caption {k}"] for k in range(3)] + [["red.png", caption]]
    path = write_table(tmp_path / "pairs.csv", ["image", "caption"], rows)
    one_line_error(path, "line 5: empty caption; every row needs one")


def test_an_empty_caption_in_jsonl_names_its_line(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "red.png", "caption": "a"}\n\n{"image": "red.png", "caption": null}'
                    "\n", encoding="utf-8")
    one_line_error(path, "line 3: empty caption")


def test_lines_count_a_caption_broken_over_lines(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    rows = [["red.png", "one\ntwo\nthree"], ["../red.png", "four\r\nfive"], ["red.png", " "]]
    path = write_table(tmp_path / "pairs.csv", ["image", "caption"], rows)
    one_line_error(path, "line 5: image '../red.png' lies outside")  # where its row starts
    path = write_table(tmp_path / "pairs.csv", ["image", "caption"], rows[:1] + rows[2:])
    one_line_error(path, "line 5: empty caption")


def test_an_empty_image_path_names_the_line(tmp_path: Path) -> None:
    path = write_table(tmp_path / "pairs.tsv", ["filepath", "title"], [[" ", "a caption"]])
    one_line_error(path, "line 2: empty image path")


def test_bad_json_names_the_line(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"image": "red.png", "caption": "a"}\n{"image": "red.png", "caption": }\n',
                    encoding="utf-8")
    one_line_error(path, "line 2: not JSON")


def test_a_json_line_that_is_no_object(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [["red.png", "a caption"]])
    one_line_error(path, "line 1: a JSON list, not an object")


def test_a_caption_that_is_no_string(tmp_path: Path) -> None:
    path = write_jsonl(tmp_path / "pairs.jsonl", [{"image": "red.png", "caption": ["a", "b"]}])
    one_line_error(path, "line 1: 'caption' is a list; give a string")


def test_a_file_that_is_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "pairs.csv"
    path.write_bytes("image,caption\nred.png,caf\u00e9\n".encode("latin-1"))
    one_line_error(path, "not UTF-8 text")


@pytest.mark.parametrize("text", ["", "filepath\ttitle\n", "\n\n"])
def test_a_file_without_rows(tmp_path: Path, text: str) -> None:
    path = tmp_path / "pairs.tsv"
    path.write_text(text)
    one_line_error(path, "no rows")


def test_an_image_with_two_labels_names_both_lines(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png", "blue.png"])
    path = write_jsonl(tmp_path / "pairs.jsonl", [
        {"image": "red.png", "caption": "a", "label": "fire"},
        {"image": "blue.png", "caption": "b", "label": "sky"},
        {"image": "red.png", "caption": "c", "label": "blood"},
    ])
    one_line_error(path, "line 3: image 'red.png' has label 'blood' here but 'fire' on line 1")


def test_rows_with_and_without_labels(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png", "blue.png"])
    path = write_table(tmp_path / "pairs.csv", ["image", "caption", "label"],
                       [["red.png", "a", "fire"], ["blue.png", "b", ""]])
    one_line_error(path, "line 3: no label, but line 2 has one")


def test_an_empty_label_column_means_no_labels(tmp_path: Path) -> None:
    write_images(tmp_path, ["red.png"])
    path = write_table(tmp_path / "pairs.csv", ["image", "caption", "label"],
                       [["red.png", "a", ""]])
    assert read_pairs(path, SIZE)[0].labels is None
