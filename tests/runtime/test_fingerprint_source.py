"""Finding a class's source for its code fingerprint (api §6.1) without ``inspect.getsource``.

Fingerprints are part of every persisted cache key, so for every layout the source
finder handles (decorators, multi-line class lines, nested classes, strings that look
like code) the fingerprint must equal the one defined through ``inspect.getsource``.
"""

from __future__ import annotations

import ast
import hashlib
import inspect
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from soma.runtime.fingerprint import code_fingerprint
from soma.runtime.usercode import is_user_module
from _temp_modules import MakeModule, unique



def _framed(data: bytes) -> bytes:
    return len(data).to_bytes(8, "little") + data


def getsource_fingerprint(cls: type) -> str:
    """The fingerprint as api §6.1 defines it, found with ``inspect.getsource``."""
    digest = hashlib.sha256()
    for klass in cls.__mro__:
        if not is_user_module(klass.__module__, include_main=True):
            continue
        tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        code = b"ast:" + hashlib.sha256(ast.dump(tree, include_attributes=False).encode()).digest()
        digest.update(_framed(f"{klass.__module__}:{klass.__qualname__}".encode()))
        digest.update(_framed(code))
    return digest.hexdigest()


_LAYOUTS = '''
def tag(*args, **kwargs):
    if args and isinstance(args[0], type):
        return args[0]
    return lambda cls: cls


ITEMS = [
    "a",
]


class Base:
    scale = 2

    def fit(self, x, y=None):
        return {"mean": sum(x) / len(x)}


@tag
@tag(
    "a decorator over several lines",
    flag=True,
)
class Decorated(Base):
    def forward(self, x, state):
        return x


class Wide(
    Base,
):
    """A docstring with a line at column zero that reads like code:
class Wide:
    pass
"""

    @staticmethod
    def helper():
        return 1

    def forward(self, x, state):
        return [
    v * 2 for v in x
]


class Tall(
    Base,
    metaclass=type,
):
    def forward(self, x, state):
        return x


class Attributes(Base):
    _version = 3
    threshold = 0.5


def make_local():
    class Local(Base):
        def forward(self, x, state):
            return x

    return Local


class Outer:
    class Inner(Base):
        # nested, indented, with a comment
        def forward(self, x, state):
            return [v + 1 for v in x]
'''


@pytest.mark.parametrize(
    "path",
    ["Base", "Decorated", "Wide", "Tall", "Attributes", "make_local()", "Outer", "Outer.Inner"],
)
def test_fingerprints_match_the_getsource_definition(make_module: MakeModule, path: str) -> None:
    module = make_module(unique("layouts"), _LAYOUTS)
    cls = eval(path, vars(module))  # noqa: S307 - a fixed expression over the test module
    assert code_fingerprint(cls) == getsource_fingerprint(cls)


def test_decorators_count_and_comments_do_not(make_module: MakeModule) -> None:
    name = unique("decorated")
    original = code_fingerprint(make_module(name, _LAYOUTS).Decorated)
    commented = _LAYOUTS.replace("@tag\n@tag(", "# a comment\n@tag\n\n@tag(  # another\n")
    assert code_fingerprint(make_module(name, commented).Decorated) == original
    changed = make_module(name, _LAYOUTS.replace("flag=True", "flag=False")).Decorated
    assert code_fingerprint(changed) == getsource_fingerprint(changed)
    assert code_fingerprint(changed) != original


def test_a_redefined_class_is_fingerprinted_from_its_own_definition(
    make_module: MakeModule,
) -> None:
    source = """
    class Twice:
        def forward(self, x, state):
            return 1


    First = Twice


    class Twice:
        def forward(self, x, state):
            return 2
    """
    module = make_module(unique("twice"), source)
    # The class object bound last holds the second body: its methods' lines say so.
    assert code_fingerprint(module.Twice) != code_fingerprint(module.First)


def test_a_first_fit_does_not_import_the_child_pool(tmp_path: Path) -> None:
    # What a new process pays before its first fit can be served from a disk cache.
    script = textwrap.dedent(
        """
        import sys
        from soma import Filter
        from soma.graph import Graph

        class Double(Filter):
            _kind = "stateless"

            def forward(self, x, state):
                return [v * 2 for v in x]

        graph = Graph.somatize(Double(), cache_dir=sys.argv[1])
        graph.fit([1.0, 2.0])
        assert graph.forward([1.0, 2.0]) == [2.0, 4.0]
        loaded = {"soma.isolation.pool", "soma.runtime.subprocess_runner"} & set(sys.modules)
        print(sorted(loaded))
        """
    )
    (tmp_path / "first_fit.py").write_text(script)
    done = subprocess.run(
        [sys.executable, str(tmp_path / "first_fit.py"), str(tmp_path / "cache")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
