"""The package's import graph follows the papers' pipeline: every module imports, no package
imports one above it in the order below, and no two modules import each other."""
import ast
import importlib
import os

import pytest

from conftest import REPO

# Bottom first; a package may import its own layer and the ones below. The scale world (synth)
# writes an encoder's embedding table of planted vectors, so synth sits above features.
LAYERS = (
    ("trainer", "trainer.console"),
    ("trainer.configs",),
    ("trainer.data",),
    ("trainer.train",),
    ("trainer.models",),
    ("trainer.features",),
    ("trainer.synth",),
    ("trainer.eval",),
    ("trainer.ctr",),
    ("trainer.pipelines",),
    ("trainer.experiments", "trainer.diagnostics", "trainer.report", "trainer.data_format"),
    ("trainer.stages",),
    ("trainer.registry",),
    ("trainer.task",),
    ("export",),
    ("serving",),
)


def _modules() -> dict[str, str]:
    """{module name: path} of every module of the packages."""
    out = {}
    for top in ("trainer", "export", "serving"):
        for folder, _, files in os.walk(os.path.join(REPO, top)):
            for f in sorted(files):
                if f.endswith(".py"):
                    rel = os.path.relpath(os.path.join(folder, f), REPO)[:-3]
                    out[rel.replace(os.sep, ".").removesuffix(".__init__")] = os.path.join(
                        folder, f)
    return out


MODULES = _modules()


def _imports(name: str, path: str) -> set[str]:
    """The project modules `name` imports anywhere in its file (a function's lazy import too)."""
    package = name if path.endswith("__init__.py") else name.rpartition(".")[0]
    out = set()
    for node in ast.walk(ast.parse(open(path).read())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base
                       for a in node.names]
        else:
            continue
        out |= {t for t in targets if t.split(".")[0] in ("trainer", "export", "serving")}
    return out - {name}


def _layer(module: str) -> int:
    """The layer of the longest prefix of `module` that LAYERS names."""
    best = None
    for i, layer in enumerate(LAYERS):
        for prefix in layer:
            if module == prefix or module.startswith(prefix + "."):
                if best is None or len(prefix) > best[1]:
                    best = (i, len(prefix))
    assert best is not None, f"{module} is in no layer of LAYERS"
    return best[0]


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name):
    importlib.import_module(name)


def test_no_package_imports_one_above_it():
    upward = [f"{m} (layer {_layer(m)}) imports {i} (layer {_layer(i)})"
              for m, path in MODULES.items() for i in sorted(_imports(m, path))
              if _layer(i) > _layer(m)]
    assert not upward, "\n".join(upward)


def test_no_two_modules_import_each_other():
    graph = {m: _imports(m, p) for m, p in MODULES.items()}
    pairs = sorted({tuple(sorted((a, b))) for a, targets in graph.items() for b in targets
                    if a in graph.get(b, ())})
    assert not pairs, pairs


def test_every_package_has_its_init():
    for name, path in MODULES.items():
        folder = os.path.dirname(path)
        assert os.path.exists(os.path.join(folder, "__init__.py")), f"{folder} ({name})"
