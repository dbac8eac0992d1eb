"""The package reads as the data's path: each stage imports only from the stages below it
(``batcher/__init__.py`` draws them), so no stage reaches back into one it hands values to."""

from __future__ import annotations

import ast
from pathlib import Path

import batcher

PACKAGE = Path(batcher.__file__).parent
# Lowest first. The base modules are the job file and the errors every stage raises; ``sim``
# stands alone and imports nothing of batcher's but itself.
LAYERS = ["base", "store", "rows", "flow", "send", "runs", "reports", "cli"]
BASE = {"config", "errors"}


def stage_of(module: str) -> str:
    """``batcher.store.journal`` → ``store``; the base modules and the CLI by name."""
    parts = module.split(".")
    name = parts[1] if len(parts) > 1 else ""
    if name in BASE:
        return "base"
    if name in ("cli", "__main__", ""):
        return "cli"
    return name


def imports_of(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
    return {name for name in found if name == "batcher" or name.startswith("batcher.")}


def test_no_stage_imports_from_a_stage_above_it() -> None:
    wrong = []
    for path in sorted(PACKAGE.rglob("*.py")):
        module = ".".join(("batcher", *path.relative_to(PACKAGE).with_suffix("").parts))
        module = module.removesuffix(".__init__")
        stage = stage_of(module)
        for imported in imports_of(path):
            target = stage_of(imported)
            if stage == "sim" or target == "sim":
                if stage == "sim" and target != "sim":
                    wrong.append(f"{module} imports {imported}: the simulator stands alone")
                continue
            if module == "batcher" or stage == "cli":
                continue  # the public API and the command sit on top of everything
            if LAYERS.index(target) > LAYERS.index(stage):
                wrong.append(f"{module} ({stage}) imports {imported} ({target})")
    assert wrong == []


def test_the_package_docstring_draws_every_stage() -> None:
    text = batcher.__doc__ or ""
    stages = [p.name for p in PACKAGE.iterdir() if p.is_dir() and (p / "__init__.py").exists()]
    assert sorted(stages) == sorted([*LAYERS[1:-1], "sim"])
    for stage in stages:
        assert f"{stage}/" in text, stage
