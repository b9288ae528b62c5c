"""fk.gather: a round's task until enough valid results are in, for any controller."""

import time

import pytest
import torch

import fedkit as fk
from fedkit.client import Refused
from fedkit.data import ClientData


def flaky(fail_first: int):
    """An executor that fails its first ``fail_first`` attempts of every round, then answers a WEIGHT_DIFF of ones."""
    def execute(task, ctx, abort):
        if task.attempt < fail_first:
            raise RuntimeError(f"busy (attempt {task.attempt})")
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.ones_like(v) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: 1})
    return execute


def clients(*executors):
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    return [fk.Client(f"c{i}", ClientData(d, d), {"train": ex}) for i, ex in enumerate(executors)]


class Gathering(fk.Controller):
    """One round through fk.gather, recording what it returned."""

    rounds = 1

    def __init__(self, min_clients, max_retries):
        self.min_clients, self.max_retries, self.seen = min_clients, max_retries, {}

    def control_flow(self, fl):
        started = time.perf_counter()
        replies, results, attempts = fk.gather(
            fl, fl.client_names, lambda attempt: fk.Task("train", fl.model.task_data({}), round=0, attempt=attempt),
            lambda replies: fl.model.screen(replies, max_norm_ratio=None), self.min_clients, self.max_retries)
        self.seen.update(valid=sorted(results), attempts=attempts)
        fl.end_round(0, replies, started, attempts=attempts)


def test_a_short_round_is_retried_and_every_failure_is_recorded(tiny_model):
    wf = Gathering(min_clients=2, max_retries=2)
    run = fk.Simulator(wf, model=tiny_model, clients=clients(flaky(0), flaky(1), flaky(5))).run(progress=False)
    assert wf.seen == {"valid": ["c0", "c1"], "attempts": 2}
    failures = [(e["attempt"], e["client"]) for e in run.history.events if e.get("what") == "failed"]
    assert failures == [(0, "c1"), (0, "c2"), (1, "c2")]


def test_a_round_still_short_after_the_retries_fails_with_the_reasons(tiny_model):
    wf = Gathering(min_clients=3, max_retries=1)
    with pytest.raises(fk.RoundFailed, match=r"only 2 valid result\(s\) from 3 client\(s\) after 2 attempt\(s\).*"
                                             r"c2: RuntimeError: busy \(attempt 1\)"):
        fk.Simulator(wf, model=tiny_model, clients=clients(flaky(0), flaky(1), flaky(5))).run(progress=False)


def logged(executor, calls, name):
    """``executor``, noting (name, round, attempt) of every call in ``calls``."""
    def execute(task, ctx, abort):
        calls.append((name, task.round, task.attempt))
        return executor(task, ctx, abort)
    return execute


def test_a_retry_asks_only_the_clients_without_a_valid_result(tiny_model):
    calls = []
    wf = Gathering(min_clients=2, max_retries=2)
    run = fk.Simulator(wf, model=tiny_model, clients=clients(*(logged(flaky(k), calls, f"c{i}")
                                                              for i, k in enumerate((0, 1, 5))))).run(progress=False)
    assert calls == [("c0", 0, 0), ("c1", 0, 0), ("c2", 0, 0), ("c1", 0, 1), ("c2", 0, 1)]  # c0 answered: kept
    assert wf.seen == {"valid": ["c0", "c1"], "attempts": 2}
    rows = run.history.rounds[0].clients  # each client's row is the reply that counted
    assert {c: (row["attempt"], row["status"]) for c, row in rows.items()} == {"c0": (0, "ok"), "c1": (1, "ok"),
                                                                                 "c2": (1, "failed")}
    assert run.history.rounds[0].metrics["clients_ok"] == 2


def refusing(task, ctx, abort):
    raise Refused("privacy budget: spent")


def test_a_refusal_is_not_retried_and_a_round_it_leaves_short_stops_the_run_cleanly(tiny_model):
    calls = []
    run = fk.Simulator(fk.FedAvg(rounds=3, max_retries=2), model=tiny_model,
                       clients=clients(logged(flaky(1), calls, "c0"), logged(refusing, calls, "c1"))).run(progress=False)
    assert run.status == "done" and len(run.history) == 0 and run.weights["weight"].item() == 1.0
    assert calls == [("c0", 0, 0), ("c1", 0, 0)]  # nobody is asked again: the round cannot be made
    assert [e["what"] for e in run.history.events] == ["failed", "refused", "stopped"]
    assert run.summary()["stopped"].startswith("privacy budget: spent (round 0: 1 of 2 client(s) refused")
    assert run.error is None


def test_a_round_goes_on_without_a_client_that_refuses(tiny_model):
    calls = []
    run = fk.Simulator(fk.FedAvg(rounds=2, min_clients=1), model=tiny_model,
                       clients=clients(logged(flaky(0), calls, "c0"), logged(refusing, calls, "c1"))).run(progress=False)
    assert run.status == "done" and len(run.history) == 2 and run.weights["weight"].item() == 3.0
    assert [r.clients["c1"]["status"] for r in run.history] == ["refused", "refused"]
    assert calls == [("c0", 0, 0), ("c1", 0, 0), ("c0", 1, 0), ("c1", 1, 0)]


def test_a_retry_with_he_keeps_the_ciphertexts_of_the_first_attempt(digits):
    pytest.importorskip("tenseal")
    from fedkit.privacy.he import CKKS

    parts = fk.data.iid(digits.train.subset(torch.arange(300).numpy()), clients=3, seed=0)
    faults = fk.Faults(crash=0.3, seed=0)  # round 1: site-1 and site-2 crash at attempt 0; site-3 answers
    assert [faults.draw(1, f"site-{i}", 0) for i in (1, 2, 3)] == ["crash", "crash", None]
    run = fk.Simulator(fk.FedAvg(rounds=2, he=CKKS()), model=lambda: fk.models.for_data(digits), clients=parts,
                       faults=faults, train=fk.TrainConfig(validate=False)).run(progress=False)
    assert run.status == "done" and run.history.rounds[1].metrics["attempts"] == 2
