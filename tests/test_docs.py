"""The documentation cannot drift from the code.

- Every ```python block of README.md and docs/**/*.md runs: the blocks of one file run in order in
  one namespace, in a fresh Python process per file (tiny CPU shapes; a file may set up state a
  reader brings themselves, such as a model and a tokenizer, in an HTML comment
  ``<!-- test-setup ... -->`` that renders as nothing and runs where it stands). A traceback
  names the Markdown file and line.
- ```bash / ```console blocks are not run, but every ``python -m hykernels SUB`` they name must
  be a subcommand, and every script they run (``python x.py``, ``bash x.sh``) must exist.
- The docs site builds with ``mkdocs build --strict`` (a broken link or reference, or a docstring
  that names a parameter the signature lacks, fails it); skipped where the ``docs`` extra is not
  installed, unless HYKERNELS_REQUIRE_DOCS=1 (.ci/run sets it) on Python >= 3.11.
- Every public function, class, method and module has a docstring of its own, and every public
  name appears in docs/api.md.
- No file in the repository points outside it for the math: docs/math.md is the reference.
"""
from __future__ import annotations

import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]
PUBLIC_MODULES = ("hykernels", "hykernels.functional", "hykernels.hytuning", "hykernels.metrics",
                  "hykernels.integrations.transformers", "hykernels.apps.experiment",
                  *(("hykernels.integrations.trl",) if importlib.util.find_spec("trl") else ()))  # an optional extra

FENCE = re.compile(r"^(`{3,})\s*([\w+-]*)[^\n]*$")
SETUP_OPEN = "<!-- test-setup"


def code_blocks(path: Path) -> list[tuple[str, int, str]]:
    """(language, first line of the code (1-based), code) of every fenced block of ``path``, and
    ("python", line, code) for every ``<!-- test-setup ... -->`` comment, in file order."""
    lines = path.read_text().splitlines()
    blocks, i = [], 0
    while i < len(lines):
        stripped = lines[i].strip()
        if stripped.startswith(SETUP_OPEN):
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == "-->")
            blocks.append(("python", i + 2, "\n".join(lines[i + 1:end])))
            i = end + 1
            continue
        m = FENCE.match(stripped)
        if m:
            fence, lang = m.group(1), m.group(2).lower()
            indent = len(lines[i]) - len(lines[i].lstrip())
            end = next(j for j in range(i + 1, len(lines)) if lines[j].strip() == fence)
            body = [line[indent:] for line in lines[i + 1:end]]
            blocks.append((lang, i + 2, "\n".join(body)))
            i = end + 1
            continue
        i += 1
    return blocks


# Runs the python blocks of one file in order, in one namespace. Each block is compiled under
# the Markdown file's name, padded so that traceback line numbers are the file's own.
RUNNER = r"""
import json, sys
path, blocks = sys.argv[1], json.loads(sys.stdin.read())
ns = {"__name__": "__main__"}
for line, code in blocks:
    exec(compile("\n" * (line - 1) + code, path, "exec"), ns)
"""


def _rel(path: Path) -> str:
    return str(path.relative_to(ROOT))


def test_doc_files_found():
    assert (ROOT / "docs" / "math.md").exists() and len(DOC_FILES) > 5


@pytest.mark.parametrize("path", [p for p in DOC_FILES if any(lang == "python" for lang, *_ in code_blocks(p))],
                         ids=_rel)
