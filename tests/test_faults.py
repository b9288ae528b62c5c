"""Fault injection and fault tolerance: dropouts, crashes, stragglers, corrupt updates, retries."""

import threading
import time

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.faults import corrupt
from fedkit.server import Reply, Server
import fedkit.global_model as gm
from fedkit.global_model import RECENT_NORMS, screen, screen_norms


def diff_of(value, samples=1):
    def execute(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, value) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: samples, fk.MetaKey.NUM_STEPS: 1})
    return execute


def clients_of(*executors):
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    return [fk.Client(f"c{i}", ClientData(d, d), {"train": ex}) for i, ex in enumerate(executors)]


def test_draws_are_seeded_and_follow_the_probabilities():
    f = fk.Faults(dropout=0.1, crash=0.1, straggle=0.1, corrupt=0.1, seed=3)
    draws = [f.draw(r, f"site-{c}", 0) for r in range(200) for c in range(10)]
    assert draws == [f.draw(r, f"site-{c}", 0) for r in range(200) for c in range(10)]
    assert draws != [fk.Faults(dropout=0.1, crash=0.1, straggle=0.1, corrupt=0.1, seed=4).draw(r, f"site-{c}", 0)
                     for r in range(200) for c in range(10)]
    for kind in ("dropout", "crash", "straggle", "corrupt"):
        assert 0.07 < draws.count(kind) / len(draws) < 0.13, kind  # 2000 draws: about 7 standard deviations wide
    assert 0.55 < draws.count(None) / len(draws) < 0.65
    # a retry of the same round is a new draw
    assert [f.draw(0, "site-1", a) for a in range(20)] != [f.draw(0, "site-1", 0)] * 20


@pytest.mark.parametrize("kwargs, match", [
    (dict(dropout=1.5), "dropout is a probability"), (dict(crash=-0.1), "crash is a probability"),
    (dict(dropout=0.6, corrupt=0.6), "sum to 1.2"), (dict(corruptions=("nan", "fire")), "corruptions"),
    (dict(delay=0), "delay must be > 0"),
])
def test_bad_fault_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        fk.Faults(**kwargs)


@pytest.mark.parametrize("how, reason", [("nan", "non-finite"), ("inf", "non-finite"), ("keys", "keys do not match"),
                                         ("shape", "with shape")])
def test_each_corruption_is_caught_by_the_screen(how, reason):
    weights = {"w": torch.zeros(3), "b": torch.zeros(2)}
    good = fk.DXO("WEIGHT_DIFF", {"w": torch.ones(3), "b": torch.ones(2)}, {"num_samples": 1})
    task = fk.Task("train", fk.DXO("WEIGHTS", weights))
    replies = {"ok": Reply("ok", task, good, status="ok"), "bad": Reply("bad", task, corrupt(good, how), status="ok")}
    valid = screen(replies, weights, max_norm_ratio=None)
    assert list(valid) == ["ok"]
    assert replies["bad"].status == "rejected" and reason in replies["bad"].error


def test_scaled_garbage_is_caught_by_the_norm_screen_only_with_enough_peers():
    weights = {"w": torch.zeros(4)}
    task = fk.Task("train", fk.DXO("WEIGHTS", weights))

    def replies(n):
        r = {f"c{i}": Reply(f"c{i}", task, fk.DXO("WEIGHT_DIFF", {"w": torch.full((4,), 0.1 * (i + 1))}), status="ok")
             for i in range(n)}
        r["evil"] = Reply("evil", task, corrupt(fk.DXO("WEIGHT_DIFF", {"w": torch.ones(4)}), "scale"), status="ok")
        return r

    many = replies(3)
    assert sorted(screen(many, weights, max_norm_ratio=10.0)) == ["c0", "c1", "c2"]
    assert "median" in many["evil"].error
    assert "evil" in screen(replies(1), weights, max_norm_ratio=10.0)  # two updates: no notion of typical
    assert "evil" in screen(replies(3), weights, max_norm_ratio=None)


