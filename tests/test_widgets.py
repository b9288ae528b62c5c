"""The widget panel, driven as a person would: set values, click Run or Stop, read the figures."""

import dataclasses
import threading
import time

from types import SimpleNamespace

import pytest

import fedkit as fk
from fedkit.experiment import DataSpec
from fedkit.history import History, RoundRecord
from fedkit.metrics import LABELS
from fedkit.widgets import WORKFLOWS, ComparisonView, Dashboard, ExperimentPanel, experiment_from_controls


def test_panel_runs_an_experiment_and_fills_the_figures():
    panel = ExperimentPanel()
    panel.clients.value, panel.rounds.value, panel.partition.value = 4, 3, "iid"
    panel.run_button.click()
    assert panel.run is not None and panel.stop_button.disabled is False
    run = panel.wait(120)
    assert run.status == "done" and len(run.history) == 3
    assert panel.progress.value == 3 and panel.progress.max == 3
    acc = next(t for t in panel.dashboard.accuracy.data if t.name == "accuracy")
    assert list(acc.x) == [1, 2, 3] and list(acc.y) == run.history.series("accuracy")
    assert len(panel.dashboard.clients.data) == 4  # one line per client
    # FedAvg sends and receives the same weights: one line for both directions, ticks as 154k, not 153.9195k
    assert [t.name for t in panel.dashboard.traffic.data] == ["bytes_down = bytes_up"]
    assert list(panel.dashboard.traffic.data[0].y) == run.history.series("bytes_up") == run.history.series("bytes_down")
    assert panel.dashboard.traffic.layout.yaxis.tickformat == "~s"
    assert panel.dashboard.privacy_box.layout.display == "none"  # no DP: no empty "privacy spent" chart
    assert panel.progress.description == "progress"  # not "rounds", next to the rounds slider
    assert len(panel.comparison.figure.data) == 1 and "done" in panel.status.value
    assert panel.run_button.disabled is False and panel.stop_button.disabled is True
    # the panel's settings are a plain Experiment: the same run again in a cell gives the same model
    assert panel.settings().simulator().run(progress=False).model_sha256 == run.model_sha256


def test_stop_aborts_the_run_and_keeps_the_panel_usable():
    before = threading.active_count()
    panel = ExperimentPanel(rounds=200, local_epochs=3)
    panel.start()
    deadline = time.time() + 60
    while len(panel.run.history) < 1 and time.time() < deadline:
        time.sleep(0.01)
    panel.stop_button.click()
    run = panel.wait(60)
    assert run.status == "aborted" and 1 <= len(run.history) < 200
    assert "aborted" in panel.status.value
    (line,) = panel.comparison.figure.data  # an aborted run is marked in the comparison: its name, dashed
    assert line.name.endswith(f"(aborted after round {len(run.history)})") and line.line.dash == "dash"
    assert panel.run_button.disabled is False
    time.sleep(0.1)
    assert threading.active_count() <= before  # no thread left behind


def test_second_run_while_running_is_refused_and_bad_settings_are_reported():
    panel = ExperimentPanel(rounds=200, local_epochs=3)
    first = panel.start()
    assert panel.start() is None and "in progress" in panel.status.value
    panel.stop()
    panel.wait(60)
    assert first.status == "aborted"
    panel.clients.value = 50
    panel.partition.value = "shards"
    panel.dataset.value = "cifar10"  # needs torchvision and a download: the panel says why it cannot start
    assert panel.start() is None and "cannot start" in panel.status.value


def test_finished_runs_accumulate_in_the_comparison():
    panel = ExperimentPanel(rounds=2, clients=3)
    for algorithm in ("fedavg", "scaffold"):
        panel.algorithm.value = algorithm
        panel.start()
        panel.wait(120)
    assert [t.name.split()[0] for t in panel.comparison.figure.data] == ["fedavg", "scaffold"]
    panel.comparison.clear()
    assert panel.comparison.figure.data == ()


