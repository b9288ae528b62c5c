"""Reply statuses, run statuses and event kinds: str enums that read, print and serialise as their words."""

from __future__ import annotations

import ast
import csv
import io
import json
from pathlib import Path

import pandas as pd
import pytest

from fedkit.history import dumps
from fedkit.status import Event, RunStatus, Status

PACKAGE = Path(__file__).parent.parent / "fedkit"
ENUMS = (Status, RunStatus, Event)
WORDS = {m.value for e in ENUMS for m in e}


@pytest.mark.parametrize("member", [m for e in ENUMS for m in e], ids=str)
def test_a_status_is_written_as_its_word(member):
    word = member.value
    assert member == word and hash(member) == hash(word) and {word: 1}[member] == 1  # plain strings read back match
    assert str(member) == f"{member}" == f"{member:>0}" == "%s" % member == word and repr(member) == repr(word)
    assert json.dumps({member: member}) == json.dumps({word: word}) and dumps({"s": member}) == dumps({"s": word})
    out = io.StringIO()
    csv.writer(out).writerow([member])
    assert out.getvalue().strip() == word
    assert pd.DataFrame({"status": [member]}).to_csv(index=False) == f"status\n{word}\n"


def test_the_words_are_those_files_have_always_held():
    assert {m.value for m in Status} == {"pending", "ok", "failed", "refused", "dropped", "late", "rejected"}
    assert {m.value for m in RunStatus} == {"pending", "running", "done", "aborted", "failed", "refused"}
    assert {m.value for m in Event} >= {m.value for m in Status} - {"pending", "ok"}
    assert Event(Status.LATE) is Event.LATE


def bare_statuses(source: str, where: str = "<string>") -> list[str]:
    """The places in ``source`` where a status or event word is written as a bare string: compared with, assigned to
    a ``status``, passed as ``status=``/``what=`` or to ``reject``/``fail``/``event``/``Answer``, a ``status``'s
    default, or a ``"status"``/``"what"`` value in a dict literal."""
    found: list[str] = []

    def bare(node: ast.AST | None) -> list[ast.Constant]:
        if node is None:
            return []
        return [n for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str) and n.value in WORDS]

    def named_status(target: ast.AST) -> bool:
        name = target.attr if isinstance(target, ast.Attribute) else getattr(target, "id", "")
        return name == "status" or name.endswith("_status")

    for node in ast.walk(ast.parse(source)):
        suspects: list[ast.Constant] = []
        if isinstance(node, ast.Compare):
            suspects = bare(node)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            flat = [t for target in targets for t in (target.elts if isinstance(target, ast.Tuple) else [target])]
            if any(named_status(t) for t in flat):
                suspects = bare(node.value)
        elif isinstance(node, ast.keyword) and node.arg in ("status", "what"):
            suspects = bare(node.value)
        elif isinstance(node, ast.Call):
            func = node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
            if func in ("reject", "fail", "event", "Answer", "Reply"):
                suspects = [c for a in node.args for c in bare(a) if a is c]
        elif isinstance(node, ast.arguments):
            params = [*node.posonlyargs, *node.args]
            pairs = [*zip(params[len(params) - len(node.defaults):], node.defaults),
                     *((a, d) for a, d in zip(node.kwonlyargs, node.kw_defaults) if d is not None)]
            suspects = [c for a, d in pairs if a.arg == "status" for c in bare(d)]
        elif isinstance(node, ast.Dict):
            suspects = [c for k, v in zip(node.keys, node.values)
                        if isinstance(k, ast.Constant) and k.value in ("status", "what") for c in bare(v)]
        found += [f"{where}:{c.lineno}: {c.value!r}" for c in suspects]
    return sorted(set(found))


def test_the_bare_status_check_finds_every_kind_of_site():
    source = '''
if reply.status == "ok": pass
run.status = "done"
x.status, y = "failed", 1
reply.reject("rejected", why)
fl.event(rnd, "stopped", reason=r)
Answer("late", error=e)
server.fail(c, t, e, status="refused")
def say(status="aborted"): pass
row = {"what": "injected", "status": "dropped"}
flag = e.get("what") in ("save_failed", "engine_changed")
'''
    assert len(bare_statuses(source)) == 12
    fine = '''
if reply.status == Status.OK: pass
summary = {"stopped": reason, "interrupted": name}
signal.trigger("aborted by the user")
raise Aborted(reason or "aborted")
'''
    assert bare_statuses(fine) == []


def test_no_bare_status_string_outside_the_enums_module():
    found = []
    for path in sorted(PACKAGE.rglob("*.py")):
        if path.name != "status.py" or path.parent != PACKAGE:
            found += bare_statuses(path.read_text(), str(path.relative_to(PACKAGE.parent)))
    assert found == [], "use fedkit.status (Status, RunStatus, Event) instead of the bare words:\n" + "\n".join(found)
