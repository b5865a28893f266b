"""glide/_native.pyi and the extension agree: every public name the module
and its Volume class export is declared in the stub, and the stub declares
nothing the extension lacks (names starting with an underscore are the
stub's own: shapes of returned dicts)."""

from __future__ import annotations

import ast
from pathlib import Path

from glide import _native

STUB = Path(__file__).resolve().parents[2] / "glide" / "_native.pyi"


def declared(body: list[ast.stmt]) -> set[str]:
    names: set[str] = set()
    for node in body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            names.add(node.target.id)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return {n for n in names if not n.startswith("_")}


def public(obj: object) -> set[str]:
    return {n for n in dir(obj) if not n.startswith("_")}


def test_module_names_match_the_stub() -> None:
    tree = ast.parse(STUB.read_text())
    assert declared(tree.body) == public(_native)


def test_volume_members_match_the_stub() -> None:
    tree = ast.parse(STUB.read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Volume"]
    assert declared(cls.body) == public(_native.Volume)


def test_constants_have_the_declared_types() -> None:
    assert _native.BLOCK_SIZE == 4096 and _native.MAX_IO == 32 << 20
    assert isinstance(_native.LATENCY_BUCKETS, tuple) and len(_native.LATENCY_BUCKETS) == 12
    assert all(isinstance(b, float) for b in _native.LATENCY_BUCKETS)
