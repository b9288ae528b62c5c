"""Differential privacy: Opacus' accountant, DP-SGD on clients, DP-FedAvg on the server, budgets, filters, CLI."""

import math

import numpy as np
import pytest
import torch

pytest.importorskip("opacus")  # the privacy extra: pip install "fedkit[privacy]"

from opacus.accountants import PRVAccountant, RDPAccountant  # noqa: E402
from opacus.accountants.utils import get_noise_multiplier  # noqa: E402
from opacus.validators import ModuleValidator  # noqa: E402

import fedkit as fk  # noqa: E402
from interrupts import interrupted, stop_after  # noqa: E402
from fedkit import checkpoint  # noqa: E402
from fedkit.data import ClientData  # noqa: E402
from fedkit.exchange import FilterContext  # noqa: E402
from fedkit.cli import experiment_from_args, parser  # noqa: E402
from fedkit.experiment import Experiment  # noqa: E402
from fedkit.privacy.dp import (DPSGD, AdaptiveClip, BudgetExhausted, ClipUpdate, DPFedAvg, UserDP,  # noqa: E402
                               account, adapt_clip, add_noise, clip_update, epsilon, noise_multiplier_for, noisy_mean,
                               split_noise)
from fedkit.weights import norm as update_norm  # noqa: E402

OPACUS = {"rdp": RDPAccountant, "prv": PRVAccountant}


pytestmark = pytest.mark.usefixtures("one_thread")


def diff_of(value, samples=1):
    """An executor that always answers a WEIGHT_DIFF filled with ``value``."""
    def execute(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, value) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: samples, fk.MetaKey.NUM_STEPS: 1})
    return execute


def clients_of(*executors, result_filters=()):
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    return [fk.Client(f"c{i}", ClientData(d, d), {"train": ex}, result_filters=list(result_filters))
            for i, ex in enumerate(executors)]


def dp_sgd_sim(digits, rounds=3, clients=4, dp=DPSGD(noise_multiplier=1.0), out=None, on_round=(), extensions=(),
               **fedavg):
    parts = fk.data.iid(digits.train, clients=clients, seed=0)
    return fk.Simulator(fk.FedAvg(rounds=rounds, extensions=(dp, *extensions), **fedavg),
                        model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test,
                        train=fk.TrainConfig(lr=0.1, validate=False), seed=0, out=out, on_round=list(on_round))


# ------------------------------------------------------------------------------------------- accounting

@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_epsilon_equals_opacus_accountant_stepped_directly(mechanism):
    acc = OPACUS[mechanism]()
    for _ in range(30):
        acc.step(noise_multiplier=1.1, sample_rate=0.05)
    for _ in range(20):
        acc.step(noise_multiplier=0.8, sample_rate=0.1)
    history = account(account([], 1.1, 0.05, 30), 0.8, 0.1, 20)
    assert [tuple(h) for h in history] == acc.history
    assert epsilon(history, 1e-5, mechanism) == acc.get_epsilon(delta=1e-5)


def test_epsilon_edges_and_unknown_accountant():
    assert epsilon([], 1e-5) == 0.0
    assert epsilon(account([], 0.0, 0.1, 3), 1e-5) == math.inf  # no noise, no privacy
    assert epsilon(account([], 0.0, 0.1, 3), 1e-5, "prv") == math.inf
    with pytest.raises(fk.ConfigError, match="unknown accountant 'gdp'; use one of: rdp, prv"):
        epsilon([[1.0, 0.1, 1]], 1e-5, "gdp")


def test_negative_epsilon_item4_an_epsilon_is_never_negative():
    # the RDP conversion falls below 0 for a large delta (it gave -1.75 here); (eps, delta)-DP with eps < 0 is (0, delta)-DP
    assert epsilon([[1.0, 1.0, 1]], 0.9) == 0.0
    assert epsilon([[1.0, 0.05, 100]], 0.4) == 0.0  # below 1/2: a delta two clients allow, still 0, not -0.3
    for mechanism in ("rdp", "prv"):
        for delta in (1e-9, 1e-5, 0.01, 0.3, 0.9):
            for z, q, steps in ((0.5, 0.01, 1), (1.0, 0.05, 100), (5.0, 0.9, 3), (20.0, 0.5, 1)):
                assert epsilon([[z, q, steps]], delta, mechanism) >= 0.0, (mechanism, delta, z, q, steps)


def _dp_sim(tiny_model, workflow, sizes):
    data = [fk.Dataset(torch.zeros(n, 1), torch.zeros(n, dtype=torch.long), 2) for n in sizes]
    return fk.Simulator(workflow, model=tiny_model, clients=[ClientData(d, d) for d in data],
                        train=fk.TrainConfig(batch_size=2, validate=False))


@pytest.mark.parametrize("workflow, sizes, match", [
    (lambda d: DPFedAvg(rounds=2, noise_multiplier=1.0, sample_rate=0.5, delta=d), [4] * 4,
     r"UserDP.delta is 0.9, but it must be below 1 / the number of clients \(4\) \(1/4 = 0.25\).*promise nothing.*e.g. 1e-05"),
    (lambda d: fk.FedAvg(rounds=2, extensions=(DPSGD(noise_multiplier=1.0, delta=d),)), [40, 2, 40],
     r"DPSGD.delta is 0.9, but it must be below 1 / the training examples of the smallest client \('site-2': 2\)"),
    (lambda d: fk.workflows.Chain(fk.FedAvg(rounds=1), DPFedAvg(rounds=1, noise_multiplier=1.0, delta=d)), [4] * 3,
     r"UserDP.delta is 0.9.*1 / the number of clients \(3\)"),
], ids=["dp-fedavg", "dp-sgd", "in-a-chain"])
def test_negative_epsilon_item4_a_delta_not_below_one_over_the_population_is_refused(tiny_model, workflow, sizes, match):
    with pytest.raises(fk.ConfigError, match=match):  # when the simulator is built: nothing has run
        _dp_sim(tiny_model, workflow(0.9), sizes)
    n = len(sizes) if "DPSGD" not in match else min(sizes)
    with pytest.raises(fk.ConfigError, match="must be below 1 /"):
        _dp_sim(tiny_model, workflow(1 / n), sizes)  # 1/n itself is refused too
    run = _dp_sim(tiny_model, workflow(0.99 / n), sizes).run(progress=False)  # just below: runs
    assert run.status == "done"
    spent = [e for e in [*run.history.series("epsilon"), *run.history.series("client_epsilon")] if not math.isnan(e)]
    assert spent and min(spent) >= 0.0