def test_the_panel_maps_its_controls_to_typed_objects():
    panel = ExperimentPanel()
    assert panel.settings() == fk.Experiment.preset("quickstart")  # the default panel is the README's job
    assert panel.controls() == dict(dataset="digits", clients=8, partition="dirichlet", alpha=0.5, algorithm="fedavg",
                                    mu=0.01, rounds=20, local_epochs=1, lr=0.05, seed=0)
    panel.algorithm.value, panel.mu.value, panel.rounds.value, panel.clients.value = "fedprox", 0.1, 5, 4
    panel.local_epochs.value, panel.partition.value, panel.seed.value = 2, "shards", 3
    assert panel.settings() == fk.Experiment(data=DataSpec(clients=4, partition="shards"),
                                             workflow=fk.FedProx(rounds=5, mu=0.1), train=fk.TrainConfig(epochs=2), seed=3)
    assert panel.label() == "fedprox shards E=2 lr=0.05 #1"


def test_the_panel_keeps_what_it_has_no_control_for_and_runs_it(digits):
    base = fk.Experiment.preset("smoke", train=fk.TrainConfig(batch_size=32, momentum=0.5), device="cpu", model="mlp")
    panel = ExperimentPanel(base, algorithm="scaffold")
    assert (panel.clients.value, panel.rounds.value, panel.partition.value) == (3, 2, "iid")  # the base's values
    expected = dataclasses.replace(base, workflow=fk.SCAFFOLD(rounds=2))  # the menu's workflow, with its defaults
    assert panel.settings() == expected
    run = panel.start()
    assert panel.wait(120) is run and run.status == "done" and len(run.history) == 2
    assert run.simulator.train == fk.TrainConfig(batch_size=32, momentum=0.5) and str(run.simulator.device) == "cpu"
    assert expected.simulator(data=digits).run(progress=False).model_sha256 == run.model_sha256  # the same in a cell


@pytest.mark.parametrize("algorithm, expected", [
    ("fedavg", fk.FedAvg(rounds=3)), ("fedprox", fk.FedProx(rounds=3, mu=0.5)), ("fedopt", fk.FedOpt(rounds=3)),
    ("scaffold", fk.SCAFFOLD(rounds=3)), ("cyclic", fk.Cyclic(rounds=3)),
])
def test_experiment_from_controls_is_what_a_cell_writes(algorithm, expected):
    exp = experiment_from_controls(fk.Experiment(), algorithm=algorithm, rounds=3, mu=0.5, alpha=0.2)
    assert exp == fk.Experiment(data=DataSpec(alpha=0.2), workflow=expected)
    assert list(WORKFLOWS) == ["fedavg", "fedprox", "fedopt", "scaffold", "cyclic"]


@pytest.mark.parametrize("make, match", [
    (lambda: experiment_from_controls(fk.Experiment(), algorithm="fedmagic"), "not in the panel's menu; choose one of"),
    (lambda: experiment_from_controls(fk.Experiment(), batch_size=8), "the panel has no control batch_size"),
    (lambda: ExperimentPanel(rounds=5, dp=True), "the panel has no control dp; its controls are: dataset, clients"),
    (lambda: ExperimentPanel(partition="random"), "partition 'random' is not known"),
])
def test_bad_controls_are_refused_with_what_there_is(make, match):
    with pytest.raises(fk.ConfigError, match=match):
        make()


def test_dashboard_and_comparison_work_from_a_history_alone(digits):
    run = fk.Simulator(fk.FedAvg(rounds=2), model=lambda: fk.models.for_data(digits),
                       clients=fk.data.iid(digits.train, 2), test=digits.test).run(progress=False)
    dash = Dashboard()
    dash.update(run.history)
    dash.update(run.history)  # updating twice keeps one trace per line
    assert [t.name for t in dash.accuracy.data] == ["accuracy", "loss"]
    view = ComparisonView()
    view.add("a", run)
    assert list(view.figure.data[0].y) == run.history.series("accuracy")


def test_the_panel_keeps_the_values_given_exactly():
    panel = ExperimentPanel(alpha=0.5, lr=0.037, mu=0.0123, algorithm="fedprox")
    assert (panel.alpha.value, panel.lr.value, panel.mu.value) == (0.5, 0.037, 0.0123)
    assert (panel.alpha.label, panel.lr.label, panel.mu.label) == ("0.5", "0.037", "0.0123")  # what it shows
    exp = panel.settings()
    assert (exp.data.alpha, exp.train.lr, exp.workflow) == (0.5, 0.037, fk.FedProx(rounds=20, mu=0.0123))
    assert "a=0.5 " in panel.label() and "lr=0.037 " in panel.label()
    panel.lr.index += 1  # the user moves the slider one step: a value of its own grid, exactly as labelled
    assert panel.lr.value == 0.05 and panel.lr.label == "0.05" and panel.settings().train.lr == 0.05
    panel.alpha.index = 0
    assert panel.settings().data.alpha == 0.01
    assert ExperimentPanel().controls()["alpha"] == 0.5  # the quickstart's own values too


