"""The import rules of ARCHITECTURE.md: each part of the package imports only parts in layers below
its own (read from the source with `ast`, so a new import that breaks the layering fails here)."""

import ast
from pathlib import Path

ROOT = Path(__file__).parents[1] / "nanoseek"
# layer of each part (a subpackage or a top-level module); a part may import parts of lower layers
LAYERS = {
    "kernels": 0,
    "model": 1, "tokenizer": 1, "files": 1, "quant": 1,
    "machine": 2, "reasoning": 2, "data": 2, "inference": 2, "remote": 2,
    "checkpoint": 3, "tools": 3,
    "loading": 4, "eval": 4, "chat": 4,
    "train": 5, "serve": 5,
    "speedrun": 6,
    "cli": 7, "__init__": 7,
    "__main__": 8,  # python -m nanoseek: the CLI
}


def part_of(path: Path) -> str:
    rel = path.relative_to(ROOT).with_suffix("").parts
    return rel[0]


def imported_parts(path: Path, source: str | None = None) -> set[str]:
    """The nanoseek parts a file imports (absolute `nanoseek.x` and relative `..x` imports)."""
    package = path.relative_to(ROOT.parent).with_suffix("").parts[:-1]  # ('nanoseek', 'serve') for serve/server.py
    found = set()
    for node in ast.walk(ast.parse(path.read_text() if source is None else source)):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package[: len(package) - node.level + 1]
            target = list(base) + (node.module.split(".") if node.module else [])
            if len(target) > 1:
                found.add(target[1])
            else:  # `from . import x` at the top of the package
                found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanoseek."):
            found.add(node.module.split(".")[1])
        elif isinstance(node, ast.Import):
            found.update(a.name.split(".")[1] for a in node.names if a.name.startswith("nanoseek."))
    return found


def test_every_part_has_a_layer():
    parts = {part_of(p) for p in ROOT.rglob("*.py")}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS and to ARCHITECTURE.md"


def test_no_part_imports_its_own_layer_or_above():
    bad = []
    for path in sorted(ROOT.rglob("*.py")):
        me = part_of(path)
        for other in imported_parts(path) - {me}:
            if other in LAYERS and LAYERS[other] >= LAYERS[me]:
                bad.append(f"{path.relative_to(ROOT.parent)} ({me}, layer {LAYERS[me]}) imports {other} "
                           f"(layer {LAYERS[other]})")
    assert not bad, "\n".join(bad)


def test_the_scanner_sees_relative_and_absolute_imports():
    source = "from ..serve import server\nimport nanoseek.train.loop\nfrom .attention import MLA\nfrom nanoseek.data import x\n"
    assert imported_parts(ROOT / "model" / "x.py", source) == {"serve", "train", "model", "data"}
    assert imported_parts(ROOT / "cli.py", "from . import chat\nfrom .serve.server import app\n") == {"chat", "serve"}
