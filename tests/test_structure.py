"""The house drawing: each top-level module imports only from the layers below it, so a file can be read
(and the paper followed) from the bottom up, and nothing in the model reaches for training or checkpoints."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # bottom to top
    {"config", "precision", "cpu_memory", "image_io"},
    {"msda_cuda", "onnx_detect", "video", "runs", "layouts", "static_shapes"},
    {"backbone", "deformable_attn", "denoising", "matcher", "data"},
    {"model", "losses"},
    {"checkpoints"},
    {"inference"},
    {"plots"},
    {"eval"},
    {"export"},
    {"train"},
]


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    names |= {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module and not node.level}
    return {name.split(".")[0] for name in names}


def test_imports_run_downwards_only():
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    sources = {p.stem: p for p in ROOT.glob("*.py")} | {"msda_cuda": ROOT / "msda_cuda" / "__init__.py"}
    assert set(sources) == set(level), "a new top-level module needs a place in LAYERS"
    upward = [(name, imported) for name, path in sources.items() for imported in imported_modules(path)
              if imported in level and level[imported] >= level[name] and imported != name]
    assert not upward


def functions(path: Path):
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_60_lines():
    """A function a reader can hold in mind at once (nanoGPT's longest is about 60 lines)."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("msda_cuda/*.py"), *ROOT.glob("bench/*.py"), *ROOT.glob("scripts/*.py")]
    long = [f"{path.name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for path in paths for f in functions(path) if f.end_lineno - f.lineno + 1 > 60]
    assert not long


def test_one_epoch_of_training_takes_a_handful_of_arguments():
    """DETR's train_one_epoch takes 7; the set-up (train.Setup) and the state (runs.TrainState) travel whole."""
    (one_epoch,) = [f for f in functions(ROOT / "train.py") if f.name == "train_one_epoch"]
    assert len(one_epoch.args.args) <= 8
