"""Chaining workflows: parts run in order on one federation, with their rounds shifted into one sequence."""

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.simulator import serve
from fedkit.server import Channel, Server, ServerContext
from fedkit.workflows import Chain, CrossSiteEval, Cyclic, FederatedScaling, FedAvg, FedStats


def recording_clients(seen, n=3):
    def execute(task, ctx, abort):
        seen.append((task.round, ctx.client, ctx.seed))
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, 0.5) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: 1})
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    return [fk.Client(f"c{i}", ClientData(d, d), {"train": execute}) for i in range(n)]


def test_rounds_add_up_and_analysis_parts_count_zero():
    assert Chain(FedAvg(rounds=5), CrossSiteEval()).rounds == 5
    assert Chain(FederatedScaling(), FedAvg(rounds=3), Cyclic(rounds=2), FedStats()).rounds == 5
    assert Chain(Chain(FedAvg(rounds=1), FedAvg(rounds=2)), FedAvg(rounds=4)).rounds == 7


def run_rounds(workflow, tiny_model):
    seen = []
    run = fk.Simulator(workflow, model=tiny_model, clients=recording_clients(seen), seed=3).run(progress=False)
    return run, seen


def test_two_fedavg_parts_are_exactly_one_longer_fedavg(tiny_model):
    half = FedAvg(rounds=2, clients_per_round=2)
    chained, seen_chained = run_rounds(Chain(half, half), tiny_model)
    single, seen_single = run_rounds(FedAvg(rounds=4, clients_per_round=2), tiny_model)
    assert [r.round for r in chained.history] == [0, 1, 2, 3]
    assert seen_chained == seen_single  # same task rounds, same sampled clients, same client seeds
    assert len({tuple(c for r, c, _ in seen_chained if r == rnd) for rnd in range(4)}) > 1
    assert chained.weights["weight"].item() == pytest.approx(1.0 + 4 * 0.5)


def test_nested_chains_shift_by_every_part_before(tiny_model):
    # the inner chain starts at round 1, so its FedAvg starts at 1 + 1
    run, seen = run_rounds(Chain(FedAvg(rounds=1), Chain(Cyclic(rounds=1), FedAvg(rounds=2))), tiny_model)
    assert [r.round for r in run.history] == [0, 1, 2, 3]
    assert [r for r, _, _ in seen] == [0] * 3 + [1] * 3 + [2] * 3 + [3] * 3
    assert run.weights["weight"].item() == pytest.approx(1.0 + 0.5 + 3 * 0.5 + 2 * 0.5)


def test_parts_share_the_global_model_clients_and_history(digits):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    data = [ClientData(*p.split(0.2, seed=i)) for i, p in enumerate(parts)]
    workflow = Chain(FedAvg(rounds=1), Cyclic(rounds=1), CrossSiteEval())
    run = fk.Simulator(workflow, model=lambda: fk.models.for_data(digits), clients=data,
                       test=digits.test).run(progress=False)
    assert [r.round for r in run.history] == [0, 1]
    assert run.history.series("accuracy")[1] > 0.9  # one cycle from FedAvg's model, not from scratch
    cross = run.history.results["cross_site"]
    # the local models the earlier parts left on the clients
    assert cross["trained"] == {"site-1": True, "site-2": True, "site-3": True}
    assert cross["accuracy"]["global"]["site-2"] == pytest.approx(fk.evaluate(run.model(), data[1].val)["accuracy"])


def test_a_resumed_chain_skips_the_rounds_already_done(tiny_model):
    seen = []
    clients = {c.name: c for c in recording_clients(seen)}
    server = Server({"weight": torch.ones(1, 1)})
    fl = ServerContext(server, tuple(clients), Channel(), fk.Signal(), fk.History(), seed=0, start_round=3)
    serve(Chain(FedAvg(rounds=2), FedAvg(rounds=2)).control_flow, fl, clients)
    assert [r.round for r in fl.history] == [3]
    assert {r for r, _, _ in seen} == {3}
    assert server.weights["weight"].item() == pytest.approx(1.5)


@pytest.mark.parametrize("parts, match", [
    ((), "Chain needs at least one workflow"),
    ((FedAvg(rounds=1), "cross-site"), "Chain part 1 is a str"),
])
def test_bad_chains_are_explained(parts, match):
    with pytest.raises(fk.ConfigError, match=match):
        Chain(*parts)


def test_a_part_without_integer_rounds_is_refused():
    class Loose(fk.Controller):
        rounds = 1.5

        def control_flow(self, fl):
            pass

    with pytest.raises(fk.ConfigError, match=r"Chain part 0 \(Loose\) has rounds = 1.5"):
        Chain(Loose())


class Stamp(fk.Controller):
    """A part that posts a task, samples, records an event and a round: everything the chain must shift."""

    rounds = 1

    def control_flow(self, fl):
        reply = fl.send_and_wait(fk.Task("train", fl.model.task_data({}), round=0), fl.client_names[0])
        fl.event(0, "stamped", sampled=fl.sample_clients(1, 0))
        fl.end_round(0, {reply.client: reply}, 0.0)


def test_every_round_leaving_a_part_is_shifted_also_in_nested_chains(tiny_model):
    seen = []
    clients = recording_clients(seen)
    run = fk.Simulator(Chain(FedAvg(rounds=2), Chain(Stamp(), Stamp())), model=tiny_model, clients=clients,
                       seed=5).run(progress=False)
    assert [r.round for r in run.history] == [0, 1, 2, 3]
    assert [e["round"] for e in run.history.events if e["what"] == "stamped"] == [2, 3]
    assert sorted({r for r, _, _ in seen}) == [0, 1, 2, 3]  # the tasks the clients received
    alone = fk.Simulator(Stamp(), model=tiny_model, clients=recording_clients([]), seed=5).run(progress=False)
    shifted = [e["sampled"] for e in run.history.events if e["what"] == "stamped"]
    draws = [ServerContext(None, tuple(c.name for c in clients), Channel(), fk.Signal(), fk.History(), seed=5)
             .sample_clients(1, r) for r in (2, 3)]
    assert shifted == draws and alone.history.events[0]["round"] == 0


def test_a_chain_checks_every_part_against_the_federation_before_the_first_round(tiny_model):
    seen = []
    sim = fk.Simulator(Chain(FedStats(), FedAvg(rounds=1, clients_per_round=5)), model=tiny_model,
                       clients=recording_clients(seen, n=3))
    with pytest.raises(fk.ConfigError, match="clients_per_round"):
        sim.run(progress=False)
    assert seen == []  # refused before any task went out