def test_log_grid_is_decimal_and_holds_the_given_value():
    from fedkit.widgets import log_grid

    assert log_grid(-1, 1) == [0.1, 0.2, 0.3, 0.5, 1.0, 2.0, 3.0, 5.0, 10.0]
    assert log_grid(-2, 0, 0.037) == [0.01, 0.02, 0.03, 0.037, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
    assert log_grid(-2, 0, 7.5)[-1] == 7.5  # out of range: kept, not clipped


def test_the_panel_has_a_static_note_for_a_saved_notebook():
    bundle = ExperimentPanel()._repr_mimebundle_()
    assert "application/vnd.jupyter.widget-view+json" in bundle
    assert "run this cell" in bundle["text/html"] and "run this cell" in bundle["text/plain"]


def test_dashboard_figures_fit_two_columns_and_put_legends_below():
    dash = Dashboard()
    for fig in dash.figures:
        assert fig.layout.width <= 500 and fig.layout.legend.orientation == "h"
    assert ComparisonView().figure.layout.width <= 1000


def test_fk_widgets_is_reachable_lazily():
    import subprocess
    import sys

    code = ("import sys, fedkit as fk; assert 'ipywidgets' not in sys.modules; "
            "assert fk.widgets.ExperimentPanel is not None; assert 'ipywidgets' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)


# ---------------------------------------------------- dashboards of hand-made histories: HE, DP-SGD, DP-FedAvg

def history(metrics, clients=lambda i: {}):
    """Three rounds: ``metrics`` maps each round metric to its three values; ``clients(i)`` gives round i's rows."""
    return History([RoundRecord(round=i, seconds=0.1, metrics={k: v[i] for k, v in metrics.items()},
                                clients=clients(i)) for i in range(3)])


def lines(fig):
    return {t.name: (list(t.x), list(t.y)) for t in fig.data}


HE = history({"client_accuracy": [0.5, 0.625, 0.75], "client_loss": [1.5, 1.25, 1.0], "clients_validated": [3] * 3,
              "bytes_down": [10, 10, 10], "bytes_up": [20, 20, 20], "he_encrypt_s": [0.5] * 3},
             lambda i: {"site-1": {"train_loss": 2.0 - i}, "site-2": {"train_loss": 3.0 - i}})
DP_SGD = history({"accuracy": [0.25, 0.5, 0.75], "loss": [2.0, 1.0, 0.5], "client_epsilon": [0.5, 1.0, 1.5]},
                 lambda i: {"site-1": {"train_loss": 1.0, "epsilon": 0.5 * (i + 1), "epsilon_next": 0.5 * (i + 2),
                                       "delta": 1e-5},
                            "site-2": {"train_loss": 1.0, "epsilon": 0.25 * (i + 1), "delta": 1e-5}})
DP_FEDAVG = history({"accuracy": [0.25, 0.5, 0.75], "loss": [2.0, 1.0, 0.5], "epsilon": [2.0, 3.0, 4.0],
                     "delta": [1e-5] * 3, "noise_multiplier": [1.0] * 3, "clip": [1.0] * 3})


def test_dashboard_of_an_he_run_draws_the_clients_scores():
    dash = Dashboard()
    dash.update(HE)
    assert lines(dash.accuracy) == {LABELS["client_accuracy"]: ([1, 2, 3], [0.5, 0.625, 0.75]),
                                    LABELS["client_loss"]: ([1, 2, 3], [1.5, 1.25, 1.0])}
    assert lines(dash.clients) == {"site-1": ([1, 2, 3], [2.0, 1.0, 0.0]), "site-2": ([1, 2, 3], [3.0, 2.0, 1.0])}
    assert lines(dash.privacy) == {}  # HE alone spends no epsilon
    assert dash.privacy_box.layout.display == "none"
    assert [t.yaxis for t in dash.accuracy.data] == ["y", "y2"]  # accuracy and loss on their own axes
    assert lines(dash.traffic) == {"bytes_down": ([1, 2, 3], [10, 10, 10]), "bytes_up": ([1, 2, 3], [20, 20, 20])}


def test_dashboard_of_a_dp_sgd_run_draws_the_example_level_epsilon():
    dash = Dashboard()
    dash.update(DP_SGD)
    assert lines(dash.accuracy) == {"accuracy": ([1, 2, 3], [0.25, 0.5, 0.75]), "loss": ([1, 2, 3], [2.0, 1.0, 0.5])}
    assert lines(dash.privacy) == {LABELS["client_epsilon"]: ([1, 2, 3], [0.5, 1.0, 1.5])}
    assert dash.privacy_box.layout.display == ""  # shown once the run records an epsilon


def test_dashboard_of_a_dp_fedavg_run_draws_the_user_level_epsilon():
    dash = Dashboard()
    dash.update(DP_FEDAVG)
    assert lines(dash.accuracy) == {"accuracy": ([1, 2, 3], [0.25, 0.5, 0.75]), "loss": ([1, 2, 3], [2.0, 1.0, 0.5])}
    assert lines(dash.privacy) == {LABELS["epsilon"]: ([1, 2, 3], [2.0, 3.0, 4.0])}


def test_dashboard_draws_both_epsilons_and_follows_a_new_run():
    both = history({"client_accuracy": [0.5, 0.5, 0.5], "client_loss": [1.0] * 3, "epsilon": [2.0, 3.0, 4.0],
                    "client_epsilon": [0.5, 1.0, 1.5]})
    dash = Dashboard()
    dash.update(both)
    dash.update(both)  # one trace per line still
    assert [t.name for t in dash.privacy.data] == [LABELS["epsilon"], LABELS["client_epsilon"]]
    assert [list(t.y) for t in dash.privacy.data] == [[2.0, 3.0, 4.0], [0.5, 1.0, 1.5]]
    assert [list(t.y) for t in dash.accuracy.data] == [[0.5, 0.5, 0.5], [1.0, 1.0, 1.0]]
    dash.update(DP_SGD)  # the same dashboard, another run: its lines replace the old ones
    assert [t.name for t in dash.accuracy.data] == ["accuracy", "loss"]
    assert lines(dash.privacy) == {LABELS["client_epsilon"]: ([1, 2, 3], [0.5, 1.0, 1.5])}


def test_live_round_axes_have_integer_ticks():
    dash = Dashboard()
    dash.update(history({"accuracy": [0.25, 0.5, 0.75], "bytes_down": [10] * 3, "client_epsilon": [0.5, 1.0, 1.5]},
                        lambda i: {"site-1": {"train_loss": 1.0}}))
    for fig in dash.figures:  # accuracy, per-client loss, bytes, epsilon: rounds 1, 2, 3, never 1.5
        assert fig.data and (fig.layout.xaxis.tickformat, fig.layout.xaxis.tickvals) == (",d", (1, 2, 3)), fig.layout.title.text
    assert lines(dash.clients)["site-1"][0] == [1, 2, 3]  # the table's round is the round's number: no + 1
    view = ComparisonView()
    view.add("a", SimpleNamespace(history=DP_SGD, status="done"))
    assert list(view.figure.data[0].x) == [1, 2, 3] and view.figure.layout.xaxis.tickvals == (1, 2, 3)


def test_comparison_of_an_he_run_shows_its_clients_scores():
    view = ComparisonView()
    view.add("he", SimpleNamespace(history=HE))
    view.add("dp", SimpleNamespace(history=DP_SGD))
    assert [(t.name, list(t.y)) for t in view.figure.data] == [("he (on clients)", [0.5, 0.625, 0.75]),
                                                                ("dp", [0.25, 0.5, 0.75])]


def test_comparison_shows_a_legend_with_one_run_and_marks_aborted_runs():
    view = ComparisonView()
    view.add("only", SimpleNamespace(history=DP_SGD, status="aborted"))
    assert view.figure.layout.showlegend is True
    (line,) = view.figure.data
    assert line.name == "only (aborted after round 3)" and line.line.dash == "dash"
