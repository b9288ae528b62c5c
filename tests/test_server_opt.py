"""Server optimizers (FedOpt) against their update equations, torch.optim, and FedAvg; and FedOpt runs."""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

import pytest
import torch

import fedkit as fk
from fedkit import ConfigError, UpdateError
from fedkit.data import ClientData
from fedkit.server import Server
from fedkit.server_opt import SGD, Adagrad, Adam, ServerOptimizer, Yogi, constant, cosine, step_decay
from fedkit.workflows import FedAvg, FedOpt


def run_steps(opt, x, deltas, start=0):
    """Apply ``deltas`` one round after another from a fresh state; the weights after each round."""
    state, seen = opt.init(x), []
    for r, d in enumerate(deltas, start):
        x, state = opt.step(x, d, state, r)
        seen.append(x)
    return seen, state


def w(*values, dtype=torch.float32):
    return {"w": torch.tensor(values, dtype=dtype)}


# ------------------------------------------------------------------------------------------ SGD

def test_sgd_momentum_three_steps_by_hand():
    # Prepare: lr 0.5, momentum 0.5; every number below is exact in binary
    opt = SGD(lr=0.5, momentum=0.5)
    deltas = [w(0.5, 1.0), w(-1.0, 2.0), w(0.25, 0.0)]
    # Execute
    seen, state = run_steps(opt, w(1.0, -2.0), deltas)
    # Assert: buf = 0.5 buf + d -> (0.5, 1), (-0.75, 2.5), (-0.125, 1.25); x += 0.5 buf
    assert [s["w"].tolist() for s in seen] == [[1.25, -1.5], [0.875, -0.25], [0.8125, 0.375]]
    assert state["momentum/w"].tolist() == [-0.125, 1.25]


@pytest.mark.parametrize("nesterov", [False, True])
def test_sgd_momentum_equals_torch_sgd_on_minus_delta(nesterov):
    # Prepare
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(5, generator=g)
    deltas = [torch.randn(5, generator=g) for _ in range(4)]
    p = torch.nn.Parameter(x0.clone())
    ref = torch.optim.SGD([p], lr=0.3, momentum=0.9, nesterov=nesterov)
    # Execute
    seen, _ = run_steps(SGD(lr=0.3, momentum=0.9, nesterov=nesterov), {"w": x0}, [{"w": d} for d in deltas])
    # Assert: FedOpt's pseudo-gradient is -delta
    for d, ours in zip(deltas, seen):
        p.grad = -d
        ref.step()
        torch.testing.assert_close(ours["w"], p.detach())


def test_sgd_lr_one_no_momentum_is_fedavg_exactly():
    g = torch.Generator().manual_seed(1)
    x = {"a": torch.randn(4, 3, generator=g), "h": torch.randn(3, generator=g).half(), "n": torch.tensor(7)}
    d = {"a": torch.randn(4, 3, generator=g), "h": torch.randn(3, generator=g).half(), "n": torch.tensor(2)}
    opt = SGD()
    new, state = opt.step(x, d, opt.init(x), round=0)
    plain = fk.weights.add(x, d)
    assert state == {}
    for k in x:
        assert new[k].dtype == x[k].dtype and torch.equal(new[k], plain[k]), k


# ------------------------------------------------------------------------ Adam, Yogi, Adagrad

def by_hand(kind, x, deltas, lr, beta1, beta2, tau):
    """Algorithm 2 of Reddi et al. 2021, element by element in plain Python floats."""
    m, v, out = [0.0] * len(x), [tau * tau] * len(x), []
    x = list(x)
    for d in deltas:
        for i, di in enumerate(d):
            m[i] = beta1 * m[i] + (1 - beta1) * di
            if kind == "adagrad":
                v[i] = v[i] + di * di
            elif kind == "adam":
                v[i] = beta2 * v[i] + (1 - beta2) * di * di
            else:
                v[i] = v[i] - (1 - beta2) * di * di * math.copysign(1.0, v[i] - di * di) * (v[i] != di * di)
            x[i] = x[i] + lr * m[i] / (math.sqrt(v[i]) + tau)
        out.append(list(x))
    return out, m, v