def test_python_blocks_run(path, tmp_path):
    import json

    blocks = [(line, code) for lang, line, code in code_blocks(path) if lang == "python"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    env.pop("TRITON_INTERPRET", None)  # the blocks use the PyTorch backends; a GPU-less machine has no triton
    proc = subprocess.run([sys.executable, "-c", RUNNER, str(path)], input=json.dumps(blocks), text=True,
                          capture_output=True, cwd=tmp_path, env=env, timeout=600)
    assert proc.returncode == 0, f"a python block of {_rel(path)} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}"


SHELL = ("bash", "console", "sh", "shell")


def _shell_lines(path: Path):
    for lang, line, code in code_blocks(path):
        if lang in SHELL:
            for k, text in enumerate(code.splitlines()):
                yield line + k, text.split("#")[0]


def test_shell_blocks_name_real_commands():
    from hykernels import __main__ as cli

    problems = []
    for path in DOC_FILES:
        for line, text in _shell_lines(path):
            for sub in re.findall(r"python3? -m hykernels (\w+)", text):
                try:
                    cli.main([sub, "--help"])
                except SystemExit as e:
                    if e.code != 0:
                        problems.append(f"{_rel(path)}:{line}: `python -m hykernels {sub}` is no subcommand")
            for script in re.findall(r"(?:python3?|bash|torchrun [^|;&]*?)\s+([\w./-]+\.(?:py|sh))\b", text):
                if not (ROOT / script).exists():
                    problems.append(f"{_rel(path)}:{line}: {script} does not exist")
    assert not problems, "\n".join(problems)


def test_docs_build_strict(tmp_path):
    if os.environ.get("HYKERNELS_REQUIRE_DOCS") != "1" or sys.version_info < (3, 11):  # the extra needs 3.11
        pytest.importorskip("mkdocs")
        pytest.importorskip("mkdocstrings_handlers.python")
        pytest.importorskip("material")
    site = tmp_path / "site"
    env = dict(os.environ, NO_MKDOCS_2_WARNING="1")
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-f",
                           str(ROOT / "mkdocs.yml"), "-d", str(site)], capture_output=True, text=True, cwd=ROOT,
                          env=env, timeout=600)
    assert proc.returncode == 0, f"mkdocs build --strict failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    api = (site / "api" / "index.html").read_text()
    for name in ("fused_loss", "rd_weight", "BackendUnavailableError", "grpo_token_weights", "reliability_diagram"):
        assert name in api, f"the API page lacks {name}"
    math = (site / "math" / "index.html").read_text()
    assert "Row statistics and the one backward" in math


def _public(module_name: str) -> dict:
    module = importlib.import_module(module_name)
    names = getattr(module, "__all__", None)
    if names is None:  # the functions and classes the module itself defines
        names = [n for n, v in vars(module).items() if not n.startswith("_")
                 and (inspect.isfunction(v) or inspect.isclass(v)) and v.__module__ == module_name]
    return {n: getattr(module, n) for n in names}


def _own_doc(obj) -> str | None:
    """The docstring ``obj`` was written with (not one dataclass or NamedTuple made up from the
    signature, nor one inherited)."""
    doc = obj.__dict__.get("__doc__") if inspect.isclass(obj) else getattr(obj, "__doc__", None)
    if inspect.isclass(obj) and doc and doc.startswith(f"{obj.__name__}("):
        return None
    return doc.strip() if doc else None


def test_public_objects_have_docstrings():
    missing = []
    for module_name in PUBLIC_MODULES:
        if not _own_doc(importlib.import_module(module_name)):
            missing.append(module_name)
        for name, obj in _public(module_name).items():
            if inspect.ismodule(obj):
                if not _own_doc(obj):
                    missing.append(f"{module_name}.{name}")
                continue
            if not (inspect.isclass(obj) or callable(obj)):
                continue  # constants (LOSS_TYPES, __version__)
            if not _own_doc(obj):
                missing.append(f"{module_name}.{name}")
            if inspect.isclass(obj):
                for attr, member in vars(obj).items():
                    if attr.startswith("_") or not (inspect.isfunction(member) or isinstance(member, property)):
                        continue
                    target = member.fget if isinstance(member, property) else member
                    if not _own_doc(target):
                        missing.append(f"{module_name}.{name}.{attr}")
    assert not missing, f"public objects without a docstring: {sorted(set(missing))}"


def test_every_public_name_is_in_the_api_reference():
    api = (ROOT / "docs" / "api.md").read_text()
    documented = set(re.findall(r"^::: ([\w.]+)", api, flags=re.M))
    short = {d.rsplit(".", 1)[-1] for d in documented}
    missing = [f"{m}.{n}" for m in PUBLIC_MODULES for n, obj in _public(m).items()
               if n not in short and not inspect.ismodule(obj) and n != "__version__"]
    assert not missing, f"not in docs/api.md (as ::: directives): {missing}"


# Assembled here so that this file does not match itself.
OUTSIDE = ("../" + "shared", "shared/" + "spec", "hytuning" + ".md", "design" + ".md")


def test_no_reference_outside_the_repository():
    try:
        listed = subprocess.run(["git", "ls-files", "--cached", "--others", "--exclude-standard", "-z"], cwd=ROOT,
                                capture_output=True, text=True, check=True).stdout.split("\0")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    hits = []
    for rel in filter(None, listed):
        path = ROOT / rel
        if not path.is_file():
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue  # binary
        for k, line in enumerate(text.splitlines(), 1):
            if any(s in line for s in OUTSIDE):
                hits.append(f"{rel}:{k}: {line.strip()[:120]}")
    assert not hits, "files refer to documents outside the repository (cite docs/math.md §N):\n" + "\n".join(hits)
