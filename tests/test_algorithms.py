"""FedProx and SCAFFOLD: the client-side changes against their equations, and SCAFFOLD against client drift."""

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.exchange import ClientContext


def task_with(model, **meta):
    return fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, fk.weights.clone(model.state_dict()), meta))


def test_proximal_hook_equals_the_fedprox_loss(digits):
    """Adding mu * (w - w0) to the gradient is the same as training on loss + mu/2 ||w - w0||^2."""
    data = digits.train.subset(range(64))
    cfg = fk.TrainConfig(epochs=1, batch_size=16, lr=0.1, momentum=0.0, validate=False)
    torch.manual_seed(0)
    start = fk.models.MLP(64, 10)
    mu = 0.5
    out = fk.Trainer(lambda: fk.models.MLP(64, 10), cfg).execute(
        task_with(start, client_hooks=(fk.workflows.Proximal(mu),)), ClientContext("c", ClientData(data, data), {}, torch.device("cpu"), 3), fk.Signal())

    ref = fk.models.MLP(64, 10)
    ref.load_state_dict(start.state_dict())
    anchor = {k: v.clone() for k, v in start.state_dict().items()}
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    order = torch.randperm(64, generator=torch.Generator().manual_seed(3))
    for i in range(0, 64, 16):
        idx = order[i:i + 16]
        loss = torch.nn.functional.cross_entropy(ref(data.x[idx]), data.y[idx])
        loss = loss + mu / 2 * sum(((p - anchor[n]) ** 2).sum() for n, p in ref.named_parameters())
        opt.zero_grad()
        loss.backward()
        opt.step()
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(out.data[k], v - anchor[k])


class Flip(torch.nn.Module):
    """One weight w; logits [-w * x, 0]: a model whose gradient is easy to compute by hand."""

    def __init__(self):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))

    def forward(self, inp):
        return torch.stack([-(self.weight * inp).sum(1), torch.zeros(len(inp))], 1)


def test_scaffold_client_follows_option_two():
    """Plain SGD, K = 2 steps: y_k+1 = y_k - lr (g(y_k) + c - c_i); then c_i+ = c_i - c + (x - y) / (K lr)."""
    x = torch.ones(4, 1)
    d = fk.Dataset(x, torch.zeros(4, dtype=torch.long), 2)
    cfg = fk.TrainConfig(epochs=1, batch_size=2, lr=0.1, momentum=0.0, validate=False)
    state = {"scaffold_ci": {"weight": torch.tensor([0.25])}}
    c = {"weight": torch.tensor([0.5])}
    out = fk.Trainer(Flip, cfg).execute(task_with(Flip(), scaffold_c=c, client_hooks=(fk.workflows.Scaffold(),)),
                                        ClientContext("c", ClientData(d, d), state, torch.device("cpu"), 0), fk.Signal())
    y = torch.zeros(1)
    for _ in range(2):  # every batch holds the same two rows, so the order does not matter
        w = y.clone().requires_grad_(True)
        logits = torch.stack([-(w * x[:2]).sum(1), torch.zeros(2)], 1)
        g = torch.autograd.grad(torch.nn.functional.cross_entropy(logits, torch.zeros(2, dtype=torch.long)), w)[0]
        y = y - 0.1 * (g + 0.5 - 0.25)
    assert out.meta[fk.MetaKey.NUM_STEPS] == 2
    torch.testing.assert_close(out.data["weight"], y)
    expected_ci = torch.tensor([0.25]) - c["weight"] - y / (2 * 0.1)
    torch.testing.assert_close(state["scaffold_ci"]["weight"], expected_ci)
    torch.testing.assert_close(out.meta["scaffold_dc"]["weight"], expected_ci - 0.25)


def test_scaffold_server_moves_c_by_the_sampled_share(tiny_model):
    """c <- c + |S|/N * mean(dc over S): two of four clients sampled."""
    from fedkit.workflows.extensions import Scaffold

    values = {"c0": 1.0, "c1": 3.0, "c2": 5.0, "c3": 7.0}

    def reporting(dc):
        def execute(task, ctx, abort):
            assert "scaffold_c" in task.data.meta
            return fk.DXO("WEIGHT_DIFF", {"weight": torch.zeros(1, 1)},
                          {"num_samples": 1, "scaffold_dc": {"weight": torch.full((1, 1), dc)},
                           fk.MetaKey.HOOKS_RAN: ["Spy"]})  # an executor of its own that did SCAFFOLD's client half
        return execute

    captured = {}

    class Spy(Scaffold):
        def after_aggregate(self, fl, results):
            super().after_aggregate(fl, results)
            captured["picked"] = sorted(results)
            captured["c"] = fl.state_of(self)["c"]["weight"].item()

    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    clients = [fk.Client(n, ClientData(d, d), {"train": reporting(v)}) for n, v in values.items()]
    fk.Simulator(fk.FedAvg(rounds=1, clients_per_round=2, extensions=(Spy(),)), model=tiny_model,
                 clients=clients).run(progress=False)
    assert len(captured["picked"]) == 2
    assert captured["c"] == pytest.approx(2 / 4 * sum(values[p] for p in captured["picked"]) / 2)


def test_scaffold_beats_fedavg_under_client_drift(digits):
    """Pathological shards (2 classes per client) and 5 local epochs: FedAvg's clients drift; SCAFFOLD corrects."""
    parts = fk.data.shards(digits.train, clients=10, shards_per_client=2, seed=0)
    train = fk.TrainConfig(epochs=5, lr=0.05, momentum=0.0)
    runs = fk.compare({"FedAvg": fk.FedAvg(rounds=12), "SCAFFOLD": fk.SCAFFOLD(rounds=12)},
                      model=lambda: fk.models.for_data(digits), clients=parts, test=digits.test, train=train, progress=False)
    fedavg, scaffold = (runs[k].history.series("accuracy") for k in ("FedAvg", "SCAFFOLD"))
    assert scaffold[-1] > fedavg[-1] + 0.02, (fedavg[-1], scaffold[-1])
    assert sum(scaffold[-4:]) > sum(fedavg[-4:])  # not one lucky round


def test_fedprox_mu_zero_is_fedavg(digits):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    runs = fk.compare({"a": fk.FedAvg(rounds=2), "b": fk.FedProx(rounds=2, mu=0.0)}, model=lambda: fk.models.for_data(digits),
                      clients=parts, progress=False)
    assert runs["a"].model_sha256 == runs["b"].model_sha256


def test_extensions_compose_and_validate():
    wf = fk.SCAFFOLD(rounds=2, extensions=(fk.workflows.Proximal(0.1),))
    assert [type(e).__name__ for e in wf.extensions] == ["Scaffold", "Proximal"]
    with pytest.raises(fk.ConfigError, match="mu must be a number >= 0"):
        fk.FedProx(mu=-1)
    with pytest.raises(fk.ConfigError, match="extensions must be a tuple"):
        fk.FedAvg(extensions=[fk.workflows.Proximal(0.1)])