@pytest.mark.parametrize("kind, make", [
    ("adam", lambda: Adam(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)),
    ("yogi", lambda: Yogi(lr=0.1, beta1=0.9, beta2=0.99, tau=0.1)),
    ("adagrad", lambda: Adagrad(lr=0.1, tau=0.1, beta1=0.9)),
    ("adagrad", lambda: Adagrad(lr=0.1, tau=0.1)),  # beta1 = 0 by default
])
def test_adaptive_three_steps_match_the_equations(kind, make):
    # Prepare: the first coordinate has d^2 > v (v grows), the second d^2 < v (Yogi's v shrinks)
    opt = make()
    deltas = [(1.0, 0.01), (-0.5, 0.02), (2.0, -0.03)]
    # Execute
    seen, state = run_steps(opt, w(1.0, -2.0, dtype=torch.float64), [w(*d, dtype=torch.float64) for d in deltas])
    # Assert
    expected, m, v = by_hand(kind, [1.0, -2.0], deltas, opt.lr, opt.beta1, getattr(opt, "beta2", 0.0), opt.tau)
    for ours, hand in zip(seen, expected):
        assert ours["w"].tolist() == pytest.approx(hand, rel=1e-12, abs=1e-15)
    assert state["m/w"].tolist() == pytest.approx(m, rel=1e-12)
    assert state["v/w"].tolist() == pytest.approx(v, rel=1e-12)


def test_first_steps_worked_out_on_paper():
    x = w(1.0, 2.0)
    # Adagrad, beta1 0: v = 0.75^2 + 1 = 1.25^2, step = 1 * (+-1) / (1.25 + 0.75) = +-0.5
    new, state = Adagrad(lr=1.0, tau=0.75).step(x, w(1.0, -1.0), Adagrad(tau=0.75).init(x), 0)
    assert new["w"].tolist() == [1.5, 1.5] and state["v/w"].tolist() == [1.5625, 1.5625]
    # Adam: m = 0.5 d = +-0.25; v = 0.64 * 0.25 + 0.36 * 0.25 = 0.25; step = 0.25 / (0.5 + 0.5)
    adam = Adam(lr=1.0, beta1=0.5, beta2=0.64, tau=0.5)
    new, state = adam.step(x, w(0.5, -0.5), adam.init(x), 0)
    assert new["w"].tolist() == pytest.approx([1.25, 1.75]) and state["v/w"].tolist() == pytest.approx([0.25, 0.25])
    # Yogi: d^2 = v = 0.25, so sign(v - d^2) = 0 and v stays: the same step as Adam here
    yogi = Yogi(lr=1.0, beta1=0.5, beta2=0.64, tau=0.5)
    new, state = yogi.step(x, w(0.5, -0.5), yogi.init(x), 0)
    assert new["w"].tolist() == pytest.approx([1.25, 1.75]) and state["v/w"].tolist() == [0.25, 0.25]


def test_initial_state_is_zero_momentum_and_tau_squared():
    x = {"a": torch.ones(2, 2), "n": torch.tensor(3)}
    for opt in (Adam(tau=0.1), Yogi(tau=0.1), Adagrad(tau=0.1)):
        state = opt.init(x)
        assert set(state) == {"m/a", "v/a"}  # nothing for the integer buffer
        assert torch.equal(state["m/a"], torch.zeros(2, 2))
        torch.testing.assert_close(state["v/a"], torch.full((2, 2), 0.01))
    assert set(SGD(momentum=0.6).init(x)) == {"momentum/a"}