def test_quarter_of_clients_failing_each_round_still_learns(digits):
    faults = fk.Faults(dropout=0.07, crash=0.06, straggle=0.06, corrupt=0.06, seed=1)
    parts = fk.data.iid(digits.train, clients=8, seed=0)
    run = fk.Simulator(fk.FedAvg(rounds=10, min_clients=4, task_timeout=60), model=lambda: fk.models.for_data(digits),
                       clients=parts, test=digits.test, faults=faults).run(progress=False)
    assert run.status == "done"
    assert run.history.last("accuracy") >= 0.9
    failures = [e for e in run.history.events if "client" in e]
    kinds = {e["what"] for e in failures}
    assert kinds == {"dropped", "failed", "late", "rejected"}
    assert all(e["reason"] for e in failures)
    # every failure of a completed round shows in that round's client rows too, with its reason
    rows = run.history.client_dataframe()
    bad_rows = rows[rows["status"] != "ok"]
    last_attempt = {r.round: r.metrics["attempts"] - 1 for r in run.history}
    assert len(bad_rows) == sum(1 for e in failures if e["attempt"] == last_attempt[e["round"]])
    assert bad_rows["error"].str.len().min() > 0
    assert run.summary()["failures"] == len(failures)
    assert sum(run.history.to_dataframe()["clients_failed"]) == len(bad_rows)


def test_same_faults_same_weights(digits):
    def once():
        return fk.Simulator(fk.FedAvg(rounds=3, min_clients=2), model=lambda: fk.models.for_data(digits),
                            clients=fk.data.iid(digits.train, 4), faults=fk.Faults(crash=0.3, corrupt=0.2)).run(progress=False)
    assert once().model_sha256 == once().model_sha256


def test_round_retries_then_stops_and_leaves_the_model(tiny_model):
    def broken(task, ctx, abort):
        raise OSError("GPU fell off")
    sim = fk.Simulator(fk.FedAvg(rounds=3, max_retries=2), model=tiny_model, clients=clients_of(diff_of(1.0), broken))
    handle = sim.start()
    handle._done.wait(10)
    assert handle.status == "failed" and isinstance(handle.error, fk.RoundFailed)
    assert "3 attempt(s)" in str(handle.error) and "OSError: GPU fell off" in str(handle.error)
    assert handle.weights["weight"].item() == 1.0 and len(handle.history) == 0
    attempts = [e["attempt"] for e in handle.history.events if e.get("client") == "c1"]
    assert attempts == [0, 1, 2]


def test_a_retry_can_save_the_round(tiny_model):
    def flaky(task, ctx, abort):
        if task.attempt == 0:
            raise RuntimeError("transient")
        return diff_of(3.0)(task, ctx, abort)
    run = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=clients_of(diff_of(1.0), flaky)).run(progress=False)
    assert run.weights["weight"].item() == pytest.approx(1.0 + 2.0)
    assert run.history.rounds[0].metrics["attempts"] == 2


def test_min_clients_lets_a_round_go_on_without_the_failed(tiny_model):
    def broken(task, ctx, abort):
        raise RuntimeError("no")
    run = fk.Simulator(fk.FedAvg(rounds=2, min_clients=1), model=tiny_model,
                       clients=clients_of(diff_of(1.0), broken)).run(progress=False)
    assert run.weights["weight"].item() == pytest.approx(3.0)
    assert [r.clients["c1"]["status"] for r in run.history] == ["failed", "failed"]


def test_a_real_straggler_is_cut_at_the_deadline(tiny_model):
    def slow(task, ctx, abort):
        while True:
            abort.check()
            time.sleep(0.01)
    started = time.perf_counter()
    run = fk.Simulator(fk.FedAvg(rounds=1, min_clients=1, task_timeout=0.2), model=tiny_model,
                       clients=clients_of(diff_of(1.0), slow)).run(progress=False)
    assert time.perf_counter() - started < 5
    assert run.history.rounds[0].clients["c1"]["status"] == "late"
    assert "deadline" in run.history.rounds[0].clients["c1"]["error"]
    assert run.weights["weight"].item() == pytest.approx(2.0)


def test_simulated_stragglers_are_late_only_with_a_deadline(tiny_model):
    clients = clients_of(diff_of(1.0))
    strict = fk.Simulator(fk.FedAvg(rounds=1, task_timeout=10, max_retries=0), model=tiny_model, clients=clients,
                          faults=fk.Faults(straggle=1.0))
    with pytest.raises(fk.RoundFailed, match="late: answered after 3.6e\\+03 s, the deadline is 10 s"):
        strict.run(progress=False)
    patient = fk.Simulator(fk.FedAvg(rounds=1), model=tiny_model, clients=clients, faults=fk.Faults(straggle=1.0))
    assert patient.run(progress=False).history.rounds[0].clients["c0"]["seconds"] >= 3600


