"""Seed streams: each named once in fedkit.seeds, and no number retyped where a stream is drawn."""

from __future__ import annotations

import ast
from pathlib import Path

from fedkit import seeds

PACKAGE = Path(__file__).parent.parent / "fedkit"


def bare_streams(source: str, where: str = "<string>") -> list[str]:
    """Calls in ``source`` of ``derive_seed(...)`` or ``.rng(...)`` with a whole number written as an argument."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("derive_seed", "rng") and any(isinstance(a, ast.Constant) and isinstance(a.value, int)
                                                      for a in node.args):
                found.append(f"{where}:{node.lineno}: {ast.unparse(node)}")
    return found


def test_no_seed_stream_is_a_bare_number_outside_fedkit_seeds():
    assert len(bare_streams("derive_seed(seed, i, 1)\nfl.rng(rnd, 3)\nderive_seed(seed, i, seeds.CLIENT)")) == 2
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path != PACKAGE / "seeds.py":
            found += bare_streams(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert found == [], "name the stream in fedkit/seeds.py:\n" + "\n".join(found)


def test_streams_of_a_group_are_distinct():
    groups = [("CLIENT", "VAL_SPLIT"), ("SAMPLE_CLIENTS", "CYCLIC_ORDER", "SAMPLE_POISSON"),
              ("DP_SGD_NOISE", "LOCAL_DP_NOISE"), ("DP_FEDAVG_NOISE", "DP_FEDAVG_COUNT_NOISE")]
    for names in groups:
        values = [getattr(seeds, n) for n in names]
        assert len(set(values)) == len(values), names
    assert {n for g in groups for n in g} == {n for n in vars(seeds) if n.isupper()}  # every stream is in a group