def test_yogi_moves_v_additively_where_adam_moves_it_multiplicatively():
    # Prepare: the same state (m 0, v 4 after large deltas) and a small delta 0.1
    x, big = w(0.0), {"m/w": torch.tensor([0.0], dtype=torch.float64), "v/w": torch.tensor([4.0], dtype=torch.float64)}
    x64, small = w(0.0, dtype=torch.float64), w(0.1, dtype=torch.float64)
    # Execute
    _, adam = Adam(beta2=0.99).step(x64, small, big, 0)
    _, yogi = Yogi(beta2=0.99).step(x64, small, big, 0)
    _, grad = Adagrad().step(x64, small, big, 0)
    # Assert: Adam forgets 1% of v (4 -> 3.9601); Yogi only subtracts 0.01 * d^2 (4 -> 3.9999); Adagrad adds d^2
    assert adam["v/w"].item() == pytest.approx(0.99 * 4 + 0.01 * 0.01)
    assert yogi["v/w"].item() == pytest.approx(4 - 0.01 * 0.01)
    assert grad["v/w"].item() == pytest.approx(4 + 0.01)
    # and after a sudden large delta (d^2 = 4 > v = 0.01) Yogi's v grows more than Adam's: smaller steps
    low = {"m/w": torch.tensor([0.0], dtype=torch.float64), "v/w": torch.tensor([0.01], dtype=torch.float64)}
    ax, adam = Adam(beta2=0.99).step(x64, w(2.0, dtype=torch.float64), low, 0)
    yx, yogi = Yogi(beta2=0.99).step(x64, w(2.0, dtype=torch.float64), low, 0)
    assert adam["v/w"].item() == pytest.approx(0.0099 + 0.04) and yogi["v/w"].item() == pytest.approx(0.05)
    assert 0 < yx["w"].item() < ax["w"].item()
    assert x["w"].item() == 0.0


def test_adagrad_steps_keep_shrinking_while_adam_and_yogi_settle():
    # Prepare: the same delta, 1, for 300 rounds; the same lr, beta1 and tau for all three
    x, deltas = w(0.0, dtype=torch.float64), [w(1.0, dtype=torch.float64)] * 300
    steps = {}
    for name, opt in {"adam": Adam(lr=0.1), "yogi": Yogi(lr=0.1), "adagrad": Adagrad(lr=0.1, beta1=0.9)}.items():
        seen, _ = run_steps(opt, x, deltas)
        values = [0.0] + [s["w"].item() for s in seen]
        steps[name] = [b - a for a, b in zip(values, values[1:])]
    # Assert: Adagrad's v = tau^2 + t, so its steps shrink like lr / sqrt(t)
    assert steps["adagrad"][-1] == pytest.approx(0.1 / (math.sqrt(300 + 1e-6) + 1e-3), rel=1e-9)
    assert all(b < a for a, b in zip(steps["adagrad"][20:], steps["adagrad"][21:]))
    # Adam, without bias correction, has v = 1 - 0.99^t (1 - tau^2): still 5% short of 1 at t = 300
    m, v = 1 - 0.9 ** 300, 1 - 0.99 ** 300 * (1 - 1e-6)
    assert steps["adam"][-1] == pytest.approx(0.1 * m / (math.sqrt(v) + 1e-3), rel=1e-9)
    # Yogi's v climbs by (1 - beta2) d^2 = 0.01 a round, reaches 1 after 100 rounds and stays within 0.01 of it
    assert steps["yogi"][-1] == pytest.approx(0.1 / (1 + 1e-3), rel=5e-3)
    assert steps["adagrad"][-1] < 0.1 * steps["adam"][-1]


# ------------------------------------------------------------------------------- every optimizer

ALL = {
    "sgd": SGD(lr=1.0),
    "fedavgm": SGD(lr=1.0, momentum=0.6),
    "nesterov": SGD(lr=0.5, momentum=0.9, nesterov=True),
    "adam": Adam(lr=0.01),
    "yogi": Yogi(lr=0.01),
    "adagrad": Adagrad(lr=0.01),
}


def model_like():
    g = torch.Generator().manual_seed(4)
    x = {"fc.weight": torch.randn(3, 2, generator=g), "fc.bias": torch.randn(3, generator=g),
         "bn.num_batches_tracked": torch.tensor(5)}
    deltas = [{"fc.weight": torch.randn(3, 2, generator=g), "fc.bias": torch.randn(3, generator=g),
               "bn.num_batches_tracked": torch.tensor(2)} for _ in range(3)]
    return x, deltas


