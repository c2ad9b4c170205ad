"""The package's layering: the core (``import ice_prune``) stands without the training and evaluation
harness, and no module imports from a layer above it."""
import ast
import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ice_prune"
HARNESS = ("ice_prune.data", "ice_prune.training", "ice_prune.evaluation")


def _module_name(path: Path) -> str:
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, top_level_only: bool = False) -> set[str]:
    """The ``ice_prune`` modules ``path`` imports (relative imports resolved)."""
    tree = ast.parse(path.read_text())
    package = _module_name(path) if path.name == "__init__.py" else _module_name(path).rpartition(".")[0]
    nodes = tree.body if top_level_only else ast.walk(tree)
    found = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1]
                                + ([node.module] if node.module else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names}
    return {m for m in found if m == "ice_prune" or m.startswith("ice_prune.")}


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in PACKAGE.rglob("*.py")}


def _is_harness(name: str) -> bool:
    return any(name == h or name.startswith(h + ".") for h in HARNESS)


def test_core_modules_import_no_harness_module():
    offenders = {name: sorted(m for m in _imports(path) if _is_harness(m))
                 for name, path in _modules().items() if not _is_harness(name)}
    offenders = {k: v for k, v in offenders.items() if v}
    assert offenders == {}


def test_no_import_cycles():
    modules = _modules()
    graph = {name: {m for m in _imports(path, top_level_only=True) if m in modules and m != name}
             for name, path in modules.items()}
    # importing a submodule imports its packages first: a package's own __init__ is no cycle edge
    graph = {n: {m for m in deps if not n.startswith(m + ".")} for n, deps in graph.items()}
    state: dict[str, int] = {}
    cycle: list[str] = []

    def visit(node: str, stack: list[str]) -> bool:
        state[node] = 1
        stack.append(node)
        for dep in sorted(graph[node]):
            if state.get(dep) == 1:
                cycle.extend(stack[stack.index(dep):] + [dep])
                return True
            if dep not in state and visit(dep, stack):
                return True
        stack.pop()
        state[node] = 2
        return False

    assert not any(visit(n, []) for n in sorted(graph) if n not in state), cycle


CORE_ONLY = r"""
import importlib.abc, sys

BLOCKED = ("ice_prune.data", "ice_prune.training", "ice_prune.evaluation", "h5py")

class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in BLOCKED):
            raise ImportError(f"blocked: {name}")
        return None

sys.meta_path.insert(0, Block())
import timm, torch
import ice_prune

model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, num_classes=5).eval()
ice_prune.patch(model, keep_rate=0.5, method="ice", trace=True)
x = torch.randn(2, 3, 32, 32)
with torch.no_grad():
    logits = model(x)
    tokens = model.forward_features(x)
assert logits.shape == (2, 5), logits.shape
assert tokens.shape[1] < 1 + 16, tokens.shape
grid = ice_prune.restore(tokens, model.ice_trace)
assert grid.shape == (2, 1 + 16, 192), grid.shape
maps = ice_prune.explain(model, x, "ice")
assert maps.shape[0] == 2 and maps[0].numel() == 16, maps.shape
print("loaded", sorted(m for m in sys.modules if m.startswith(BLOCKED)))
"""


def test_core_patches_runs_and_explains_with_the_harness_blocked():
    out = subprocess.run([sys.executable, "-c", CORE_ONLY], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip().endswith("loaded []")


def test_import_ice_prune_loads_no_harness_and_no_h5py():
    code = ("import sys, ice_prune; "
            "print(sorted(m for m in sys.modules if m == 'h5py' or m.startswith(('ice_prune.data', "
            "'ice_prune.training', 'ice_prune.evaluation'))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=PACKAGE.parent, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.strip() == "[]"
    lazy = subprocess.run([sys.executable, "-c", "import ice_prune; print(ice_prune.data.SyntheticScenes.__name__)"],
                          capture_output=True, text=True, cwd=PACKAGE.parent, timeout=300)
    assert lazy.stdout.strip() == "SyntheticScenes", lazy.stderr[-3000:]
