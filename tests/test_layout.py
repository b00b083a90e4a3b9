"""The package's layering: one import direction, no cycles, files a reader can hold in their head.

Every import of the ``imagen`` package (top-level and the lazy ones inside functions) is read
with ``ast``; no third-party tool is involved. A module may import modules of a lower layer, or
of its own group (a package such as imagen.nn); never a higher layer nor a sibling group of the
same layer, so the layers below stay usable without the ones above.
"""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "imagen"

# Lowest first. A module belongs to the group with the longest matching name prefix.
LAYERS: list[tuple[str, ...]] = [
    ("imagen.presets", "imagen.images", "imagen.mlops"),  # plain data, image helpers; a map
    ("imagen.config",),  # typed params.yaml
    ("imagen.embedded",),  # the synthetic captioned world and its evaluator
    ("imagen.text", "imagen.nn", "imagen.diffusion", "imagen.mlops.client", "imagen.progress"),
    ("imagen.mlops.parent",),  # one MLflow parent run per pipeline execution
    ("imagen.mlops.tracking",),  # one MLflow child run per stage
    ("imagen.checkpoint", "imagen.data"),  # stage model files; ingest, precache, loading
    ("imagen.nemo",),  # NeMo configs, checkpoints and weights
    ("imagen.train", "imagen.sample"),  # the stages that make and use models
    ("imagen.mlops.registry",),  # registered models, the imagen-cascade pyfunc
    ("imagen.mlops.promote",),  # challenger / champion: the registry promotes on evidence
    ("imagen.evaluate", "imagen.sample.cli", "imagen.lora"),  # the sweep; sample; finetune
    ("imagen.mlops.pipeline",),  # `imagen pipeline`: dvc repro under a parent run
    ("imagen.cli", "imagen.__main__"),  # the `imagen` command
]

MAX_LINES = 500


def module_name(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def modules() -> dict[str, Path]:
    return {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def imports_of(path: Path, name: str, known: set[str]) -> set[str]:
    """The project modules ``path`` imports (a ``from pkg import sub`` counts as ``pkg.sub``)."""
    tree = ast.parse(path.read_text(), str(path))
    is_pkg = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".") if is_pkg else name.split(".")[:-1]
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            targets = [f"{base}.{a.name}" for a in node.names]
        for t in targets:
            while t and t not in known:  # `from x import name` -> x
                t = t.rpartition(".")[0]
            if t and t != name:
                found.add(t)
    return found


def group_of(module: str) -> tuple[int, str]:
    best: tuple[int, str] | None = None
    for layer, groups in enumerate(LAYERS):
        for g in groups:
            if (module == g or module.startswith(g + ".")) and (
                best is None or len(g) > len(best[1])
            ):
                best = (layer, g)
    if best is None:
        raise AssertionError(f"{module}: not in any layer of tests/test_layout.py LAYERS")
    return best


def graph() -> dict[str, set[str]]:
    mods = modules()
    known = set(mods)
    return {name: imports_of(path, name, known) for name, path in mods.items()}


def test_every_module_has_a_layer() -> None:
    for name in modules():
        if name != "imagen":
            group_of(name)


def test_imports_only_go_down() -> None:
    bad = []
    for src, targets in graph().items():
        if src == "imagen":
            continue
        src_layer, src_group = group_of(src)
        for dst in sorted(targets):
            if dst == "imagen":
                continue
            dst_layer, dst_group = group_of(dst)
            if dst_group == src_group or dst_layer < src_layer:
                continue
            bad.append(f"{src} (layer {src_layer}) imports {dst} (layer {dst_layer})")
    assert not bad, "upward or sideways imports:\n  " + "\n  ".join(bad)


def test_no_import_cycles() -> None:
    g = graph()
    state: dict[str, int] = defaultdict(int)  # 0 new, 1 on the stack, 2 done
    stack: list[str] = []
    cycles: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for n in sorted(g.get(m, ())):
            if state[n] == 1:
                cycles.append(" -> ".join([*stack[stack.index(n) :], n]))
            elif state[n] == 0:
                visit(n)
        stack.pop()
        state[m] = 2

    for m in sorted(g):
        if state[m] == 0:
            visit(m)
    assert not cycles, "import cycles:\n  " + "\n  ".join(cycles)


def test_the_layer_check_catches_an_upward_import(tmp_path: Path) -> None:
    """The walker sees lazy imports inside functions too: an nn module reaching up to train."""
    src = tmp_path / "imagen" / "nn" / "bad.py"
    src.parent.mkdir(parents=True)
    src.write_text("def f():\n    from imagen.train import stage\n    return stage\n")
    found = imports_of(src, "imagen.nn.bad", {"imagen.train", "imagen.train.stage"})
    assert found == {"imagen.train.stage"}
    assert group_of("imagen.nn.bad")[0] < group_of("imagen.train.stage")[0]


@pytest.mark.parametrize("path", sorted(PACKAGE.rglob("*.py")), ids=lambda p: module_name(p))
def test_source_files_stay_readable(path: Path) -> None:
    lines = len(path.read_text().splitlines())
    assert lines <= MAX_LINES, f"{path.relative_to(ROOT)}: {lines} lines (at most {MAX_LINES})"