def test_noise_for_a_target_is_opacus_and_reaches_it():
    z = noise_multiplier_for(3.0, 1e-5, 0.1, 200)
    assert z == get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.1, steps=200)
    assert 2.95 <= epsilon([[z, 0.1, 200]], 1e-5) <= 3.0
    with pytest.raises(fk.ConfigError, match="no noise multiplier reaches epsilon"):
        noise_multiplier_for(1e-9, 1e-9, 1.0, 10**6)


# --------------------------------------------------------------------------------------- clip and noise

def test_clipping_bounds_every_norm_and_keeps_direction():
    gen = torch.Generator().manual_seed(0)
    for scale in torch.logspace(-3, 3, 40).tolist():
        u = {"a": torch.randn(7, 5, generator=gen) * scale, "b": torch.randn(3, generator=gen) * scale,
             "steps": torch.tensor(4)}
        c = clip_update(u, 0.5)
        assert update_norm(c) <= 0.5 * (1 + 1e-6)
        if update_norm(u) <= 0.5:
            assert all(torch.equal(c[k], u[k]) for k in u)
        else:
            assert update_norm(c) == pytest.approx(0.5, rel=1e-6)
            assert torch.allclose(c["a"] / update_norm(c), u["a"] / update_norm(u), atol=1e-6)
        assert torch.equal(c["steps"], u["steps"])  # integer buffers are not clipped
    big = {"w": torch.tensor([3.0, 4.0])}
    assert clip_update(big, math.inf) == big


def test_noise_has_the_promised_standard_deviation():
    """10^5 draws: the sample std estimates std with a relative error of about 1/sqrt(2 * 10^5) = 0.22%;
    the tolerance, 2%, is nine of those, so a correct implementation passes for any seed."""
    zeros = {"a": torch.zeros(600, 100), "b": torch.zeros(40_000)}
    noisy = add_noise(zeros, 0.7, torch.Generator().manual_seed(0))
    x = torch.cat([noisy["a"].reshape(-1), noisy["b"]]).double()
    assert x.std().item() == pytest.approx(0.7, rel=0.02)
    assert abs(x.mean().item()) < 0.01
    again = add_noise(zeros, 0.7, torch.Generator().manual_seed(0))
    assert torch.equal(again["a"], noisy["a"])
    assert add_noise(zeros, 0.0, torch.Generator())["a"].abs().sum() == 0


def test_server_estimator_clips_sums_and_divides_by_the_expected_count():
    ups = [{"w": torch.tensor([3.0, 4.0])}, {"w": torch.tensor([0.3, 0.4])}]
    out = noisy_mean(ups, {"w": torch.zeros(2)}, clip=1.0, noise_multiplier=0.0, expected_clients=2.0,
                     generator=torch.Generator())
    assert torch.allclose(out["w"], torch.tensor([(0.6 + 0.3) / 2, (0.8 + 0.4) / 2]))
    # the noise on the sum is z*S; after dividing by q*N it is z*S/(q*N): 1.5 * 2 / 5 = 0.6 (2%, as above)
    big = noisy_mean([], {"w": torch.zeros(100_000)}, clip=2.0, noise_multiplier=1.5, expected_clients=5.0,
                     generator=torch.Generator().manual_seed(1))
    assert big["w"].double().std().item() == pytest.approx(0.6, rel=0.02)


def test_noise_in_a_dp_fedavg_round_has_std_z_S_over_qN():
    def model():
        return torch.nn.Linear(1000, 100, bias=False)  # 10^5 weights
    sim = fk.Simulator(DPFedAvg(rounds=1, clip=2.0, noise_multiplier=1.0, sample_rate=1.0), model=model,
                       clients=clients_of(*[diff_of(0.0)] * 4), seed=3)
    run = sim.run(progress=False)
    moved = (run.weights["weight"] - sim.initial_weights()["weight"]).double()
    assert moved.std().item() == pytest.approx(1.0 * 2.0 / 4, rel=0.02)  # 10^5 draws, tolerance 2%
    assert abs(moved.mean().item()) < 0.01


def test_zero_noise_and_infinite_clip_reduce_dp_fedavg_to_fedavg(digits):
    parts = fk.data.iid(digits.train, clients=4, seed=0)

    def run(workflow):
        return fk.Simulator(workflow, model=lambda: fk.models.for_data(digits), clients=parts, seed=0).run(progress=False)

    private = run(DPFedAvg(rounds=2, clip=math.inf, noise_multiplier=0.0, sample_rate=1.0))
    plain = run(fk.FedAvg(rounds=2, weigh=fk.aggregate.uniform))
    assert private.model_sha256 == plain.model_sha256
    assert private.history.series("epsilon") == [math.inf, math.inf]


# --------------------------------------------------------------------------------------------- DP-SGD

