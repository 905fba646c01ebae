"""``dvc.yaml`` declares every project module a stage imports, so a code change reruns it."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest
import yaml

from contrastive import paths

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src"
STAGES = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]


def module_file(name: str) -> Path | None:
    """The source file of project module ``name`` (``contrastive.x.y``), or None if not ours."""
    if name != "contrastive" and not name.startswith("contrastive."):
        return None
    base = PACKAGE.joinpath(*name.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate
    return None


def imports_of(tree: ast.AST, package: str) -> set[str]:
    """Modules imported anywhere in ``tree`` (module level or inside functions)."""
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            module = node.module
            if node.level:  # relative import
                module = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1]
                                  + [module])
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def reachable(start: set[str], seen: set[Path]) -> set[Path]:
    """Files of every project module reachable from ``start``, with their parent packages;
    ``seen`` files count as found and are not walked."""
    seen = set(seen)
    todo = list(start)
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for depth in range(1, len(parts) + 1):  # importing a.b.c runs a and a.b first
            file = module_file(".".join(parts[:depth]))
            if file is None or file in seen:
                continue
            seen.add(file)
            package = ".".join(parts[:depth]) if file.name == "__init__.py" else ".".join(
                parts[: depth - 1])
            tree = ast.parse(file.read_text())
            todo.extend(imports_of(tree, package))
            if file.name == "__init__.py" and "pkgutil.iter_modules" in file.read_text():
                todo.extend(f"{'.'.join(parts[:depth])}.{p.stem}" for p in file.parent.glob("*.py"))
    return seen


def stage_modules(stage: str) -> set[Path]:
    """What ``contrastive <stage>`` imports: the CLI's module-level imports and those of the
    stage's handler (``cli._<stage>``), not the other handlers'."""
    cli = PACKAGE / "contrastive" / "cli.py"
    tree = ast.parse(cli.read_text())
    top = {n for n in imports_of(ast.Module(body=[s for s in tree.body
                                                   if isinstance(s, ast.Import | ast.ImportFrom)],
                                             type_ignores=[]), "contrastive")}
    handler = next(node for node in tree.body
                   if isinstance(node, ast.FunctionDef) and node.name == f"_{stage}")
    return reachable(top | imports_of(handler, "contrastive") | {"contrastive"}, {cli})


def declared(stage: str) -> list[Path]:
    return [ROOT / d for d in STAGES[stage].get("deps", [])]


@pytest.mark.parametrize("stage", list(STAGES))
def test_every_imported_module_is_a_dependency(stage: str) -> None:
    deps = declared(stage)
    missing = sorted(
        str(file.relative_to(ROOT))
        for file in stage_modules(stage)
        if not any(file == d or d in file.parents for d in deps)
    )
    assert not missing, f"dvc.yaml stage {stage} does not declare {missing}"


def test_the_walk_finds_what_a_stage_imports() -> None:
    """The check itself: pretrain reaches its stage module, the methods and the kNN monitor's
    features.py, and not the evaluation metrics: a change to a retrieval metric reruns the
    probe, not the pretraining."""
    found = {str(f.relative_to(PACKAGE)) for f in stage_modules("pretrain")}
    assert {"contrastive/stages/pretrain.py", "contrastive/train.py", "contrastive/features.py",
            "contrastive/config.py", "contrastive/methods/simclr.py", "contrastive/cli.py"} <= found
    assert not {"contrastive/registry.py", "contrastive/evaluate.py",
                "contrastive/retrieval.py", "contrastive/stages/probe.py"} & found


# Code a stage runs without importing it: the register stage logs service.py as the pyfunc model.
NOT_IMPORTED = {"register": {"src/contrastive/service.py"}}


@pytest.mark.parametrize("stage", list(STAGES))
def test_no_stage_declares_code_it_does_not_import(stage: str) -> None:
    """Extra code deps would rerun a stage for a change it cannot see."""
    found = stage_modules(stage)
    extra = sorted(
        str(d.relative_to(ROOT)) for d in declared(stage)
        if d.is_relative_to(PACKAGE) and d.suffix == ".py" and d not in found
    )
    assert set(extra) == NOT_IMPORTED.get(stage, set()), f"dvc.yaml stage {stage}: {extra}"


def test_outputs_in_dvc_yaml_are_the_paths_module() -> None:
    """Every output path that dvc.yaml declares is defined in ``contrastive.paths``."""
    defined = {v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)}
    for name, stage in STAGES.items():
        for kind in ("outs", "metrics", "plots"):
            for entry in stage.get(kind, []):
                path = next(iter(entry)) if isinstance(entry, dict) else entry
                assert path in defined, f"{name}: {path} is not in contrastive.paths"
