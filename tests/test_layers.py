"""The layers: ``core`` (storage, images, sharding, labels, labelled folders) <
``models`` (the networks, the analyser, scoring) < ``tasks`` (the pipeline's stages) and
``inference`` (the product that runs a model), side by side: neither imports the other,
what both use lives below them < ``flows`` (the orchestration: the machinery, the
pipeline's stages, the flows) < ``cli`` (the commands). A module imports
only from its own package and the layers below, and no modules import each other in a
circle. Read from the source (every import, also those inside functions), so the test
fails the moment a line breaks it."""

import ast
from pathlib import Path

from conftest import REPO

LAYERS = ("core", "models", "tasks", "inference", "flows", "cli")
RANK = {"core": 0, "models": 1, "tasks": 2, "inference": 2, "flows": 3, "cli": 4}  # (same rank:
# the product and the pipeline, which may not import each other)


def imports() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {}
    for layer in LAYERS:
        for path in sorted((REPO / layer).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found = set()
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                    found.add(node.module)
                elif isinstance(node, ast.Import):
                    found.update(a.name for a in node.names)
            graph[name] = {m for m in found if m.split(".")[0] in LAYERS}
    return graph


def test_each_layer_imports_only_from_below():
    def allowed(module: str, target: str) -> bool:
        own, other = module.split(".")[0], target.split(".")[0]
        return own == other or RANK[other] < RANK[own]

    wrong = [f"{module} imports {target}"
             for module, targets in imports().items() for target in targets
             if not allowed(module, target)]
    assert not wrong, wrong
    assert not allowed("inference.evaluate_folder", "tasks.evaluate")  # the rule holds
    assert not allowed("flows.pipeline", "cli.terminal")


def test_no_import_cycles():
    from graphlib import CycleError, TopologicalSorter

    graph = imports()
    try:
        TopologicalSorter({m: {t for t in ts if t in graph} for m, ts in graph.items()}
                          ).prepare()
    except CycleError as exc:
        raise AssertionError(f"import cycle: {' -> '.join(exc.args[1])}") from None


def test_the_vocabulary_is_written_once():
    """The label classes and the age-to-band rule live in core/labels.py only."""
    for layer in LAYERS[1:]:
        for path in (REPO / layer).rglob("*.py"):
            text = Path(path).read_text()
            assert '("20s", "30s", "40s", "50s")' not in text, path
            assert "range(20, 60)" not in text, path