@pytest.fixture(scope="module")
def dp_sgd_run(digits):
    return dp_sgd_sim(digits, rounds=5, clients=8).run(progress=False)


def test_dp_sgd_learns_digits_and_epsilon_grows(dp_sgd_run):
    acc = dp_sgd_run.history.series("accuracy")
    assert dp_sgd_run.status == "done"
    assert 0.70 <= acc[-1] <= 0.95, acc  # non-private FedAvg reaches about 0.95 in these rounds
    eps = dp_sgd_run.history.series("client_epsilon")
    assert all(b > a for a, b in zip(eps, eps[1:])), eps
    summary = dp_sgd_run.summary()
    assert summary["client_epsilon"] == eps[-1] and summary["delta"] == 1e-5 and summary["epsilon"] is None


def test_dp_sgd_epsilon_equals_opacus_accountant(dp_sgd_run):
    rows = dp_sgd_run.history.client_dataframe()
    for client, r in rows.groupby("client"):
        n = int(r["samples"].iloc[0])
        acc = RDPAccountant()
        for _ in range(int(r["steps"].sum())):  # one accountant step per optimizer step
            acc.step(noise_multiplier=1.0, sample_rate=16 / n)
        assert r["epsilon"].iloc[-1] == acc.get_epsilon(delta=1e-5), client
        assert list(r["steps"]) == [round(n / 16)] * 5  # an epoch is n / batch_size Poisson steps
    assert dp_sgd_run.history.series("client_epsilon")[-1] == rows[rows["round"] == 5]["epsilon"].max()


def test_dp_sgd_epsilon_is_cumulative_per_client(digits):
    run = dp_sgd_sim(digits, rounds=4, clients=4, clients_per_round=2).run(progress=False)
    per_client = {}
    for record in run.history:
        for client, row in record.clients.items():
            per_client.setdefault(client, []).append((row["epsilon"], row["steps"], row["samples"]))
    assert len(per_client) > 2
    for client, seen in per_client.items():
        n = seen[0][2]
        for k, (eps, _, _) in enumerate(seen, start=1):  # after its k-th round, whatever round that was
            assert eps == epsilon(account([], 1.0, 16 / n, k * seen[0][1]), 1e-5), client
        assert [e for e, *_ in seen] == sorted({e for e, *_ in seen})


def test_dp_sgd_repeats_exactly_and_differs_from_plain_training(digits):
    a = dp_sgd_sim(digits, rounds=1).run(progress=False)
    b = dp_sgd_sim(digits, rounds=1).run(progress=False)
    c = dp_sgd_sim(digits, rounds=1, dp=DPSGD(noise_multiplier=2.0)).run(progress=False)
    assert a.model_sha256 == b.model_sha256 != c.model_sha256


def test_target_epsilon_sets_the_dp_sgd_noise(digits):
    run = dp_sgd_sim(digits, rounds=3, dp=DPSGD(target_epsilon=2.0, rounds=3)).run(progress=False)
    rows = run.history.client_dataframe()
    for _, r in rows.groupby("client"):
        n, steps = int(r["samples"].iloc[0]), int(r["steps"].iloc[0])
        assert r["noise_multiplier"].iloc[0] == noise_multiplier_for(2.0, 1e-5, 16 / n, 3 * steps)
    assert 1.9 <= run.history.series("client_epsilon")[-1] <= 2.0
    planned = dp_sgd_sim(digits, rounds=3, dp=DPSGD(target_epsilon=2.0))  # the planned rounds: the workflow's
    assert planned.workflow.extensions[0].rounds == 3
    assert planned.run(progress=False).history.series("client_epsilon") == run.history.series("client_epsilon")


def test_a_model_opacus_cannot_train_gets_a_clear_error(digits):
    def with_batchnorm():
        return torch.nn.Sequential(torch.nn.Conv2d(1, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                                   torch.nn.Flatten(), torch.nn.Linear(144, 10))
    parts = fk.data.iid(digits.train, clients=2, seed=0)
    with pytest.raises(fk.ConfigError, match=r"DP-SGD cannot train Sequential.*BatchNorm.*ModuleValidator\.fix"):
        fk.Simulator(fk.FedAvg(rounds=1, extensions=(DPSGD(noise_multiplier=1.0),)), model=with_batchnorm, clients=parts)
    fixed = fk.Simulator(fk.FedAvg(rounds=1, extensions=(DPSGD(noise_multiplier=1.0),)),
                         model=lambda: ModuleValidator.fix(with_batchnorm()), clients=parts,
                         train=fk.TrainConfig(validate=False)).run(progress=False)
    assert fixed.status == "done" and fixed.history.series("client_epsilon")[0] > 0


def test_dp_sgd_budget_stops_the_run_and_the_client_refuses(digits, tmp_path):
    free = dp_sgd_sim(digits, rounds=3).run(progress=False).history.series("client_epsilon")
    target = (free[1] + free[2]) / 2  # room for two rounds, not three
    budget = DPSGD(noise_multiplier=1.0, target_epsilon=target)  # one object: the client's refusal and the server's stop
    stopped = dp_sgd_sim(digits, rounds=3, dp=budget, out=tmp_path).run(progress=False)
    assert stopped.status == "done" and len(stopped.history) == 2
    assert stopped.history.events[-1]["what"] == "stopped" and "privacy budget: round 2" in stopped.summary()["stopped"]
    assert stopped.summary()["client_epsilon"] == free[1] <= target
    # the client half refuses on its own too: a third round from the spent state
    state = checkpoint.load(tmp_path).client_states["site-1"]
    trainer = fk.Trainer(lambda: fk.models.for_data(digits), fk.TrainConfig(lr=0.1, validate=False))
    part = fk.data.iid(digits.train, clients=4, seed=0)[0]
    task = fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, stopped.weights, {fk.MetaKey.HOOKS: (budget,)}), round=2)
    with pytest.raises(BudgetExhausted, match="client 'site-1' has spent epsilon .* past its target"):
        trainer.execute(task, fk.ClientContext("site-1", ClientData(part, part.subset([])), dict(state),
                                               torch.device("cpu"), 0), fk.Signal())


