"""The layers of docs/architecture.md ("Where things go"), checked on the source: the CLI calls
the stages, the stages call the library, and nothing imports upwards; the modules that compute
write no file."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.test_stage_deps import PACKAGE, imports_of

CONTRASTIVE = PACKAGE / "contrastive"
STAGES = sorted((CONTRASTIVE / "stages").glob("*.py"))
ENTRY = [CONTRASTIVE / "cli.py"]
LIBRARY = sorted(f for f in CONTRASTIVE.rglob("*.py")
                 if f not in STAGES and f not in ENTRY)
COMPUTE = [CONTRASTIVE / f"{name}.py"
           for name in ("train", "evaluate", "export", "features", "crossmodal")]
COMPUTE += sorted((CONTRASTIVE / "methods").glob("*.py"))
"""Modules that compute and return: they leave writing to the stages and the callbacks."""

WRITERS = {"contrastive.files", "contrastive.plots", "contrastive.layout", "contrastive.paths"}
WRITING_CALLS = {"save", "savez", "savefig", "write_text", "write_bytes", "write_json",
                 "write_csv", "atomic_path"}
"""What writes a file: torch.save, np.savez, matplotlib, pathlib and our files module."""


def module_name(file: Path) -> str:
    parts = file.relative_to(PACKAGE).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(file: Path) -> set[str]:
    name = module_name(file)
    package = name if file.name == "__init__.py" else name.rpartition(".")[0]
    return imports_of(ast.parse(file.read_text()), package)


def upward(names: set[str], layer: tuple[str, ...]) -> list[str]:
    return sorted(n for n in names if any(n == top or n.startswith(f"{top}.") for top in layer))


def test_the_layers_are_what_the_walk_sees() -> None:
    """The check itself: every stage module and every compute module is found."""
    assert {f.stem for f in STAGES} >= {"prepare", "pretrain", "probe", "export", "register"}
    assert all(f.is_file() for f in COMPUTE) and len(LIBRARY) > 30
    assert "contrastive.stages.pretrain" in imported(CONTRASTIVE / "cli.py")


@pytest.mark.parametrize("file", LIBRARY, ids=lambda f: str(f.relative_to(CONTRASTIVE)))
def test_the_library_imports_no_stage_and_not_the_cli(file: Path) -> None:
    found = upward(imported(file), ("contrastive.stages", "contrastive.cli"))
    assert not found, f"{file.relative_to(PACKAGE)} imports {found}: the library lies below"


@pytest.mark.parametrize("file", STAGES, ids=lambda f: f.name)
def test_a_stage_imports_neither_the_cli_nor_another_stage(file: Path) -> None:
    others = tuple(f"contrastive.stages.{f.stem}" for f in STAGES if f != file)
    found = upward(imported(file), ("contrastive.cli", *others))
    assert not found, f"stages/{file.name} imports {found}"


def writes_of(tree: ast.AST, package: str) -> list[str]:
    """The file-writing modules that ``tree`` imports and the writing calls it makes."""
    calls = {
        node.func.attr if isinstance(node.func, ast.Attribute) else node.func.id
        for node in ast.walk(tree)
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute | ast.Name)
    }
    return upward(imports_of(tree, package), tuple(WRITERS)) + sorted(calls & WRITING_CALLS)


@pytest.mark.parametrize("file", COMPUTE, ids=lambda f: str(f.relative_to(CONTRASTIVE)))
def test_the_compute_modules_write_no_file(file: Path) -> None:
    found = writes_of(ast.parse(file.read_text()), module_name(file).rpartition(".")[0])
    if file.name == "export.py":  # the exporter's own file, in a temporary folder it removes
        found.remove("save")
    assert not found, f"{file.relative_to(PACKAGE)} writes: {found}"


def test_the_check_sees_a_write() -> None:
    source = "import torch\nfrom contrastive.files import write_json\ntorch.save({}, 'x')\n"
    assert writes_of(ast.parse(source), "contrastive") == [
        "contrastive.files", "contrastive.files.write_json", "save"]