@pytest.mark.parametrize("name", ALL)
def test_state_round_trips_through_torch_save_with_weights_only(name):
    # Prepare: two rounds, then save the state
    opt, (x, deltas) = ALL[name], model_like()
    seen, state = run_steps(opt, x, deltas[:2])
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    # Execute
    loaded = torch.load(buf, weights_only=True)
    a, a_state = opt.step(seen[-1], deltas[2], state, 2)
    b, b_state = opt.step(seen[-1], deltas[2], loaded, 2)
    # Assert: the third round goes on identically from the loaded state
    assert set(loaded) == set(state) and all(torch.equal(loaded[k], state[k]) for k in state)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert all(torch.equal(a_state[k], b_state[k]) for k in a_state)


@pytest.mark.parametrize("name", ALL)
def test_step_is_pure_and_integer_buffers_are_added(name):
    opt, (x, deltas) = ALL[name], model_like()
    state = opt.init(x)
    before = ({k: v.clone() for k, v in x.items()}, {k: v.clone() for k, v in state.items()})
    new1, state1 = opt.step(x, deltas[0], state, 0)
    new2, state2 = opt.step(x, deltas[0], state, 0)
    # nothing given was changed in place, and the same inputs give the same outputs
    assert all(torch.equal(x[k], before[0][k]) for k in x)
    assert all(torch.equal(state[k], before[1][k]) for k in state)
    assert all(torch.equal(new1[k], new2[k]) for k in new1)
    assert all(torch.equal(state1[k], state2[k]) for k in state1)
    # the integer buffer is plainly added and stays an integer; floats moved
    assert new1["bn.num_batches_tracked"].dtype == torch.int64 and new1["bn.num_batches_tracked"].item() == 7
    assert new1["fc.weight"].dtype == torch.float32 and not torch.equal(new1["fc.weight"], x["fc.weight"])
    assert not any(k.endswith("num_batches_tracked") for k in state1)


@pytest.mark.parametrize("name", ["fedavgm", "adam", "yogi", "adagrad"])
def test_state_made_for_another_optimizer_or_model_is_refused(name):
    opt, (x, deltas) = ALL[name], model_like()
    with pytest.raises(ConfigError, match=rf"{type(opt).__name__} state has no '.*fc.weight'.*init\(weights\)"):
        opt.step(x, deltas[0], {}, 0)


# ------------------------------------------------------------------------------------ schedules

def test_schedules():
    assert [constant()(r) for r in (0, 5, 1000)] == [1.0, 1.0, 1.0]
    assert [step_decay(every=2, gamma=0.5)(r) for r in range(6)] == [1.0, 1.0, 0.5, 0.5, 0.25, 0.25]
    cos = cosine(rounds=4)
    assert [cos(r) for r in range(6)] == pytest.approx([1.0, (1 + math.sqrt(0.5)) / 2, 0.5, (1 - math.sqrt(0.5)) / 2,
                                                        0.0, 0.0])
    floor = cosine(rounds=10, min_factor=0.1)
    assert floor(0) == 1.0 and floor(5) == pytest.approx(0.55) and floor(10) == pytest.approx(0.1) == floor(99)


def test_schedule_scales_the_server_lr_per_round():
    # SGD lr 2 halved every round; delta 1 each round: 0 + 2 + 1 + 0.5
    seen, _ = run_steps(SGD(lr=2.0, lr_schedule=step_decay(every=1, gamma=0.5)), w(0.0), [w(1.0)] * 3)
    assert [s["w"].item() for s in seen] == [2.0, 3.0, 3.5]
    # a factor of 0 freezes the weights but the moments still see the delta
    frozen = Adam(lr_schedule=lambda r: 0.0)
    new, state = frozen.step(w(1.0), w(4.0), frozen.init(w(1.0)), 0)
    assert new["w"].item() == 1.0 and state["m/w"].item() == pytest.approx(0.4)