def test_dp_sgd_resume_ends_with_the_same_weights_and_epsilon(digits, tmp_path):
    whole = dp_sgd_sim(digits, out=tmp_path / "whole").run(progress=False)
    cut = interrupted(dp_sgd_sim(digits, out=tmp_path / "cut", on_round=[stop_after(0)]))
    assert cut.status == "aborted"
    states = checkpoint.load(tmp_path / "cut").client_states
    assert all(s["dp_sgd"]["history"][0][2] > 0 for s in states.values())  # the accountant, as plain data
    resumed = dp_sgd_sim(digits, out=tmp_path / "cut").resume(progress=False)
    assert resumed.model_sha256 == whole.model_sha256
    assert resumed.history.series("client_epsilon") == whole.history.series("client_epsilon")


def test_dp_sgd_runs_with_fedprox_and_the_proximal_term_acts(digits):
    plain = dp_sgd_sim(digits, rounds=1).run(progress=False)
    prox = dp_sgd_sim(digits, rounds=1, extensions=(fk.workflows.Proximal(mu=5.0),)).run(progress=False)
    start = dp_sgd_sim(digits, rounds=1).initial_weights()
    moved = lambda run: update_norm({k: run.weights[k] - start[k] for k in start})  # noqa: E731
    assert moved(prox) < 0.5 * moved(plain)  # a strong pull to the global model, applied after the noise


@pytest.mark.parametrize("bad, match", [
    (dict(), "DPSGD needs noise_multiplier"),
    (dict(noise_multiplier=-1.0), "noise_multiplier must be a finite number >= 0"),
    (dict(noise_multiplier=1.0, max_grad_norm=0.0), "max_grad_norm must be a finite number > 0"),
    (dict(noise_multiplier=1.0, delta=1.0), r"delta must be in \(0, 1\)"),
    (dict(noise_multiplier=1.0, accountant="moments"), "unknown accountant 'moments'"),
    (dict(noise_multiplier=1.0, rounds=0), "rounds must be an integer >= 1"),
])
def test_bad_dp_sgd_settings_are_explained(bad, match):
    with pytest.raises(fk.ConfigError, match=match):
        DPSGD(**bad)
    with pytest.raises(fk.ConfigError, match="TrainConfig takes no dp: DP-SGD is one object .* put it in the workflow"):
        fk.TrainConfig(dp=DPSGD(noise_multiplier=1.0))


# ------------------------------------------------------------------------------------------ DP-FedAvg

def test_dp_fedavg_learns_digits(digits):
    parts = fk.data.iid(digits.train, clients=100, seed=0)
    run = fk.Simulator(DPFedAvg(rounds=20, clip=1.0, noise_multiplier=0.7, sample_rate=0.3, delta=1e-3),
                       model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test, val_fraction=0.0,
                       train=fk.TrainConfig(epochs=2, validate=False), seed=0).run(progress=False)
    acc, eps = run.history.series("accuracy"), run.history.series("epsilon")
    assert 0.6 <= acc[-1] <= 0.95 and acc[-1] > acc[0] + 0.3, acc
    assert all(b > a for a, b in zip(eps, eps[1:])) and eps[-1] == run.summary()["epsilon"]
    sampled = [len(r.clients) for r in run.history]
    assert 20 <= sum(sampled) / len(sampled) <= 40 and len(set(sampled)) > 1  # Poisson: about q*N, varying


@pytest.mark.parametrize("mechanism", ["rdp", "prv"])
def test_dp_fedavg_epsilon_equals_opacus_each_round(tiny_model, mechanism):
    wf = DPFedAvg(rounds=4, clip=1.0, noise_multiplier=1.2, sample_rate=0.5, accountant=mechanism)
    run = fk.Simulator(wf, model=tiny_model, clients=clients_of(*[diff_of(0.1)] * 4)).run(progress=False)
    acc = OPACUS[mechanism]()
    for record in run.history:
        acc.step(noise_multiplier=1.2, sample_rate=0.5)  # one step per round, whoever was sampled
        assert record.metrics["epsilon"] == acc.get_epsilon(delta=1e-5)
        assert record.metrics["delta"] == 1e-5 and record.metrics["clip"] == 1.0


def test_failed_clients_are_simply_absent_from_the_sum(tiny_model):
    def crash(task, ctx, abort):
        raise RuntimeError("offline")
    wf = DPFedAvg(rounds=1, clip=math.inf, noise_multiplier=0.0, sample_rate=1.0)
    run = fk.Simulator(wf, model=tiny_model, clients=clients_of(diff_of(1.0), diff_of(2.0), diff_of(3.0), crash)).run(
        progress=False)
    assert run.status == "done"
    assert run.weights["weight"].item() == pytest.approx(1.0 + (1.0 + 2.0 + 3.0) / 4)  # fixed denominator q*N
    assert run.history.rounds[0].clients["c3"]["status"] == "failed"


def test_target_epsilon_sets_the_dp_fedavg_noise(tiny_model):
    wf = DPFedAvg(rounds=5, clip=1.0, noise_multiplier=None, target_epsilon=3.0, sample_rate=1.0)
    run = fk.Simulator(wf, model=tiny_model, clients=clients_of(*[diff_of(0.1)] * 4)).run(progress=False)
    assert len(run.history) == 5
    assert run.history.rounds[0].metrics["noise_multiplier"] == noise_multiplier_for(3.0, 1e-5, 1.0, 5)
    assert 2.95 <= run.history.series("epsilon")[-1] <= 3.0


