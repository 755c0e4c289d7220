"""The package's shape: imports point one way.

The top of minisd/ is the book a student reads (attention … pipeline); the wings import it and are
never imported by it. Wings are ordered, and a wing may import the book and earlier wings only:

    book  <-  weights  <-  train  <-  tools  <-  course

`minisd/__init__.py` (the package's face) and `minisd/__main__.py` (the command line) may import
anything; a module that imports the face back (`import minisd` inside the book) closes a cycle,
which the second test reports. The graph is read from the source with `ast`
(every import statement, at any depth, since an import inside a function is still a dependency),
so the test needs no import of minisd and fails with the offending edge or cycle named.
"""
from __future__ import annotations

import ast
from functools import lru_cache
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "minisd"
WINGS = ("weights", "train", "tools", "course")  # in order: each may import the ones before it
FACES = ("minisd", "minisd.__main__")  # the package's face and its command line
# None: every cycle fails the test (the course wing's were broken up by moving the hidden-check help
# next to `extra_check`, the exceptions to course/outcomes.py and the exercise finder to
# course/exercises.py).
KNOWN_CYCLES: set = set()


def module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path, modules: set[str]) -> set[str]:
    """The minisd modules that `path` imports (`from . import x` counts as importing module x)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from .x import y`: y is a name in x, unless it is a module itself
            submodules = [f"{source}.{alias.name}" for alias in node.names]
            targets = [t for t in submodules if t in modules] or [source]
        else:
            continue
        for target in targets:
            while target and target not in modules:
                target = target.rpartition(".")[0]
            if target.startswith("minisd") and target != name:
                found.add(target)
    return found


@lru_cache(maxsize=1)
def import_graph() -> dict[str, set[str]]:
    paths = sorted(PACKAGE.rglob("*.py"))
    modules = {module_name(p) for p in paths}
    return {module_name(p): imported_modules(p, modules) for p in paths}


def floor(module: str) -> int:
    """0 for the book, 1 + the wing's index for a wing."""
    parts = module.split(".")
    return 1 + WINGS.index(parts[1]) if len(parts) > 1 and parts[1] in WINGS else 0


def test_no_upward_imports():
    """The book never imports a wing; a wing never imports a later wing."""
    graph = import_graph()
    upward = [
        f"{source} -> {target}"
        for source, targets in graph.items()
        if source not in FACES
        for target in targets
        if floor(target) > floor(source)
    ]
    assert not upward, "upward imports (book -> wing or wing -> later wing):\n" + "\n".join(upward)


def test_no_import_cycles():
    graph = import_graph()
    cycles, state = [], {}

    def visit(module, path):
        state[module] = "open"
        for target in sorted(graph.get(module, ())):
            if state.get(target) == "open":
                cycles.append(" -> ".join(path[path.index(target):] + [target]))
            elif target not in state:
                visit(target, path + [target])
        state[module] = "done"

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
    cycles = [c for c in cycles if c not in KNOWN_CYCLES]
    assert not cycles, "import cycles:\n" + "\n".join(cycles)


def test_the_graph_is_read_correctly():
    """The reader itself: it must see relative, absolute and `from . import x` imports (else the
    two tests above could pass on an empty graph)."""
    graph = import_graph()
    assert "minisd.attention" in graph["minisd.transformer"]  # from .attention import Attention
    assert "minisd.schedule" in graph["minisd.ddim"]  # from minisd.schedule import ...
    assert "minisd.pipeline" in graph["minisd.model"]  # from . import pipeline
    assert "minisd.model" in graph["minisd.weights.minisd_file"]  # from ..model import ...
    assert floor("minisd.weights.convert") == 1 and floor("minisd.pipeline") == 0
    assert floor("minisd.course.checks.ch01_attention") == 4


# ---------------------------------------------------------------- no process-wide state


def test_no_global_statements():
    """No function rebinds a module variable: switches live on the objects they switch."""
    found = [
        f"{path.relative_to(PACKAGE.parent)}:{node.lineno}"
        for path in sorted(PACKAGE.rglob("*.py"))
        for node in ast.walk(ast.parse(path.read_text()))
        if isinstance(node, ast.Global)
    ]
    assert not found, f"`global` statements: {found}"


def test_two_models_keep_their_own_switches():
    """speed_up / slow_down / attention backends / attention-map recording of one model never
    change another model in the same process."""
    import torch

    import minisd
    from minisd.attention import get_attention_backend
    from minisd.attention_maps import active_recorder, record_cross_attention

    torch.manual_seed(0)
    a, b = minisd.StableDiffusion(minisd.tiny()), minisd.StableDiffusion(minisd.tiny())
    minisd.speed_up(a, attention="fused", channels_last=False)
    assert get_attention_backend(a) == "fused" and get_attention_backend(b) == "math"
    minisd.speed_up(b, attention="math", attention_slicing=2, channels_last=False)
    minisd.slow_down(b)
    assert get_attention_backend(a) == "fused" and get_attention_backend(b) == "math"
    assert all(layer.slice_size is None for layer in minisd.attention.attention_layers(b))
    minisd.set_attention_backend(b.unet, "fused")  # one part of one model
    assert get_attention_backend(b.unet) == "fused" and get_attention_backend(b.vae) == "math"
    minisd.slow_down(a)
    assert get_attention_backend(a) == "math"

    with record_cross_attention(a) as maps_a, record_cross_attention(b) as maps_b:
        a.generate("a red circle", steps=1, seed=0, output_type="latent")
        assert active_recorder(a) is maps_a and active_recorder(b) is maps_b
        assert maps_a.per_token().shape[0] == 77
        with pytest.raises(ValueError, match="no cross-attention was recorded"):
            maps_b.per_token()  # b did not run
    assert active_recorder(a) is None and active_recorder(b) is None


# ---------------------------------------------------------------- lines fit side-by-side Jupyter


def test_lines_fit_in_100_columns():
    """`ruff check` with the project's configuration (pyproject.toml: line-length 100, E501)."""
    import shutil
    import subprocess
    import sys

    ruff = shutil.which("ruff")
    command = [ruff] if ruff else [sys.executable, "-m", "ruff"]
    if not ruff and subprocess.run(command + ["--version"], capture_output=True).returncode:
        pytest.skip("ruff is not installed (pip install -r tests/requirements-test.txt)")
    result = subprocess.run(
        command + ["check", "--output-format", "concise", "."],
        cwd=PACKAGE.parent,
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
