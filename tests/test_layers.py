"""The package layers point one way (docs/design.md "Layers"), read from the source with ``ast``:
every import of every module, at module level and inside functions, is checked."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "xpression"

# Leaves: no project imports at all.
BASE = {"xpression.registry", "xpression.runfolder", "xpression.plotting", "xpression.config"}
DATA = BASE | {"xpression.data", "xpression.metrics"}
MODELS = DATA | {"xpression.models"}
TRAINING = MODELS | {"xpression.callbacks", "xpression.resume"}
# What each unit may import besides itself. The synthetic generator stands alone and only the
# evaluation (scoring against its truth) and the entry points' `${phantom:...}` resolver use it.
ALLOWED = {
    **{unit: set() for unit in BASE},
    "xpression.data": BASE,
    "xpression.metrics": BASE | {"xpression.data"},
    "xpression.models": DATA,
    "xpression.callbacks": MODELS,
    "xpression.resume": MODELS,
    "xpression.inference": MODELS,
    # (its commands, e.g. python -m xpression.evaluation.attribute, report input errors as the CLIs do)
    "xpression.evaluation": TRAINING | {"xpression.inference", "xpression.phantom", "xpression.cli"},
    "xpression.phantom": set(),
    # Entry points (train.py / infer.py and what only they call): anything.
    "xpression.training": TRAINING | {"xpression.inference", "xpression.evaluation"},
    "xpression.cli": TRAINING | {"xpression.inference"},
    # python -m xpression.pretrain: unlabelled CT -> an encoder checkpoint for model.init_from
    "xpression.pretrain": MODELS | {"xpression.cli", "xpression.resolvers"},
    "xpression.view": DATA | {"xpression.inference"},  # python -m xpression.view: reads infer.py's output
    "xpression.resolvers": {"xpression.phantom"},
    "xpression": set(),
}


def unit_of(module: str) -> str:
    """The layer unit of a module: ``xpression.<package or top-level module>``."""
    parts = module.split(".")
    return ".".join(parts[:2])


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> list[tuple[str, int, bool]]:
    """``(imported module, line, at module level)`` for every ``xpression`` import of a file."""
    tree = ast.parse(path.read_text(), str(path))
    top = {id(n) for n in tree.body}
    here = module_name(path).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: from the file's package up
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names = [base]
        else:
            continue
        out += [(n, node.lineno, id(node) in top) for n in names if n == "xpression" or n.startswith("xpression.")]
    return out


def edges() -> list[tuple[str, str, str]]:
    """``(importing unit, imported unit, "file:line")`` across units."""
    out = []
    for path in sorted(PACKAGE.rglob("*.py")):
        src = unit_of(module_name(path))
        for target, line, _ in imports(path):
            dst = unit_of(target)
            if dst != src and target != "xpression":
                out.append((src, dst, f"{path.relative_to(ROOT)}:{line}"))
    return out


def test_every_unit_has_a_layer():
    units = {unit_of(module_name(p)) for p in PACKAGE.rglob("*.py")}
    assert units <= set(ALLOWED), f"give {sorted(units - set(ALLOWED))} a layer in tests/test_layers.py"


def test_imports_point_down_the_layers():
    wrong = [f"{where}: {src} imports {dst}" for src, dst, where in edges() if dst not in ALLOWED[src]]
    assert not wrong, "imports against the layers:\n" + "\n".join(wrong)


def test_no_package_cycle():
    graph: dict[str, set[str]] = {}
    for src, dst, _ in edges():
        graph.setdefault(src, set()).add(dst)

    def reaches(a: str, b: str, seen: set[str]) -> bool:
        return any(n == b or (n not in seen and reaches(n, b, seen | {n})) for n in graph.get(a, ()))

    cycles = sorted(u for u in graph if reaches(u, u, {u}))
    assert not cycles, f"package cycle through {cycles}"


def test_the_checker_sees_function_level_and_relative_imports(tmp_path):
    """The walker itself: an import inside a function and a relative import are both found."""
    pkg = tmp_path / "xpression" / "models"
    pkg.mkdir(parents=True)
    (pkg / "m.py").write_text("from .net import X\n\ndef f():\n    from xpression.evaluation import scores\n")
    global ROOT
    old, ROOT = ROOT, tmp_path
    try:
        found = imports(pkg / "m.py")
    finally:
        ROOT = old
    assert found == [("xpression.models.net", 1, True), ("xpression.evaluation", 4, False)]
    assert "xpression.evaluation" not in ALLOWED[unit_of("xpression.models.m")]


@pytest.mark.parametrize("module", ["xpression", "xpression.inference", "xpression.models", "xpression.data"])
def test_import_has_no_side_effects(module):
    """Importing the library registers no config resolver (the entry points do) and does not
    load the synthetic generator."""
    code = (f"import sys, {module}; from omegaconf import OmegaConf; "
            "print(OmegaConf.has_resolver('phantom'), 'xpression.phantom' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