def test_budget_stops_before_the_round_that_would_cross_it_and_checkpoints(tiny_model, tmp_path):
    target = (epsilon([[1.0, 0.5, 5]], 1e-5) + epsilon([[1.0, 0.5, 6]], 1e-5)) / 2  # room for 5 rounds

    def sim():
        wf = DPFedAvg(rounds=30, clip=1.0, noise_multiplier=1.0, sample_rate=0.5, target_epsilon=target)
        return fk.Simulator(wf, model=tiny_model, clients=clients_of(*[diff_of(0.1)] * 4), out=tmp_path,
                            checkpoint_every=3)

    run = sim().run(progress=False)
    assert run.status == "done" and len(run.history) == 5
    assert run.history.events[-1] == {"round": 5, "what": "stopped", "reason": run.summary()["stopped"]}
    assert "round 5 would spend epsilon" in run.summary()["stopped"]
    assert run.summary()["epsilon"] <= target < epsilon([[1.0, 0.5, 6]], 1e-5)
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.round == 4 and ckpt.server_state["UserDP"]["history"] == [[1.0, 0.5, 5]]
    again = sim().resume(progress=False)  # nothing left to spend: it stops again at once
    assert again.status == "done" and len(again.history) == 5 and again.model_sha256 == run.model_sha256


@pytest.mark.parametrize("adaptive", [None, AdaptiveClip(count_noise=2.0)], ids=["fixed-clip", "adaptive-clip"])
def test_dp_fedavg_resume_ends_with_the_same_weights_and_epsilon(digits, tmp_path, adaptive):
    parts = fk.data.iid(digits.train, clients=12, seed=0)

    def sim(out, on_round=()):
        wf = DPFedAvg(rounds=3, clip=1.0, noise_multiplier=1.0, sample_rate=0.5, adaptive_clip=adaptive)
        return fk.Simulator(wf, model=lambda: fk.models.for_data(digits), clients=parts, out=out, seed=0,
                            train=fk.TrainConfig(validate=False), on_round=list(on_round))

    whole = sim(tmp_path / "whole").run(progress=False)
    assert interrupted(sim(tmp_path / "cut", [stop_after(0)])).status == "aborted"
    resumed = sim(tmp_path / "cut").resume(progress=False)
    assert resumed.model_sha256 == whole.model_sha256
    assert resumed.history.series("epsilon") == whole.history.series("epsilon")
    assert resumed.history.series("clip") == whole.history.series("clip")
    if adaptive is not None:
        assert len(set(whole.history.series("clip"))) == 3  # it did adapt


def test_adaptive_clipping_follows_the_update_norms(tiny_model):
    assert adapt_clip(1.0, 0.5, 0.5, 0.2) == 1.0
    assert adapt_clip(1.0, 0.0, 0.5, 0.2) == pytest.approx(math.exp(0.1))  # all clipped: grow
    assert split_noise(1.0, 1.0) == pytest.approx((1.0 - 0.25) ** -0.5)
    with pytest.raises(fk.ConfigError, match="count_noise > noise_multiplier / 2"):
        split_noise(1.0, 0.5)

    def clips(value, filters):
        wf = DPFedAvg(rounds=6, clip=1.0, noise_multiplier=0.5, sample_rate=1.0, adaptive_clip=AdaptiveClip(count_noise=0.5))
        run = fk.Simulator(wf, model=tiny_model, clients=clients_of(*[diff_of(value)] * 8, result_filters=filters))
        return run.run(progress=False).history.series("clip")

    grow, shrink = clips(10.0, [ClipUpdate()]), clips(0.01, [])  # bits from the clients' filter / from the server
    assert all(b > a for a, b in zip(grow, grow[1:])) and grow[0] == 1.0
    assert all(b < a for a, b in zip(shrink, shrink[1:]))


def test_poisson_sampling_is_seeded_and_may_draw_nobody(tiny_model):
    def picks(seed, q, n=20, rounds=30, min_clients=None):
        sim = fk.Simulator(fk.FedAvg(rounds=rounds, sample_rate=q, min_clients=min_clients), model=tiny_model,
                           clients=clients_of(*[diff_of(0.0)] * n), seed=seed)
        return [sorted(r.clients) for r in sim.run(progress=False).history]

    a = picks(0, 0.5)
    assert a == picks(0, 0.5) != picks(1, 0.5)
    assert 0.4 <= sum(map(len, a)) / (20 * 30) <= 0.6
    sparse = picks(0, 0.05, n=4, min_clients=0)
    assert [] in sparse and len(sparse) == 30  # rounds that drew nobody still happen (and change nothing)
    with pytest.raises(fk.ConfigError, match="clients_per_round .* or FedAvg.sample_rate .*, not both"):
        fk.FedAvg(clients_per_round=3, sample_rate=0.5)
    with pytest.raises(fk.ConfigError, match=r"sample_rate .* must be in \(0, 1\]"):
        fk.FedAvg(sample_rate=0.0)


