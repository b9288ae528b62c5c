"""The widget panel, driven as a person would: set values, click Run or Stop, read the figures."""

import threading
import time

import fedkit as fk
from fedkit.widgets import ComparisonView, Dashboard, ExperimentPanel


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
    assert {t.name for t in panel.dashboard.traffic.data} == {"bytes_down", "bytes_up"}
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
