"""The package's layers (docs/architecture.md): each subpackage imports only from the layers below it, at
module level and inside functions alike, so a reader can learn the code bottom up."""

from __future__ import annotations

import ast
from pathlib import Path

PKG = Path(__file__).resolve().parents[1] / "noisystudent"
BASE = {"errors", "files", "config", "rundir"}
# what each room may import besides itself and the base
ALLOWED = {
    "base": set(),
    "data": set(),
    "models": set(),
    "training": {"data"},
    "reporting": {"data", "models", "training"},
    "pseudolabels": {"data", "models", "reporting"},
    "stages": {"data", "models", "training", "reporting", "pseudolabels"},
    "entry": {"stages", "training"},
}


def room(module: str) -> str:
    """noisystudent.training.engine -> training; noisystudent.config -> base."""
    parts = module.split(".")
    if len(parts) == 1 or parts[1] in ("__init__", "__version__"):
        return "base"
    if parts[1] == "__main__":
        return "entry"
    return "base" if parts[1] in BASE else parts[1]


def imports(path: Path, root: Path = PKG) -> set[str]:
    """Every noisystudent module a file imports, relative imports resolved."""
    module = "noisystudent." + ".".join(path.relative_to(root).with_suffix("").parts)
    package = module.removesuffix(".__init__") if path.name == "__init__.py" else module.rsplit(".", 1)[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            base = package.split(".")[: len(package.split(".")) - node.level + 1]
            target = ".".join(base + ([node.module] if node.module else []))
            found |= {f"{target}.{a.name}" for a in node.names} if node.module is None else {target}
        elif isinstance(node, ast.ImportFrom) and node.module == "noisystudent":
            found |= {f"noisystudent.{a.name}" for a in node.names}  # from noisystudent import training
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("noisystudent"):
            found.add(node.module)
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.startswith("noisystudent")}
    return found


def test_imports_point_down_only():
    wrong = []
    files = sorted(PKG.rglob("*.py"))
    assert len(files) > 40 and {room("noisystudent." + p.parent.name + ".x") for p in files} >= set(ALLOWED) - {
        "entry", "base"}
    for path in files:
        here = room("noisystudent." + ".".join(path.relative_to(PKG).with_suffix("").parts))
        for target in imports(path):
            there = room(target)
            if there not in {here, "base"} | ALLOWED[here]:
                wrong.append(f"{path.relative_to(PKG)} ({here}) imports {target} ({there})")
    assert not wrong, "imports that point up or sideways:\n" + "\n".join(wrong)


def test_the_checker_sees_a_wrong_import(tmp_path):
    # negative control: a data module importing the training loop (relatively, absolutely, as a name of the
    # package) and a data/__init__.py importing it relatively are all caught
    pkg = tmp_path / "noisystudent"
    (pkg / "data").mkdir(parents=True)
    probe = pkg / "data" / "probe.py"
    probe.write_text("from ..training.engine import fit\nfrom noisystudent import training\n\ndef f():\n"
                     "    import noisystudent.reporting.plots\n")
    assert imports(probe, pkg) == {"noisystudent.training.engine", "noisystudent.training",
                                   "noisystudent.reporting.plots"}
    init = pkg / "data" / "__init__.py"
    init.write_text("from ..training import engine\nfrom .shards import x\n")
    assert imports(init, pkg) == {"noisystudent.training", "noisystudent.data.shards"}
    allowed = ALLOWED["data"] | {"data", "base"}
    assert {room(t) for t in imports(probe, pkg) | {"noisystudent.training"}} - allowed == {"training", "reporting"}