@pytest.mark.parametrize("make, match", [
    (lambda: DPFedAvg(aggregate=fk.aggregate.coordinate_median), "DPFedAvg sets aggregate itself"),
    (lambda: DPFedAvg(clients_per_round=3), "DPFedAvg sets clients_per_round itself"),
    (lambda: UserDP(clip=math.inf, noise_multiplier=1.0), "infinite clip norm"),
    (lambda: UserDP(noise_multiplier=None), "needs noise_multiplier"),
    (lambda: UserDP(sample_rate=0.5), "UserDP takes no sample_rate .* the accountant uses the workflow's"),
    (lambda: UserDP(adaptive_clip=0.5), "adaptive_clip must be an AdaptiveClip"),
    (lambda: AdaptiveClip(target_quantile=2.0), "target_quantile must be a number >= 0 and <= 1"),
    (lambda: DPSGD(noise_multiplier=1.0, target_epsilon=0.0), "target_epsilon must be a number > 0"),
    (lambda: fk.FedAvg(clients_per_round=2, extensions=(UserDP(),)), "assumes Poisson sampling.*clients_per_round=2"),
    (lambda: fk.FedAvg(sample_rate=0.5, extensions=(UserDP(),)), "weigh=fk.aggregate.uniform"),
    (lambda: fk.FedAvg(sample_rate=0.5, weigh=fk.aggregate.uniform, aggregate=fk.aggregate.coordinate_median,
                       extensions=(UserDP(),)), "an aggregate or weigh of your own would be ignored"),
])
def test_bad_dp_fedavg_settings_are_explained(make, match):
    with pytest.raises(fk.ConfigError, match=match):
        make()


# --------------------------------------------------------------------------------- filters and order

def _ctx(meta=None, seed=0, attempt=0):
    task = fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, {}, meta or {}), round=0, attempt=attempt)
    return FilterContext("client", "result", "site-1", task, seed)


def test_clip_filter_clips_follows_the_server_and_adds_seeded_local_noise():
    dxo = fk.DXO(fk.DataKind.WEIGHT_DIFF, {"w": torch.tensor([3.0, 4.0])}, {"num_samples": 2})
    out = ClipUpdate(1.0)(dxo, _ctx())
    assert torch.allclose(out.data["w"], torch.tensor([0.6, 0.8])) and out.meta["dp_clipped"] is True
    assert out.meta["num_samples"] == 2 and torch.equal(dxo.data["w"], torch.tensor([3.0, 4.0]))  # a new DXO
    assert ClipUpdate()(dxo, _ctx({"dp_clip": 10.0})).meta["dp_clipped"] is False
    with pytest.raises(fk.ConfigError, match="the task carries none"):
        ClipUpdate()(dxo, _ctx())
    metrics = fk.DXO(fk.DataKind.METRICS, {"accuracy": 0.9})
    assert ClipUpdate(1.0)(metrics, _ctx()) is metrics
    zeros = fk.DXO(fk.DataKind.WEIGHT_DIFF, {"w": torch.zeros(100_000)})
    local = ClipUpdate(2.0, noise_multiplier=0.5)
    a, b, c = (local(zeros, _ctx(seed=s)).data["w"] for s in (7, 7, 8))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.double().std().item() == pytest.approx(0.5 * 2.0, rel=0.02)  # 10^5 draws, tolerance 2%
    assert not torch.equal(local(zeros, _ctx(seed=7, attempt=1)).data["w"], a)  # a retry draws fresh noise


class StandInEncryption:
    """Stands in for HE: the update leaves the client as opaque bytes, and the server decrypts it."""

    def encrypt(self, dxo, ctx):
        if dxo.kind != fk.DataKind.WEIGHT_DIFF:
            return dxo
        return dxo.with_data({k: bytes(v.numpy().tobytes()) for k, v in dxo.data.items()}, encrypted=True,
                             dtypes={k: (tuple(v.shape), str(v.dtype)) for k, v in dxo.data.items()})

    def decrypt(self, dxo, ctx):
        if not dxo.meta.get("encrypted"):
            return dxo
        data = {k: torch.frombuffer(bytearray(b), dtype=torch.float32).reshape(dxo.meta["dtypes"][k][0])
                for k, b in dxo.data.items()}
        return dxo.with_data(data, encrypted=False)


def test_dp_runs_before_encryption_and_refuses_an_encrypted_update(tiny_model):
    he, seen = StandInEncryption(), []

    def spy(dxo, ctx):
        seen.append((update_norm(dxo.data), dxo.meta.get("dp_clipped")))
        return dxo

    def sim(order):
        clients = clients_of(diff_of(3.0), diff_of(-0.1), result_filters=order)
        return fk.Simulator(DPFedAvg(rounds=2, clip=0.5, noise_multiplier=0.0, sample_rate=1.0), model=tiny_model,
                            clients=clients, server_result_filters=[he.decrypt, spy])

    run = sim([ClipUpdate(), he.encrypt]).run(progress=False)
    assert run.status == "done"
    assert sorted(seen) == [(pytest.approx(0.1), False)] * 2 + [(pytest.approx(0.5), True)] * 2
    assert run.weights["weight"].item() == pytest.approx(1.0 + 2 * (0.5 - 0.1) / 2)
    wrong = sim([he.encrypt, ClipUpdate()]).run(progress=False)  # DP-FedAvg goes on without failed clients
    errors = {row["error"] for r in wrong.history for row in r.clients.values()}
    assert len(errors) == 1 and "ClipUpdate got bytes for 'weight'" in errors.pop()
    assert "attach ClipUpdate before the encryption filter" in wrong.history.rounds[0].clients["c0"]["error"]
    assert wrong.weights["weight"].item() == 1.0


def test_dp_sgd_happens_in_the_trainer_before_any_result_filter(digits):
    he, arrived = StandInEncryption(), []

    def check(dxo, ctx):  # attached after the encryption: sees what would travel
        arrived.append((dxo.meta.get("encrypted"), "epsilon" in dxo.meta["metrics"]))
        return dxo

    parts = fk.data.iid(digits.train, clients=2, seed=0)
    sim = fk.Simulator(fk.FedAvg(rounds=1, extensions=(DPSGD(noise_multiplier=1.0),)),
                       model=lambda: fk.models.for_data(digits), clients=parts, train=fk.TrainConfig(validate=False),
                       client_result_filters=[he.encrypt, check], server_result_filters=[he.decrypt])
    run = sim.run(progress=False)
    assert run.status == "done" and arrived == [(True, True)] * 2  # privatized (it has an epsilon), then encrypted


