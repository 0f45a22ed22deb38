"""The house drawing: each top-level module imports only from the layers below it, so a file can be read
(and the paper followed) from the bottom up, and nothing in the model reaches for training or checkpoints."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
LAYERS = [  # bottom to top; the appendix's files by their package's name
    {"config", "appendix.precision", "appendix.cpu_memory", "appendix.image_io"},
    {"msda_cuda", "appendix.onnx_detect", "appendix.video", "appendix.runs", "appendix.layouts", "appendix.progress"},
    {"backbone", "deformable_attn", "denoising", "data"},
    {"matcher"},
    {"model", "losses"},
    {"appendix.static_shapes", "appendix.checkpoints"},
    {"appendix.safe_step"},
    {"appendix.inference"},
    {"appendix.plots"},
    {"appendix.detect", "appendix.explain"},
    {"eval"},
    {"appendix.export", "appendix.run_setup"},
    {"train"},
]
CHAPTERS = {"model", "backbone", "deformable_attn", "denoising", "matcher", "losses", "data", "train", "eval", "config"}


def imported_modules(path: Path) -> set[str]:
    """The modules of this repository (and others) that `path` imports: a file of the appendix as
    "appendix.NAME", whether imported as `from appendix import NAME` or `from appendix.NAME import ...`."""
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names |= {f"appendix.{a.name}" for a in node.names} if node.module == "appendix" else {node.module}
    return {name if name.startswith("appendix.") else name.split(".")[0] for name in names}


def sources() -> dict[str, Path]:
    return ({p.stem: p for p in ROOT.glob("*.py")} | {f"appendix.{p.stem}": p for p in ROOT.glob("appendix/*.py")
                                                       if p.stem != "__init__"}
            | {"msda_cuda": ROOT / "msda_cuda" / "__init__.py"})


def test_the_root_holds_the_chapters_and_the_appendix_the_rest():
    assert {p.stem for p in ROOT.glob("*.py")} == CHAPTERS


def test_the_papers_chapters_import_only_chapters_config_and_the_kernels():
    """No cache, export hook or compiler's fixed shapes on a reader's way through the paper (STYLE.md, 14):
    what exists for them is handed in, or sits in the appendix and calls the chapters."""
    paper = {"model", "backbone", "deformable_attn", "denoising", "matcher", "losses"}
    ours = set(sources())
    plumbing = [(name, imported) for name in paper for imported in imported_modules(sources()[name])
                if imported in ours and imported not in paper | {"config", "msda_cuda"}]
    assert not plumbing


def test_imports_run_downwards_only():
    """One import runs upwards, at call time: the kernels' dispatcher reads the plain Eq. 3 it falls back on and
    checks itself against from the chapter that holds it (deformable_attn), which imports the dispatcher."""
    level = {name: i for i, layer in enumerate(LAYERS) for name in layer}
    assert set(sources()) == set(level), "a new module needs a place in LAYERS"
    upward = [(name, imported) for name, path in sources().items() for imported in imported_modules(path)
              if imported in level and level[imported] >= level[name] and imported != name]
    assert upward == [("msda_cuda", "deformable_attn")]
    dispatcher = ast.parse(sources()["msda_cuda"].read_text())
    assert all("deformable_attn" not in ast.unparse(node) for node in dispatcher.body
               if isinstance(node, (ast.Import, ast.ImportFrom))), "imported on use, not on import"


def functions(path: Path):
    tree = ast.parse(path.read_text())
    return [node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))]


def test_no_function_is_longer_than_60_lines():
    """A function a reader can hold in mind at once (nanoGPT's longest is about 60 lines)."""
    paths = [*ROOT.glob("*.py"), *ROOT.glob("appendix/*.py"), *ROOT.glob("msda_cuda/*.py"), *ROOT.glob("bench/*.py"),
             *ROOT.glob("scripts/*.py")]
    long = [f"{path.name}:{f.lineno} {f.name} ({f.end_lineno - f.lineno + 1} lines)"
            for path in paths for f in functions(path) if f.end_lineno - f.lineno + 1 > 60]
    assert not long


def test_one_epoch_of_training_takes_a_handful_of_arguments():
    """DETR's train_one_epoch takes 7; the set-up (appendix/run_setup.Setup) and the state (runs.TrainState) travel whole."""
    (one_epoch,) = [f for f in functions(ROOT / "train.py") if f.name == "train_one_epoch"]
    assert len(one_epoch.args.args) <= 8
