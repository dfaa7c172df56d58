"""The house's rules, checked: the metering wing imports no mitmproxy, asyncio or spool; spool
imports nothing of edgemeter; the -s script is only a hand-over; every error lives in its family's
errors module; nothing in the product loads a file by path.
"""

from __future__ import annotations

import ast
import importlib
import json
import pkgutil
import subprocess
import sys
from pathlib import Path

import pytest

import edgemeter
import spool
from edgemeter.errors import MeterError
from spool.errors import SpoolError
from tools.harness import ROOT

WING = ROOT / "edgemeter" / "metering"


def imported_modules(path: Path) -> set[str]:
    """Every module a file imports, at any depth (functions and TYPE_CHECKING blocks too)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module)
    return found


def top(name: str) -> str:
    return name.split(".", 1)[0]


@pytest.mark.parametrize("path", sorted(WING.rglob("*.py")), ids=lambda p: str(p.relative_to(ROOT)))
def test_the_metering_wing_imports_no_mitmproxy_asyncio_or_spool(path: Path) -> None:
    imports = imported_modules(path)
    assert not {top(m) for m in imports} & {"mitmproxy", "asyncio", "spool", "nats", "diskcache"}
    # Inside edgemeter it reaches only itself and the error family.
    outside = {
        m for m in imports if top(m) == "edgemeter" and not m.startswith("edgemeter.metering")
    }
    assert outside <= {"edgemeter.errors"}, outside


def test_importing_the_whole_wing_loads_none_of_them() -> None:
    """At run time too (a package __init__ could pull them in behind the static check)."""
    names = [m.name for m in pkgutil.walk_packages([str(WING)], "edgemeter.metering.")]
    code = (
        f"import importlib, sys\nfor name in {names!r}: importlib.import_module(name)\n"
        "print(sorted({m.split('.')[0] for m in sys.modules}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    loaded = set(json.loads(done.stdout.replace("'", '"')))
    assert len(names) > 15
    assert not loaded & {"mitmproxy", "asyncio", "spool", "nats", "diskcache", "prometheus_client"}


@pytest.mark.parametrize("path", sorted((ROOT / "spool").glob("*.py")), ids=lambda p: p.name)
def test_spool_imports_nothing_of_edgemeter(path: Path) -> None:
    assert "edgemeter" not in {top(m) for m in imported_modules(path)}
    assert "tools" not in {top(m) for m in imported_modules(path)}


def test_spool_exports_no_test_helpers() -> None:
    assert not {"ensure_stream", "stream_messages"} & set(spool.__all__)
    for name in spool.__all__:
        value = getattr(spool, name)
        assert isinstance(value, int) or value.__module__.startswith("spool."), name


@pytest.mark.parametrize(
    "path",
    sorted([*(ROOT / "edgemeter").rglob("*.py"), *(ROOT / "spool").glob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_product_loads_no_file_by_path_and_no_tooling(path: Path) -> None:
    imports = imported_modules(path)
    assert "importlib.util" not in imports
    assert {top(m) for m in imports}.isdisjoint({"tools", "tests", "addons"})
    assert "spec_from_file_location" not in path.read_text(encoding="utf-8")


def test_the_script_is_a_docstring_an_import_and_the_addon() -> None:
    tree = ast.parse((ROOT / "addons" / "meter.py").read_text(encoding="utf-8"))
    doc, *rest = tree.body
    assert isinstance(doc, ast.Expr) and isinstance(doc.value, ast.Constant)
    assert [ast.unparse(node) for node in rest] == [
        "from edgemeter import Meter",
        "addons = [Meter()]",
    ]


def _subclasses(base: type) -> set[type]:
    found: set[type] = set()
    sub: type
    for sub in base.__subclasses__():
        found |= {sub, *_subclasses(sub)}
    return found


def _import_every_module(package: object) -> None:
    for info in pkgutil.walk_packages(package.__path__, package.__name__ + "."):  # type: ignore[attr-defined]
        if not info.name.endswith(".__main__"):  # runs the command when imported
            importlib.import_module(info.name)


def test_every_error_lives_in_its_familys_errors_module() -> None:
    _import_every_module(edgemeter)
    _import_every_module(spool)
    ours = {c for c in _subclasses(MeterError) if c.__module__.startswith("edgemeter")}
    assert len(ours) >= 12
    assert {c.__module__ for c in ours} == {"edgemeter.errors"}
    spools = {c for c in _subclasses(SpoolError) if c.__module__.startswith("spool")}
    assert {c.__module__ for c in spools} == {"spool.errors"}
    docstrings = (edgemeter.errors.__doc__ or "") + (spool.errors.__doc__ or "")
    for cls in ours | spools:
        assert cls.__name__ in docstrings, f"{cls.__name__} is missing from the hierarchy"


def test_the_public_face_names_what_it_exports() -> None:
    assert set(edgemeter.__all__) == {"Meter", "MeterError", "Settings", "__version__"}
    assert edgemeter.Meter.__module__ == "edgemeter.addon"
    assert (ROOT / "edgemeter" / "py.typed").is_file()
    assert (ROOT / "spool" / "py.typed").is_file()
