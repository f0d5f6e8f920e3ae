"""The package's shape: imports run one way, the stages reach each other only through the cache, and
`import raydpo` loads nothing heavy."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "raydpo"

# Lowest first. A module imports modules of lower layers and of its own package, nothing else: config
# and data at the bottom, the cache above them, the two stages above the cache (neither imports the
# other: training reads the cache through raydpo.cache), the job and the entry points on top. The
# leaves import at most `errors` and `hub` (where a model's files are); `tracking` is one (the only module
# that imports MLflow).
LAYERS = [
    {"errors"},
    {"hub"},
    {"attention", "digests", "faults", "layout", "loss_settings", "numerics", "toy", "tracking"},
    {"config"},
    {"data", "losses", "logprobs", "cluster", "hf_data"},
    {"tokenize", "sources", "shared_paths", "resources"},
    {"cache"},
    {"console"},
    {"precompute_stage", "train_stage"},
    {"job"},
    {"cli", "__init__"},
]
LAYER = {component: depth for depth, names in enumerate(LAYERS) for component in names}


def component(module: str) -> str:
    """`raydpo.cache.split` -> `cache`; `raydpo` itself (`from raydpo import cache`) -> `__init__`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def raydpo_imports(path: Path) -> set[str]:
    """The raydpo modules a file imports, at any depth (function-level imports included)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "raydpo":
            if node.module == "raydpo":  # `from raydpo import cache`: the names are the modules
                found.update(f"raydpo.{alias.name}" for alias in node.names)
            else:
                found.add(node.module)
        elif isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names if alias.name.split(".")[0] == "raydpo")
    return found


def test_imports_run_one_way():
    files = sorted(PACKAGE.rglob("*.py"))
    assert len(files) > 20
    wrong = []
    for path in files:
        relative = path.relative_to(PACKAGE.parent).with_suffix("")
        own = component(".".join(relative.parts))
        assert own in LAYER, f"{path} belongs to no layer: add it to LAYERS"
        for module in raydpo_imports(path):
            other = component(module)
            if other == "__version__" or other == own:
                continue
            assert other in LAYER, f"{path} imports {module}, which belongs to no layer"
            if LAYER[other] >= LAYER[own]:
                wrong.append(f"{relative} imports {module}")
    assert not wrong, "imports against the layering: " + "; ".join(wrong)


def test_layering_catches_an_upward_import(tmp_path):
    """The check itself: an import of a stage from the cache is reported."""
    offending = tmp_path / "split.py"
    offending.write_text("def f():\n    from raydpo.precompute_stage.pipeline import precompute\n")
    assert raydpo_imports(offending) == {"raydpo.precompute_stage.pipeline"}
    assert LAYER[component("raydpo.precompute_stage.pipeline")] > LAYER["cache"]


def test_import_raydpo_loads_nothing_heavy():
    code = (
        "import sys, raydpo; raydpo.PrecomputeConfig; raydpo.TrainConfig; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'torch', 'ray', 'transformers', 'deepspeed', "
        "'mlflow', 'pyarrow', 'datasets'}))"
    )
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert loaded.stdout.strip() == "[]"
