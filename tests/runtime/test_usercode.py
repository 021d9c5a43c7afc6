"""Which modules are the user's own, by-value registration and source capture (api §4.2, §11.51)."""

from __future__ import annotations

import importlib
import json
import subprocess
import sys
import textwrap
import types
import uuid
from collections.abc import Callable, Iterator
from fractions import Fraction
from pathlib import Path

import cloudpickle
import numpy as np
import pytest

from soma.runtime.usercode import capture_source, is_user_module, register_by_value

MakeModule = Callable[[str, str], types.ModuleType]


@pytest.fixture
def make_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[MakeModule]:
    """Write ``<name>.py`` into a temp dir on sys.path and import it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(sys, "dont_write_bytecode", True)
    imported: list[str] = []

    def make(name: str, source: str) -> types.ModuleType:
        (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        imported.append(name)
        return importlib.import_module(name)

    yield make
    for name in imported:
        sys.modules.pop(name, None)
        if name in cloudpickle.list_registry_pickle_by_value():
            cloudpickle.unregister_pickle_by_value(types.ModuleType(name))


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.mark.parametrize("name", ["json", "os.path", "collections.abc", "sys", "builtins"])
def test_stdlib_and_builtin_modules_are_not_user_modules(name: str) -> None:
    importlib.import_module(name)
    assert not is_user_module(name, include_main=True)


@pytest.mark.parametrize(
    "name", ["soma", "soma.runtime.usercode", "cloudpickle", "numpy", "numpy.linalg"]
)
def test_soma_and_excluded_libraries_are_not_user_modules(name: str) -> None:
    importlib.import_module(name)
    assert not is_user_module(name, include_main=True)


@pytest.mark.parametrize("name", ["xxhash", "hypothesis", "_pytest.fixtures"])
def test_site_packages_modules_are_not_user_modules(name: str) -> None:
    importlib.import_module(name)
    assert not is_user_module(name, include_main=True)


def test_frozen_modules_are_not_user_modules() -> None:
    spec = sys.modules["_frozen_importlib"].__spec__
    assert spec is not None and spec.origin == "frozen"
    assert not is_user_module("_frozen_importlib", include_main=True)


def test_a_temp_dir_module_is_a_user_module(make_module: MakeModule) -> None:
    name = unique("usermod")
    make_module(name, "X = 1\n")
    assert is_user_module(name, include_main=False)
    assert is_user_module(name, include_main=True)


def test_a_module_under_dist_packages_is_not_a_user_module(make_module: MakeModule) -> None:
    name = unique("vendored")
    module = make_module(name, "X = 1\n")
    module.__file__ = str(Path("/usr/lib/python3/dist-packages") / f"{name}.py")
    assert not is_user_module(name, include_main=True)


def test_modules_without_a_file_or_not_imported_are_not_user_modules(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    name = unique("fileless")
    monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    assert not is_user_module(name, include_main=True)
    assert not is_user_module(unique("never_imported"), include_main=True)


def test_main_counts_only_when_asked() -> None:
    assert is_user_module("__main__", include_main=True)
    assert not is_user_module("__main__", include_main=False)


_FILTERS = """
class Base:
    def forward(self, x, state):
        return x


class Doubler(Base):
    def forward(self, x, state):
        return x * 2
"""


def test_register_by_value_ships_user_classes_to_a_process_without_them(
    make_module: MakeModule, tmp_path: Path
) -> None:
    base_name = unique("userbase")
    make_module(base_name, _FILTERS)
    name = unique("userfilters")
    module = make_module(name, f"from {base_name} import Base\n\nclass Doubler(Base):\n    k = 2\n")
    doubler = module.Doubler()
    register_by_value(doubler)
    register_by_value(doubler)  # idempotent
    registry = cloudpickle.list_registry_pickle_by_value()
    assert {name, base_name} <= registry
    blob = tmp_path / "doubler.pkl"
    blob.write_bytes(cloudpickle.dumps(doubler))
    # The child runs elsewhere, without the temp dir on its path.
    script = (
        "import pickle, sys; "
        f"obj = pickle.loads(open({str(blob)!r}, 'rb').read()); "
        "print(type(obj).__name__, obj.k, obj.forward(21, None))"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, cwd="/"
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["Doubler", "2", "21"]


def test_register_by_value_leaves_library_modules_alone() -> None:
    before = cloudpickle.list_registry_pickle_by_value()
    register_by_value(Fraction(1, 3))
    register_by_value(np.zeros(2))
    register_by_value(json.JSONDecoder())
    assert cloudpickle.list_registry_pickle_by_value() == before


def test_capture_source_returns_the_defining_module(make_module: MakeModule) -> None:
    module = make_module(unique("captured"), _FILTERS)
    source = capture_source(module.Doubler())
    assert "class Doubler(Base):" in source
    assert "class Base:" in source


def test_capture_source_is_empty_when_unavailable(monkeypatch: pytest.MonkeyPatch) -> None:
    name = unique("nosource")
    module = types.ModuleType(name)
    monkeypatch.setitem(sys.modules, name, module)
    exec("class Generated:\n    pass\n", module.__dict__)
    assert capture_source(module.Generated()) == ""
    assert capture_source(3) == ""
