"""Every snippet in docs/backend-authors.md runs as shown.

Python blocks are executed one by one (each in a fresh namespace, as a reader would
paste it) and any ``test_*`` function a block defines is called. Every
``python -m conformance`` command in the shell blocks must parse and name objects that
exist; the cheap ones (a factory, no lossless half, no ``--backend``) are run.
"""

from __future__ import annotations

import importlib.util
import re
import shlex
from pathlib import Path

import pytest

from conformance._cli import _load_object, _parser, main
from ssd_core.app import available_backends

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "backend-authors.md"
BLOCKS = re.findall(r"```(\w*)\n(.*?)```", DOC.read_text(), flags=re.S)
PYTHON = [code for lang, code in BLOCKS if lang == "python"]
COMMANDS = [
    line.split("  #")[0].strip()
    for lang, code in BLOCKS
    if lang == "sh"
    for line in code.splitlines()
    if line.startswith("python -m conformance")
]
#: Optional packages a block may import; the block is skipped without them.
OPTIONAL = ("torch", "transformers", "tokenizers", "hypothesis")


def test_the_doc_has_snippets() -> None:
    assert len(PYTHON) >= 8 and len(COMMANDS) >= 10 and len(LONG) == 1


def _run_block(index: int, *, call_tests: bool) -> None:
    code = PYTHON[index]
    for name in OPTIONAL:
        pattern = rf"^\s*(import|from) {name}\b"
        if re.search(pattern, code, flags=re.M) and importlib.util.find_spec(name) is None:
            pytest.skip(f"snippet {index} needs {name}")
    namespace: dict[str, object] = {"__name__": f"backend_authors_snippet_{index}"}
    exec(compile(code, f"{DOC}:python-block-{index}", "exec"), namespace)
    if call_tests:
        for name, obj in list(namespace.items()):
            if name.startswith("test_") and callable(obj):
                obj()


#: Blocks whose test functions sample thousands of runs (about 15 s on the shared
#: machine): their top level runs in the fast tier, their tests in the slow one.
LONG = [i for i, code in enumerate(PYTHON) if "check_lossless(" in code]


@pytest.mark.parametrize("index", range(len(PYTHON)))
def test_python_snippet_runs(index: int) -> None:
    _run_block(index, call_tests=index not in LONG)


@pytest.mark.slow
@pytest.mark.parametrize("index", LONG)
def test_long_python_snippet_tests_pass(index: int) -> None:
    _run_block(index, call_tests=True)


@pytest.mark.parametrize("command", COMMANDS)
def test_cli_command_parses_and_names_real_objects(
    command: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    argv = shlex.split(command)[3:]  # after "python -m conformance"
    ns = _parser().parse_args(argv)
    for target in (ns.factory, ns.draft, ns.reference):
        if target:
            assert _load_object(target) is not None
    for name in ns.backend:
        assert name == "all" or name in available_backends()
    if ns.factory and not ns.draft and not ns.backend:
        monkeypatch.chdir(tmp_path)  # --json writes into the working directory
        assert main(argv) == 0
