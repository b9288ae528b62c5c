"""The words of a run's record: what came of a reply (`Status`), of a run (`RunStatus`), and the kinds of the
history's events (`Event`).

Each is a `str` enum whose values are the words history.json, summary.json and the CSVs have always held, so a
member is written, printed and compared as that word (``Status.OK == "ok"``, ``f"{Status.OK}"`` is ``ok``), and a
history read back from its files (plain strings) equals and prints as the live one.

>>> Status.LATE == "late", f"{RunStatus.DONE}", RunStatus.DONE, Event(Status.REFUSED) is Event.REFUSED
(True, 'done', 'done', True)
"""

from __future__ import annotations

from enum import Enum


class Word(str, Enum):
    """A `str` enum that reads as its value wherever text is made: ``str``, f-strings and ``format``, as Python
    3.11's ``StrEnum`` does, and ``repr`` too (which ``StrEnum`` does not), so that a run's events and
    summary print in a notebook as they always have (``{'what': 'stopped', ...}``). ``type(x)`` tells the enum."""

    __str__ = str.__str__
    __format__ = str.__format__
    __repr__ = str.__repr__


class Status(Word):
    """What came of one client's reply to one task (`fedkit.exchange.Reply.status`, the ``status`` of a round's
    client row)."""

    PENDING = "pending"  # posted, no answer yet
    OK = "ok"  # a result, accepted so far
    FAILED = "failed"  # the executor raised
    REFUSED = "refused"  # declined (e.g. a spent privacy budget): not retried
    DROPPED = "dropped"  # no answer at all
    LATE = "late"  # answered past the task's deadline
    REJECTED = "rejected"  # a result the server screened out


class RunStatus(Word):
    """Where a run stands (`fedkit.simulator.Run.status`, ``summary.json``'s ``status``)."""

    PENDING = "pending"  # built, not started
    RUNNING = "running"
    DONE = "done"  # ran its rounds (or stopped on purpose, e.g. a spent privacy budget)
    ABORTED = "aborted"  # stopped by the user (abort(), Ctrl-C): its last completed round is kept
    FAILED = "failed"  # raised: the error is kept
    REFUSED = "refused"  # never started: the CLI refused its settings (its JSON summary's status)


class Event(Word):
    """The ``what`` of a history event. A failed reply's event is its status (``Event(reply.status)``)."""

    FAILED = "failed"  # a client's executor raised; or, without a client, the run itself failed
    REFUSED = "refused"
    DROPPED = "dropped"
    LATE = "late"
    REJECTED = "rejected"
    INJECTED = "injected"  # an injected fault that no screen caught (fault injection's ground truth)
    STOPPED = "stopped"  # the workflow ended the run early on purpose, with its reason (e.g. a privacy budget)
    ABORTED = "aborted"  # the user stopped the run
    SAVE_FAILED = "save_failed"  # the run's results could not be written into its run directory
    ENGINE_CHANGED = "engine_changed"  # a resumed run continues on another engine than the checkpointed one