@pytest.mark.parametrize("factor", [-0.5, float("nan"), float("inf"), "1", None])
def test_a_schedule_returning_nonsense_is_named(factor):
    opt = Yogi(lr_schedule=lambda r: factor)
    with pytest.raises(ConfigError, match=r"Yogi.lr_schedule\(3\) returned .*finite factor >= 0"):
        opt.step(w(1.0), w(1.0), opt.init(w(1.0)), 3)


@pytest.mark.parametrize("make, match", [
    (lambda: step_decay(every=0, gamma=0.5), "every"),
    (lambda: step_decay(every=2.5, gamma=0.5), "every"),
    (lambda: step_decay(every=2, gamma=0.0), "gamma"),
    (lambda: step_decay(every=2, gamma=1.5), "gamma"),
    (lambda: cosine(rounds=0), "rounds"),
    (lambda: cosine(rounds=10, min_factor=1.5), "min_factor"),
    (lambda: cosine(rounds=10, min_factor=float("nan")), "min_factor"),
])
def test_bad_schedule_settings(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


# -------------------------------------------------------------------------------- bad settings

@pytest.mark.parametrize("cls, kwargs, match", [
    (SGD, dict(lr=0.0), r"SGD.lr must be a finite number > 0, got 0.0"),
    (SGD, dict(lr=-1.0), "SGD.lr"),
    (SGD, dict(lr=float("inf")), "SGD.lr"),
    (SGD, dict(lr=True), "SGD.lr"),
    (SGD, dict(momentum=1.0), r"SGD.momentum must be in \[0, 1\), got 1.0"),
    (SGD, dict(momentum=-0.1), "SGD.momentum"),
    (SGD, dict(nesterov=True), "nesterov=True needs momentum > 0"),
    (SGD, dict(momentum=0.5, nesterov="yes"), "nesterov must be True or False"),
    (SGD, dict(lr_schedule=0.5), "lr_schedule must be a function"),
    (Adam, dict(beta1=1.0), r"Adam.beta1 must be in \[0, 1\)"),
    (Adam, dict(beta2=-0.01), "Adam.beta2"),
    (Adam, dict(tau=0.0), "Adam.tau must be a finite number > 0"),
    (Yogi, dict(lr=float("nan")), "Yogi.lr"),
    (Yogi, dict(beta2=1.5), "Yogi.beta2"),
    (Adagrad, dict(tau=-1e-3), "Adagrad.tau"),
    (Adagrad, dict(beta1=0.999999 + 1), "Adagrad.beta1"),
    (Adagrad, dict(lr="0.1"), "Adagrad.lr"),
])
def test_bad_optimizer_settings(cls, kwargs, match):
    with pytest.raises(ConfigError, match=match):
        cls(**kwargs)


def test_optimizers_are_frozen_settings_that_satisfy_the_protocol():
    for opt in ALL.values():
        assert isinstance(opt, ServerOptimizer)
        with pytest.raises(AttributeError):
            opt.lr = 5.0


# ------------------------------------------------------------------------------ FedOpt in FedAvg

def fixed_diff(value: float):
    def execute(task, ctx, abort):
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, {k: torch.full_like(v, value) for k, v in task.data.data.items()},
                      {fk.MetaKey.NUM_SAMPLES: 1})
    return execute


def toy(tiny_model, workflow, *values):
    d = fk.Dataset(torch.zeros(4, 1), torch.zeros(4, dtype=torch.long), 2)
    clients = [fk.Client(f"c{i}", ClientData(d, d), {"train": fixed_diff(v)}) for i, v in enumerate(values)]
    return fk.Simulator(workflow, model=tiny_model, clients=clients)


def test_fedopt_keeps_momentum_across_rounds_in_the_run_not_the_config(tiny_model):
    # Prepare: global 1.0, every client's diff +1 each round; lr 1, momentum 0.5
    sim = toy(tiny_model, FedOpt(rounds=3, server_opt=SGD(lr=1.0, momentum=0.5)), 1.0, 1.0)
    # Execute: the same simulator (and settings object) twice
    first, second = sim.run(progress=False), sim.run(progress=False)
    # Assert: buf 1, 1.5, 1.75 -> 1 + 1 + 1.5 + 1.75; the second run starts from fresh state
    assert first.weights["weight"].item() == 5.25
    assert second.weights["weight"].item() == 5.25