# ------------------------------------------------------------------------------------------ reporting

def test_history_summary_and_privacy_utility_plot(tiny_model, tmp_path):
    private = fk.Simulator(DPFedAvg(rounds=3, noise_multiplier=1.0, sample_rate=0.5), model=tiny_model,
                           clients=clients_of(*[diff_of(0.1)] * 4), out=tmp_path).run(progress=False)
    plain = fk.Simulator(fk.FedAvg(rounds=3), model=tiny_model, clients=clients_of(diff_of(0.1))).run(progress=False)
    assert plain.summary()["epsilon"] is None and plain.summary()["stopped"] is None
    s = private.summary()
    assert s["epsilon"] == private.history.series("epsilon")[-1] and s["delta"] == 1e-5
    assert fk.History.load(tmp_path).series("epsilon") == private.history.series("epsilon")
    fig = fk.plots.privacy_utility({"DP-FedAvg": private, "FedAvg": plain}, metric="clients_ok")
    assert [t.name for t in fig.data] == ["DP-FedAvg"]
    assert list(fig.data[0].x) == private.history.series("epsilon")
    assert len(fig.layout.shapes) == 1  # the non-private run: a reference line


# ------------------------------------------------------------------------------- settings, one home each

def flags_workflow(*argv):
    """The workflow `fedkit run` builds from ``argv`` (the CLI alone maps flags to objects)."""
    return experiment_from_args(parser().parse_args(["run", *argv])).workflow


def test_experiment_builds_dp_sgd_and_dp_fedavg_as_one_extension(tiny_model):
    assert flags_workflow().extensions == () and Experiment().workflow.extensions == ()
    sgd = flags_workflow("--dp-sgd", "--noise-multiplier", "1.2", "--max-grad-norm", "0.5")
    assert sgd.extensions == (DPSGD(noise_multiplier=1.2, max_grad_norm=0.5),)
    budget = flags_workflow("--dp-sgd", "--target-epsilon", "3", "--delta", "1e-6", "--rounds", "10")
    assert budget.extensions == (DPSGD(target_epsilon=3.0, delta=1e-6, rounds=10),)  # rounds: the workflow's
    wf = flags_workflow("--dp-fedavg", "--clip-norm", "0.5", "--noise-multiplier", "0.8", "--sample-rate", "0.5",
                        "--dp-accountant", "prv", "--algorithm", "fedprox", "--rounds", "2")
    assert wf.sample_rate == 0.5 and wf.min_clients == 0
    prox, user = wf.extensions
    assert prox == fk.workflows.Proximal(0.01) and (user.clip, user.noise_multiplier, user.accountant) == (0.5, 0.8, "prv")
    assert (user.sampling, user.rounds) == (0.5, 2)
    exp = Experiment.preset("smoke", workflow=DPFedAvg(rounds=2, clip=0.5, noise_multiplier=0.8, sample_rate=0.5,
                                                       accountant="prv"))
    assert exp.workflow.extensions[0] == user  # the same extension, written in a cell
    run = fk.Simulator(wf, model=tiny_model, clients=clients_of(*[diff_of(3.0)] * 4)).run(progress=False)
    assert run.history.rounds[-1].metrics["epsilon"] > 0


@pytest.mark.parametrize("argv, match", [
    (["--dp-sgd", "--dp-fedavg"], "choose one of --dp-sgd"),
    (["--noise-multiplier", "1"], "--noise-multiplier need --dp-sgd or --dp-fedavg"),
    (["--dp-sgd", "--sample-rate", "0.1"], "--sample-rate and --adaptive-clip are DP-FedAvg options"),
    (["--dp-sgd", "--delta", "2"], r"--delta: must be in \(0, 1\)"),
    (["--dp-fedavg", "--sample-rate", "0"], r"--sample-rate: must be in \(0, 1\]"),
    (["--dp-fedavg", "--clients-per-round", "3"], "drop --clients-per-round"),
    (["--dp-fedavg", "--algorithm", "cyclic"], "cyclic weight transfer runs no extensions"),
])
def test_experiment_explains_bad_dp_combinations(argv, match):
    with pytest.raises(fk.ConfigError, match=match):
        flags_workflow(*argv)


def test_the_accountant_cannot_be_told_another_sample_rate(tiny_model):
    """Regression: FedAvg(sample_rate=1.0) with a DP extension that said 0.01 reported epsilon ~1 where it was ~30."""
    with pytest.raises(fk.ConfigError, match="UserDP takes no sample_rate"):
        fk.FedAvg(sample_rate=1.0, weigh=fk.aggregate.uniform, extensions=(UserDP(sample_rate=0.01),))
    import dataclasses
    changed = dataclasses.replace(DPFedAvg(rounds=20, noise_multiplier=1.0, sample_rate=0.01), sample_rate=1.0)
    assert changed.extensions[0].sampling == 1.0  # re-bound to the workflow that samples
    run = fk.Simulator(changed, model=tiny_model, clients=clients_of(*[diff_of(0.1)] * 4)).run(progress=False)
    acc = RDPAccountant()
    for _ in range(20):
        acc.step(noise_multiplier=1.0, sample_rate=1.0)
    assert run.history.last("epsilon") == acc.get_epsilon(delta=1e-5) > 20


