"""The kernel library never imports an application (hykernels/apps/: demo, experiment, train), and
every application is reachable from ``python -m hykernels``. Read from the source, so a lazy import
inside a function counts too."""
import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "hykernels"


def imported_modules(path: Path) -> set:
    """Absolute names of every module ``path`` imports (relative imports resolved)."""
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    package = parts[:-1]  # a module's package; an __init__.py's is its own directory, also parts[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package[:len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names.add(module)
            names.update(f"{module}.{a.name}" for a in node.names)  # from hykernels import apps
    return names


def library_modules():
    return [p for p in PACKAGE.rglob("*.py") if "apps" not in p.relative_to(PACKAGE).parts[:1]
            and p.name != "__main__.py"]


def test_the_library_never_imports_an_application():
    offenders = {str(p.relative_to(PACKAGE.parent)): sorted(m for m in imported_modules(p)
                                                         if m == "hykernels.apps" or m.startswith("hykernels.apps."))
                 for p in library_modules()}
    offenders = {k: v for k, v in offenders.items() if v}
    assert not offenders, f"library modules import applications: {offenders}"


def test_the_check_sees_relative_and_lazy_imports(tmp_path):
    """The scan resolves relative imports, also inside functions: a library module written as
    the demo's old home was (``from .apps import demo`` in a function) is caught."""
    src = PACKAGE / "_probe_for_layout_test.py"
    src.write_text("def f():\n    from .apps.experiment import run\n    from . import apps\n")
    try:
        found = imported_modules(src)
    finally:
        src.unlink()
    assert {"hykernels.apps.experiment", "hykernels.apps"} <= found


def test_the_command_line_reaches_every_application():
    """``python -m hykernels`` (outside the library's import graph: nothing imports __main__) is
    where demo, experiment and train are reached from."""
    found = imported_modules(PACKAGE / "__main__.py")
    assert {"hykernels.apps.demo", "hykernels.apps.experiment.run", "hykernels.apps.train.cli"} <= found
