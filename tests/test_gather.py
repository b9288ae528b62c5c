"""fk.gather: a round's task until enough valid results are in, for any controller."""

import time

import pytest
import torch

import fedkit as fk
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