def test_a_workflow_that_chooses_its_own_clients_cannot_run_dp_fedavg():
    class PowerOfChoice(fk.FedAvg):
        def targets(self, fl, round):
            return list(fl.client_names)[:2]

    with pytest.raises(fk.ConfigError, match="PowerOfChoice chooses its clients itself .* epsilon would be wrong"):
        PowerOfChoice(sample_rate=0.5, weigh=fk.aggregate.uniform, extensions=(UserDP(),))


def test_the_dp_fedavg_noise_cannot_be_skipped_by_calling_step_alone():
    """Regression: FedAvg.step(...) without fl skipped on_aggregate, where DP-FedAvg adds its noise. Since issue 20
    round and fl are keyword-only and required: a step without them is refused by Python itself."""
    wf = DPFedAvg(rounds=1, noise_multiplier=1.0, sample_rate=1.0)
    results = {"c0": fk.DXO(fk.DataKind.WEIGHT_DIFF, {"w": torch.ones(3)}, {"num_samples": 1})}
    with pytest.raises(TypeError, match="missing 2 required keyword-only arguments: 'round' and 'fl'"):
        wf.step({"w": torch.zeros(3)}, results, {})
    plain = fk.FedAvg().step({"w": torch.zeros(3)}, results, {}, round=0, fl=None)  # nothing needs the run: fine
    assert plain["w"].tolist() == [1.0, 1.0, 1.0]


def test_a_dp_sgd_client_that_skips_the_private_steps_is_rejected(tiny_model):
    """An executor of your own that ignores DP-SGD's client half must not pass as private."""
    sim = fk.Simulator(fk.FedAvg(rounds=1, extensions=(DPSGD(noise_multiplier=1.0),), max_retries=0), model=tiny_model,
                       clients=clients_of(diff_of(0.1), diff_of(0.1)))
    with pytest.raises(fk.RoundFailed, match="did not run the client half of DPSGD"):
        sim.run(progress=False)


# ------------------------------------------------------------------------------- budgets and retries


def test_a_budget_too_small_for_one_round_stops_the_run_cleanly(digits, tmp_path):
    sim = dp_sgd_sim(digits, rounds=2, clients=2, dp=DPSGD(noise_multiplier=1.0, target_epsilon=0.01), out=tmp_path)
    run = sim.run(progress=False)  # no RoundFailed: a spent budget is a clean stop
    assert run.status == "done" and run.error is None and len(run.history) == 0
    assert [(e["what"], e.get("client")) for e in run.history.events] == [("refused", "site-1"), ("refused", "site-2"),
                                                                          ("stopped", None)]
    assert run.summary()["stopped"].startswith("privacy budget: client 'site-1' has spent epsilon 0 ")
    assert "min_clients" not in run.summary()["stopped"]
    assert run.model_sha256 == fk.weights.sha256(sim.initial_weights())  # the model no round changed


def test_a_client_that_refuses_mid_run_ends_it_with_the_last_completed_round(digits, tmp_path):
    # site-1 is small: one round of DP-SGD on it (q = 1) would spend epsilon 4.7 > 3; the others have room for
    # several. With seed 1, round 0 samples site-2 and site-3, round 1 site-1 and site-3: site-1 refuses round 1.
    parts = [digits.train.subset(np.arange(16)), digits.train.subset(np.arange(16, 416)),
             digits.train.subset(np.arange(416, 816))]
    wf = fk.FedAvg(rounds=3, clients_per_round=2, extensions=(DPSGD(noise_multiplier=1.0, target_epsilon=3.0),))
    run = fk.Simulator(wf, model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test, seed=1,
                       train=fk.TrainConfig(lr=0.1, validate=False), out=tmp_path).run(progress=False)
    assert run.status == "done" and len(run.history) == 1 and sorted(run.history.rounds[0].clients) == ["site-2", "site-3"]
    refused = [e for e in run.history.events if e["what"] == "refused"]
    assert [(e["round"], e["client"]) for e in refused] == [(1, "site-1")]
    assert run.summary()["stopped"].startswith("privacy budget: client 'site-1' has spent epsilon 0 (delta 1e-05); "
                                               "another round would take it to 4.7")
    ckpt = checkpoint.load(tmp_path)
    assert ckpt.round == 0 and fk.weights.sha256(ckpt.weights) == run.model_sha256


def test_a_retry_trains_only_the_clients_that_failed_and_the_accountant_counts_each_training(digits, tmp_path):
    faults = fk.Faults(crash=0.25, corrupt=0.25, corruptions=("nan",), seed=7)
    # round 0: site-1 crashes twice, site-3's first update is corrupt (trained, then rejected); round 1: no fault
    parts = fk.data.iid(digits.train.subset(np.arange(600)), clients=3, seed=0)
    wf = fk.FedAvg(rounds=2, max_retries=2, extensions=(DPSGD(noise_multiplier=1.0),))
    run = fk.Simulator(wf, model=lambda: fk.models.for_data(digits), clients=parts, faults=faults, seed=0,
                       train=fk.TrainConfig(lr=0.1, validate=False), out=tmp_path).run(progress=False)
    assert run.status == "done" and [r.metrics["attempts"] for r in run.history] == [3, 1]
    trained = {c: sum(faults.draw(r.round, c, a) not in ("crash", "dropout")
                      for r in run.history for a in range(r.clients[c]["attempt"] + 1)) for c in ("site-1", "site-2", "site-3")}
    assert trained == {"site-1": 2, "site-2": 2, "site-3": 3}  # site-2 answered at once: never asked again
    states = checkpoint.load(tmp_path).client_states
    for client, times in trained.items():
        (z, q, steps), = states[client]["dp_sgd"]["history"]
        assert steps == times * run.history.rounds[-1].clients[client]["steps"]
        assert run.history.rounds[-1].clients[client]["epsilon"] == epsilon([[z, q, steps]], 1e-5)