def test_fedavg_step_keeps_the_optimizer_state_under_server_opt():
    wf = FedAvg(server_opt=SGD(lr=1.0, momentum=0.5))
    results = {"c0": fk.DXO(fk.DataKind.WEIGHT_DIFF, w(1.0), {"num_samples": 1})}
    state = {}
    x = wf.step(w(1.0), results, state, round=0, fl=None)
    x = wf.step(x, results, state, round=1, fl=None)
    assert x["w"].item() == 3.5 and state["server_opt"]["momentum/w"].item() == 1.5
    # without the run's state every step starts fresh: no momentum carried
    assert wf.step(wf.step(w(1.0), results, {}, round=0, fl=None), results, {}, round=1, fl=None)["w"].item() == 3.0
    assert Server({"w": torch.zeros(1)}).state == {}


def test_fedopt_is_a_fedavg_with_nvflare_defaults():
    wf = FedOpt(rounds=5, clients_per_round=2)
    assert type(wf) is FedAvg and wf.rounds == 5 and wf.clients_per_round == 2
    assert wf.server_opt == SGD(lr=1.0, momentum=0.6) and FedAvg().server_opt is None


@pytest.mark.parametrize("make, match", [
    (lambda: FedAvg(server_opt="adam"), "FedAvg.server_opt must be a server optimizer.*got 'adam'"),
    (lambda: FedAvg(server_opt=torch.optim.Adam), "FedAvg.server_opt must be a server optimizer"),
    (lambda: FedOpt(server_opt=None), "FedOpt needs a server optimizer.*use FedAvg"),
])
def test_bad_server_opt_in_fedavg(make, match):
    with pytest.raises(ConfigError, match=match):
        make()


def test_a_user_optimizer_plugs_in_and_its_bad_output_is_named(tiny_model):
    @dataclass(frozen=True)
    class Double:
        def init(self, weights):
            return {}

        def step(self, weights, delta, state, round):
            return {k: (v + 2 * delta[k]).double() for k, v in weights.items()}, state

    sim = toy(tiny_model, FedAvg(rounds=1, server_opt=Double()), 1.0)
    with pytest.raises(UpdateError, match=r"server optimizer .*Double.* gave 'weight' as torch.float64"):
        sim.run(progress=False)


def digits_run(digits, workflow, clients=4, seed=0):
    parts = fk.data.iid(digits.train, clients=clients, seed=seed)
    return fk.Simulator(workflow, model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test,
                        seed=seed).run(progress=False)


@pytest.fixture(scope="module")
def plain_fedavg(digits):
    return digits_run(digits, FedAvg(rounds=3))


def test_sgd_server_opt_at_lr_one_is_fedavg_on_digits(digits, plain_fedavg):
    sgd = digits_run(digits, FedAvg(rounds=3, server_opt=SGD()))
    assert sgd.model_sha256 == plain_fedavg.model_sha256


@pytest.mark.parametrize("name", ["fedavgm", "nesterov", "adam", "yogi", "adagrad"])
def test_every_server_opt_runs_fedavg_on_digits(digits, plain_fedavg, name):
    run = digits_run(digits, FedAvg(rounds=3, server_opt=ALL[name]))
    acc = run.history.series("accuracy")
    assert run.status == "done" and len(acc) == 3
    assert all(0.0 <= a <= 1.0 for a in acc)
    assert all(torch.isfinite(v).all() for v in run.weights.values() if v.is_floating_point())
    assert run.model_sha256 != plain_fedavg.model_sha256


def test_fedopt_with_momentum_learns_digits(digits):
    run = digits_run(digits, FedOpt(rounds=10, server_opt=SGD(lr=1.0, momentum=0.6)), clients=8)
    acc = run.history.series("accuracy")
    assert acc[-1] > 0.8, acc
    assert acc[-1] > acc[0]