def test_dropouts_are_reported_as_no_answer(tiny_model):
    run = fk.Simulator(fk.FedAvg(rounds=1, min_clients=1), model=tiny_model, clients=clients_of(diff_of(1.0), diff_of(2.0)),
                       faults=fk.Faults(dropout=0.5, seed=0)).start()
    run._done.wait(10)
    statuses = {e["what"] for e in run.history.events if "client" in e}
    assert statuses <= {"dropped"}
    if statuses:
        assert any("no answer" in e["reason"] for e in run.history.events)


@pytest.mark.parametrize("kwargs, match", [
    (dict(min_clients=0), "min_clients"), (dict(max_retries=-1), "max_retries"),
    (dict(task_timeout=0), "task_timeout"), (dict(max_norm_ratio=0.5), "max_norm_ratio"),
    (dict(clients_per_round=2, min_clients=3), "can never be met"),
])
def test_bad_fault_tolerance_settings(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        fk.FedAvg(**kwargs)


def test_min_clients_above_federation_size(tiny_model):
    sim = fk.Simulator(fk.FedAvg(rounds=1, min_clients=5), model=tiny_model, clients=clients_of(diff_of(1.0)))
    with pytest.raises(fk.ConfigError, match="min_clients=5 but the federation has only 1"):
        sim.run(progress=False)


# ------------------------------------------------------------------ every injected fault screened or recorded


def screened(norms, recent, model_norm=1.0, ratio=10.0):
    """screen_norms on replies whose updates have the given norms (one weight each): (kept, replies)."""
    weights = {"w": torch.zeros(1)}
    task = fk.Task("train", fk.DXO("WEIGHTS", weights))
    replies = {f"c{i}": Reply(f"c{i}", task, fk.DXO("WEIGHT_DIFF", {"w": torch.tensor([float(v)])}), status="ok")
               for i, v in enumerate(norms)}
    return screen_norms(replies, {n: r.result for n, r in replies.items()}, ratio, recent, model_norm), replies


def test_a_scaled_update_is_caught_without_three_peers():
    recent = [0.2, 0.3, 0.1]
    kept, replies = screened([0.25, 5e4], recent)  # two clients: the recent accepted updates say what is typical
    assert list(kept) == ["c0"] and "the median norm 0.2 of the last 3 accepted update(s)" in replies["c1"].error
    assert recent == [0.2, 0.3, 0.1, 0.25]  # only what was kept joins the history
    kept, replies = screened([5e4], [], model_norm=2.0)  # the first update of a run: the model's own norm
    assert kept == {} and "the global model's own norm 2" in replies["c0"].error
    kept, _ = screened([5.0], [], model_norm=0.0)  # nothing to compare with (a zero model, no history): kept
    assert list(kept) == ["c0"]
    kept, replies = screened([0.2, 4e4, 5e4], [0.2])  # three peers, but a majority of garbage cannot vouch for itself
    assert list(kept) == ["c0"] and "itself implausible" in replies["c2"].error
    kept, _ = screened([0.2, 0.3, 2.5], [0.2])  # a plain outlier among peers stays within 10x the round's median
    assert list(kept) == ["c0", "c1", "c2"]
    recent = [1.0] * 30
    screened([1.0], recent)
    assert len(recent) == RECENT_NORMS  # a short history, plain floats, checkpointed with the server state


def test_the_norm_screen_judges_norm_whole_and_per_local_step():
    """Issue 18 item 5: a client with more data takes more steps and moves further; an update is rejected only
    when it is too large both whole and per step."""
    def result(size, steps=None, samples=None):
        meta = {k: v for k, v in ((fk.MetaKey.NUM_STEPS, steps), (fk.MetaKey.NUM_SAMPLES, samples)) if v is not None}
        return fk.DXO("WEIGHT_DIFF", {"w": torch.tensor([float(size)])}, meta)

    # the failing case: three 1- or 2-step clients near 0.15, one honest 1,001-sample client at 6.88 over 63 steps
    sizes = {"s0": result(0.14, 1, 12), "s1": result(0.15, 1, 12), "s2": result(0.16, 2, 20), "big": result(6.88, 63, 1001)}
    kept, replies = screened_results(sizes, [])
    assert sorted(kept) == ["big", "s0", "s1", "s2"] and gm.credited_steps(sizes["big"]) == 63
    # a client that took fewer steps than its peers may be ahead of them per step: its whole norm is typical
    kept, _ = screened_results({"a": result(3.0, 60, 900), "b": result(3.3, 60, 900), "c": result(3.1, 63, 1001),
                                "small": result(1.0, 1, 12)}, [])
    assert "small" in kept
    # scaled garbage is still caught, with or without peers, however many steps it honestly reports
    kept, replies = screened_results({**sizes, "evil": result(5e4, 63, 1001)}, [])
    assert "evil" not in kept and "over 63 local step(s)" in replies["evil"].error
    recent, per_step = [0.15, 0.1], [0.15, 0.1]
    kept, replies = screened_results({"big": result(6.88, 63, 1001), "evil": result(5e4, 2, 20)}, recent, per_step)
    assert list(kept) == ["big"] and "per step" in replies["evil"].error
    assert recent[-1] == pytest.approx(6.88) and per_step[-1] == pytest.approx(6.88 / 63)  # what is typical next time
    # the steps are self-reported: the credit stops at the samples the client reports (what FedAvg weighs it by)
    kept, replies = screened_results({**sizes, "liar": result(50.0, 10**6, 12)}, [])
    assert "liar" not in kept and "over 12 local step(s)" in replies["liar"].error
    # without both counts (an executor of one's own), an update's norm is judged whole, as before
    assert gm.credited_steps(result(1.0, steps=40)) == gm.credited_steps(result(1.0, steps=True, samples=5)) == 1
    kept, _ = screened_results({**sizes, "big": result(6.88)}, [])
    assert "big" not in kept
    # the refusal says what to change, in the API's words (the CLI says --max-norm-ratio)
    assert "raise max_norm_ratio or set max_norm_ratio=None" in replies["liar"].error
    # `screen` (the three-peer check the encrypted model uses) judges the same way
    task = fk.Task("train", fk.DXO("WEIGHTS", {"w": torch.zeros(1)}))
    rs = {n: Reply(n, task, r, status="ok") for n, r in {**sizes, "evil": result(5e4, 63, 1001)}.items()}
    assert sorted(screen(rs, {"w": torch.zeros(1)}, max_norm_ratio=10.0)) == ["big", "s0", "s1", "s2"]
    assert "per step" in rs["evil"].error


def screened_results(results, recent, per_step=None, model_norm=1.0, ratio=10.0):
    """screen_norms on replies holding ``results`` (name -> DXO): (kept, replies)."""
    task = fk.Task("train", fk.DXO("WEIGHTS", {"w": torch.zeros(1)}))
    replies = {n: Reply(n, task, r, status="ok") for n, r in results.items()}
    return screen_norms(replies, dict(results), ratio, recent, model_norm, per_step), replies


@pytest.mark.parametrize("alpha", [0.3, 0.5])
@pytest.mark.parametrize("clients", [6, 8])
@pytest.mark.parametrize("algorithm", [fk.FedAvg, fk.SCAFFOLD], ids=["FedAvg", "SCAFFOLD"])
def test_fedavg_and_scaffold_finish_on_quantity_skew(digits, one_thread, algorithm, clients, alpha):
    """20 seeds of each; before the norm screen judged norms per step, up to 4 of them failed (the largest
    client rejected every attempt). Two rounds: the rejections came in the first."""
    failed = []
    for seed in range(20):
        sim = fk.Simulator(algorithm(rounds=2), model=lambda: fk.models.for_data(digits),
                           clients=fk.data.quantity_skew(digits.train, clients, alpha=alpha, seed=seed),
                           train=fk.TrainConfig(validate=False), seed=seed)
        try:
            assert sim.run(progress=False).history.events == []  # nobody rejected
        except fk.RoundFailed as e:
            failed.append((seed, str(e)[-200:]))
    assert failed == []


@pytest.mark.parametrize("n, min_clients", [(2, None), (3, 2)])
def test_scaled_corruption_with_few_clients_is_screened_and_learning_goes_on(digits, n, min_clients, one_thread):
    faults = fk.Faults(corrupt=0.3, corruptions=("scale",))

    def once(faults):
        return fk.Simulator(fk.FedAvg(rounds=4, min_clients=min_clients), model=lambda: fk.models.for_data(digits),
                            clients=fk.data.iid(digits.train, clients=n, seed=0), test=digits.test,
                            faults=faults).run(progress=False)

    clean, attacked = once(None), once(faults)
    injected = [e for e in attacked.history.events if "fault" in e]
    assert len(injected) >= 2 and all(e["what"] == "rejected" and e["corruption"] == "scale" for e in injected)
    assert all(faults.draw(e["round"], e["client"], e["attempt"]) == "corrupt" for e in injected)
    assert attacked.history.last("accuracy") >= clean.history.last("accuracy") - 0.02


def test_an_injected_fault_no_screen_can_see_is_still_on_record(tiny_model):
    sim = fk.Simulator(fk.FedAvg(rounds=2, max_norm_ratio=None), model=tiny_model,
                       clients=clients_of(diff_of(1.0), diff_of(1.0)),
                       faults=fk.Faults(corrupt=0.5, straggle=0.5, corruptions=("scale",), seed=1))
    run = sim.run(progress=False)
    assert run.status == "done"
    events = run.history.events
    assert len(events) == 4 and all(e["what"] == "injected" for e in events)
    by_fault = {e["fault"]: e for e in events}
    assert by_fault["corrupt"]["corruption"] == "scale" and "passed every check" in by_fault["corrupt"]["reason"]
    assert by_fault["straggle"]["delay"] == 3600 and "no deadline" in by_fault["straggle"]["reason"]
    rows = run.history.client_dataframe()
    assert set(rows["fault"]) == {"corrupt", "straggle"} and set(rows["status"]) == {"ok"}
    assert run.summary()["failures_by_kind"] == {"injected": 4}


# ------------------------------------------------------------------ a client that never returns


@pytest.fixture
def gate():
    """An event a blocking executor waits on (30 s at most); set when the test ends, so no thread outlives it long."""
    release = threading.Event()
    yield release
    release.set()
    until = time.monotonic() + 5
    while any(t.name.startswith("fedkit-c1-") for t in threading.enumerate()) and time.monotonic() < until:
        time.sleep(0.01)


def blocking(release, entered=None):
    def execute(task, ctx, abort):
        if entered is not None:
            entered.set()
        release.wait(30)  # checks neither the deadline nor the abort signal
        return diff_of(5.0)(task, ctx, abort)
    return execute


def test_a_blocking_client_is_cut_at_the_deadline_and_not_waited_for_again(tiny_model, gate):
    started = time.perf_counter()
    run = fk.Simulator(fk.FedAvg(rounds=3, min_clients=1, task_timeout=1), model=tiny_model,
                       clients=clients_of(diff_of(1.0), blocking(gate))).run(progress=False)
    seconds = time.perf_counter() - started
    assert run.status == "done" and seconds < 3  # one wait for the deadline, not 30 s per round
    assert run.history.rounds[0].seconds < 2
    assert [r.clients["c1"]["status"] for r in run.history] == ["late"] * 3
    assert "1 s deadline" in run.history.rounds[0].clients["c1"]["error"]
    assert all("still busy" in r.clients["c1"]["error"] for r in run.history.rounds[1:])  # not started again
    busy = [t.name for t in threading.enumerate() if t.name.startswith("fedkit-c")]
    assert busy == ["fedkit-c1-train-0-0"]  # one worker stuck in round 0's task, no pile-up; c0's is free again
    assert run.weights["weight"].item() == pytest.approx(4.0)  # c0's three updates; c1's answer never counts


def test_abort_returns_at_once_while_a_client_blocks(tiny_model, gate):
    entered = threading.Event()
    run = fk.Simulator(fk.FedAvg(rounds=3), model=tiny_model, clients=clients_of(diff_of(1.0), blocking(gate, entered))).start()
    assert entered.wait(10)
    started = time.perf_counter()
    run.abort()
    run.wait(5)
    assert run.status == "aborted" and time.perf_counter() - started < 1
    assert run.weights["weight"].item() == 1.0 and len(run.history) == 0


def test_answers_after_the_deadline_or_the_collection_are_ignored():
    server = Server({"w": torch.zeros(1)})
    task = server.post(fk.Task("train", fk.DXO("WEIGHTS", {"w": torch.zeros(1)})), ["a", "b"])
    pulled = server.pull("a"), server.pull("b")
    update = fk.DXO("WEIGHT_DIFF", {"w": torch.ones(1)})
    server.fail("a", pulled[0], "late: no answer", status="late")  # what the engine does at the deadline
    server.submit("a", pulled[0], update)  # the thread answers later: ignored
    server.submit("b", pulled[1], update)
    server.submit("b", pulled[1], update)  # a second answer: ignored
    replies = server.collect(task)
    assert replies["a"].status == "late" and replies["a"].result is None and replies["b"].status == "ok"
    server.submit("a", pulled[0], update)  # after the collection: ignored, no error
    server.fail("b", pulled[1], "boom")
    other = server.post(fk.Task("train", fk.DXO("WEIGHTS", {"w": torch.zeros(1)})), ["a"])
    with pytest.raises(LookupError, match="never given"):  # a mistake, not a late answer: still an error
        server.submit("c", other, update)
