"""The standard trainer and evaluator executors, checked against plain PyTorch."""

import math

import pytest
import torch

import fedkit as fk
from fedkit.data import ClientData
from fedkit.exchange import ClientContext
from fedkit.train import resolve_device, sgd_epochs


def ctx_for(data, seed=0):
    return ClientContext("c", ClientData(data, data), {}, torch.device("cpu"), seed)


def task_for(model):
    return fk.Task("train", fk.DXO(fk.DataKind.WEIGHTS, fk.weights.clone(model.state_dict())), round=0)


def test_trainer_returns_the_difference_plain_sgd_would_make(digits):
    data = digits.train.subset(range(100))
    cfg = fk.TrainConfig(epochs=2, batch_size=32, lr=0.1, momentum=0.5, validate=False)
    torch.manual_seed(0)
    start = fk.models.MLP(64, 10)
    result = fk.Trainer(lambda: fk.models.MLP(64, 10), cfg).execute(task_for(start), ctx_for(data, seed=7), fk.Signal())

    # the same training written out by hand with the same batch order
    ref = fk.models.MLP(64, 10)
    ref.load_state_dict(start.state_dict())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.5)
    gen = torch.Generator().manual_seed(7)
    for _ in range(2):
        order = torch.randperm(100, generator=gen)
        for i in range(0, 100, 32):
            idx = order[i:i + 32]
            loss = torch.nn.functional.cross_entropy(ref(data.x[idx]), data.y[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
    assert result.kind == fk.DataKind.WEIGHT_DIFF
    for k, v in ref.state_dict().items():
        torch.testing.assert_close(result.data[k], v - start.state_dict()[k])
    assert result.meta[fk.MetaKey.NUM_SAMPLES] == 100
    assert result.meta[fk.MetaKey.NUM_STEPS] == 2 * math.ceil(100 / 32)


def test_trainer_validates_the_received_model_first(digits):
    data = digits.train.subset(range(64))
    model = fk.models.MLP(64, 10)
    ctx = ClientContext("c", ClientData(data, digits.test), {}, torch.device("cpu"), 0)
    result = fk.Trainer(lambda: fk.models.MLP(64, 10)).execute(task_for(model), ctx, fk.Signal())
    expected = fk.evaluate(model, digits.test)
    assert result.meta["metrics"]["val_accuracy"] == pytest.approx(expected["accuracy"])
    assert result.meta["metrics"]["val_loss"] == pytest.approx(expected["loss"], rel=1e-5)


def test_abort_is_checked_between_batches(digits):
    signal = fk.Signal()
    signal.trigger("stop")
    with pytest.raises(fk.Aborted, match="stop"):
        sgd_epochs(fk.models.MLP(64, 10), digits.train, fk.TrainConfig(), seed=0, abort=signal)


def test_fedprox_and_scaffold_terms_leave_a_frozen_parameter_alone(digits):
    """A parameter with ``requires_grad=False`` has no gradient: the terms skip it, as SGD does (no AttributeError)."""
    model = fk.models.MLP(64, 10)
    model.fc1.weight.requires_grad_(False)
    start = fk.weights.clone(model.state_dict())
    shifted = {k: v + 1 for k, v in start.items()}
    hooks = [fk.train.proximal_hook(model, shifted, mu=0.5), fk.train.correction_hook(model, shifted)]
    sgd_epochs(model, digits.train.subset(range(64)), fk.TrainConfig(weight_decay=1e-3), 0, fk.Signal(), hooks)
    assert torch.equal(model.fc1.weight, start["fc1.weight"])
    assert not torch.equal(model.fc1.bias, start["fc1.bias"])


def test_evaluate_matches_a_direct_computation(digits):
    torch.manual_seed(0)
    model = fk.models.MLP(64, 10)
    out = model(digits.test.x)
    scores = fk.evaluate(model, digits.test, batch_size=50)
    assert scores["accuracy"] == pytest.approx((out.argmax(1) == digits.test.y).float().mean().item())
    assert scores["loss"] == pytest.approx(torch.nn.functional.cross_entropy(out, digits.test.y).item(), rel=1e-5)


def test_evaluator_executor_scores_the_validation_split(digits):
    model = fk.models.MLP(64, 10)
    ctx = ClientContext("c", ClientData(digits.train, digits.test), {}, torch.device("cpu"), 0)
    task = fk.Task("validate", fk.DXO(fk.DataKind.WEIGHTS, model.state_dict()))
    out = fk.Evaluator(lambda: fk.models.MLP(64, 10)).execute(task, ctx, fk.Signal())
    assert out.kind == fk.DataKind.METRICS
    assert out.data["accuracy"] == pytest.approx(fk.evaluate(model, digits.test)["accuracy"])


@pytest.mark.parametrize("kwargs, match", [
    (dict(epochs=0), "epochs"), (dict(batch_size=0), "batch_size"), (dict(lr=0), "lr"),
    (dict(lr=-1.0), "lr"), (dict(momentum=1.0), "momentum"), (dict(weight_decay=-0.1), "weight_decay"),
    (dict(epochs=1.5), "epochs"), (dict(lr=float("inf")), "lr must be a finite number > 0"),
    (dict(lr=float("nan")), "lr"), (dict(lr="0.1"), "lr"), (dict(lr=True), "lr"), (dict(lr=None), "lr"),
    (dict(momentum=float("nan")), r"momentum must be a number in \[0, 1\)"), (dict(momentum=-0.1), "momentum"),
    (dict(weight_decay=float("inf")), "weight_decay must be a finite number >= 0"),
    (dict(weight_decay="0"), "weight_decay"), (dict(validate="yes"), "validate must be True or False"),
])
def test_train_config_rejects_bad_values(kwargs, match):
    with pytest.raises(fk.ConfigError, match=match):
        fk.TrainConfig(**kwargs)


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(fk.ConfigError, match="unknown device"):
        resolve_device("quantum")
    if not torch.cuda.is_available():
        with pytest.raises(fk.ConfigError, match="CUDA is not available"):
            resolve_device("cuda")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fedavg_on_cuda_matches_accuracy_band(digits):
    parts = fk.data.iid(digits.train, clients=8, seed=0)
    run = fk.Simulator(fk.FedAvg(rounds=10), model=lambda: fk.models.for_data(digits), clients=parts,
                       test=digits.test, device="cuda").run(progress=False)
    assert run.history.last("accuracy") >= 0.93


def test_weights_that_do_not_fit_the_model_are_explained():
    from fedkit.train import load_weights
    with pytest.raises(fk.UpdateError, match=r"given to MLP.*'fc1.weight' with shape \(64, 10\).*\(64, 64\)"):
        load_weights(fk.models.MLP(64, 10), {"fc1.weight": torch.zeros(64, 10), "fc1.bias": torch.zeros(64),
                                             "fc2.weight": torch.zeros(10, 64), "fc2.bias": torch.zeros(10)})
