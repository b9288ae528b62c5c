"""The live dashboard draws what real private runs record: an HE run's client-side accuracy, DP-SGD's epsilon."""

import pytest

import fedkit as fk

pytest.importorskip("ipywidgets")
pytest.importorskip("tenseal")
pytest.importorskip("opacus")

from fedkit.widgets import Dashboard  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_thread")


def run(digits, workflow):
    return fk.Simulator(workflow, model=lambda: fk.models.for_data(digits), clients=fk.data.iid(digits.train, 3, seed=0),
                        test=digits.test, seed=0).run(progress=False)


def traces(figure):
    return {t.name: list(t.y) for t in figure.data}


def test_an_he_run_draws_the_clients_accuracy(digits):
    he = run(digits, fk.FedAvg(rounds=2, he=fk.he.CKKS()))
    board = Dashboard()
    board.update(he.history)
    drawn = traces(board.accuracy)
    assert drawn and all(len(y) == 2 and all(v == v for v in y) for y in drawn.values())
    assert drawn[fk.metrics.label("client_accuracy")] == he.history.series("client_accuracy")


def test_a_dp_sgd_run_draws_its_epsilon_and_accuracy(digits):
    dp = run(digits, fk.FedAvg(rounds=2, extensions=(fk.DPSGD(noise_multiplier=1.0),)))
    board = Dashboard()
    board.update(dp.history)
    assert traces(board.accuracy)["accuracy"] == dp.history.series("accuracy")
    eps = traces(board.privacy)[fk.metrics.label("client_epsilon")]
    assert eps == dp.history.series("client_epsilon") and 0 < eps[0] < eps[1]
