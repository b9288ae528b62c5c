"""History: records per round and client, their tables, and saving/loading a run's history."""

from __future__ import annotations

import json
import math
import re

import numpy as np
import pandas as pd
import pytest

from fedkit.history import History, RoundRecord


@pytest.fixture
def history() -> History:
    h = History()
    h.append(RoundRecord(0, 1.5, {"accuracy": 0.5, "loss": 2.0},
                         {"site-1": {"samples": 10, "train_loss": 2.2}, "site-2": {"samples": 30, "train_loss": 1.8}}))
    h.append(RoundRecord(1, 1.25, {"accuracy": 0.75},
                         {"site-1": {"samples": 10, "train_loss": 1.1}}))
    h.append(RoundRecord(2, 1.0, {"accuracy": 0.875, "loss": 0.5},
                         {"site-2": {"samples": 30, "train_loss": 0.4}, "site-1": {"samples": 10, "train_loss": 0.6}}))
    h.events.append({"round": 1, "client": "site-2", "what": "failed", "reason": "boom"})
    return h


def test_append_len_iter(history):
    assert len(history) == 3
    assert [r.round for r in history] == [0, 1, 2]
    history.append(RoundRecord(3, 0.5, {}))
    assert len(history) == 4 and history.rounds[-1].clients == {}
    assert len(History()) == 0 and list(History()) == []


def test_iteration_is_a_snapshot(history):
    seen = []
    for r in history:
        seen.append(r.round)
        if r.round == 0:
            history.append(RoundRecord(9, 0.0, {}))
    assert seen == [0, 1, 2]
    assert len(history) == 4


def test_series_with_missing_metric(history):
    assert history.series("accuracy") == [0.5, 0.75, 0.875]
    loss = history.series("loss")
    assert loss[0] == 2.0 and math.isnan(loss[1]) and loss[2] == 0.5
    assert all(math.isnan(v) for v in history.series("nothing"))
    assert History().series("accuracy") == []


def test_last(history):
    assert history.last("accuracy") == 0.875
    assert history.last("loss") == 0.5
    history.append(RoundRecord(3, 1.0, {"accuracy": 0.9}))
    assert history.last("loss") == 0.5  # the last round that reported it
    assert math.isnan(history.last("nothing"))
    assert history.last("nothing", default=-1.0) == -1.0
    assert math.isnan(History().last("accuracy"))


def test_to_dataframe(history):
    df = history.to_dataframe()
    assert isinstance(df, pd.DataFrame)
    assert list(df.columns[:2]) == ["round", "seconds"] and set(df.columns) == {"round", "seconds", "accuracy", "loss"}
    assert df["round"].tolist() == [1, 2, 3]  # the rounds' numbers, as plotted and as in rounds.csv
    assert df["seconds"].tolist() == [1.5, 1.25, 1.0]
    assert df["accuracy"].tolist() == [0.5, 0.75, 0.875]
    assert df["loss"].isna().tolist() == [False, True, False]


def test_client_dataframe(history):
    df = history.client_dataframe()
    assert len(df) == 5
    assert df[["round", "client"]].values.tolist() == [
        [1, "site-1"], [1, "site-2"], [2, "site-1"], [3, "site-2"], [3, "site-1"]]
    assert df["train_loss"].tolist() == [2.2, 1.8, 1.1, 0.4, 0.6]
    assert df.groupby("client")["samples"].sum().to_dict() == {"site-1": 30, "site-2": 60}
    assert History().client_dataframe().empty


def test_to_dataframe_counts_rounds_as_the_csv_and_the_plots_do(tmp_path, history):
    from fedkit import plots

    history.save(tmp_path)
    numbers = [1, 2, 3]
    assert history.to_dataframe()["round"].tolist() == pd.read_csv(tmp_path / "rounds.csv")["round"].tolist() == numbers
    assert list(plots.curves(history).data[0].x) == numbers
    assert [r.number for r in history] == numbers and [r.round for r in history] == [0, 1, 2]  # history.json's index
    clients = history.client_dataframe()
    assert clients["round"].tolist() == pd.read_csv(tmp_path / "clients.csv")["round"].tolist() == [1, 1, 2, 3, 3]
    per_client = {t.name: list(t.x) for t in plots.client_curves(history).data}
    assert per_client == {c: rows["round"].tolist() for c, rows in clients.groupby("client")}


def test_dict_round_trip(history):
    d = history.to_dict()
    assert d["rounds"][1] == {"round": 1, "seconds": 1.25, "metrics": {"accuracy": 0.75},
                              "clients": {"site-1": {"samples": 10, "train_loss": 1.1}}}
    again = History.from_dict(d)
    assert again.to_dict() == d
    assert isinstance(again.rounds[0], RoundRecord)
    assert History.from_dict({}).to_dict() == {"rounds": [], "events": [], "results": {}}


def test_save_and_load(tmp_path, history):
    out = tmp_path / "run" / "nested"
    history.rounds[0].metrics["bytes_up"] = np.int64(1234)  # numpy scalars are written as numbers
    history.rounds[0].metrics["accuracy"] = np.float32(0.5)
    history.save(out)
    for name in ("history.json", "rounds.csv", "clients.csv"):
        assert (out / name).is_file()
    raw = json.loads((out / "history.json").read_text())
    assert raw["rounds"][0]["metrics"]["bytes_up"] == 1234
    assert raw["events"] == [{"round": 1, "client": "site-2", "what": "failed", "reason": "boom"}]

    loaded = History.load(out)
    assert len(loaded) == 3
    assert loaded.series("accuracy") == [0.5, 0.75, 0.875]
    assert loaded.rounds[2].clients == history.rounds[2].clients
    assert loaded.events == history.events
    assert loaded.last("bytes_up") == 1234.0

    rounds = pd.read_csv(out / "rounds.csv")
    assert rounds["round"].tolist() == [1, 2, 3] and rounds["accuracy"].tolist() == [0.5, 0.75, 0.875]  # as plotted
    assert rounds["loss"].isna().tolist() == [False, True, False]
    clients = pd.read_csv(out / "clients.csv")
    assert len(clients) == 5 and clients["client"].tolist()[:2] == ["site-1", "site-2"]
    assert clients["train_loss"].tolist() == [2.2, 1.8, 1.1, 0.4, 0.6]


def test_save_nan_metric_round_trips(tmp_path):
    h = History([RoundRecord(0, 0.1, {"loss": float("nan"), "accuracy": 0.1})])
    h.save(tmp_path)
    loaded = History.load(tmp_path)
    assert math.isnan(loaded.rounds[0].metrics["loss"]) and loaded.last("accuracy") == 0.1


def test_save_empty_history(tmp_path):
    History().save(tmp_path)
    assert (tmp_path / "rounds.csv").exists() and (tmp_path / "clients.csv").exists()
    assert len(History.load(tmp_path)) == 0


def test_array_valued_metrics_are_saved_as_lists(tmp_path):
    import numpy as np
    from fedkit.history import History, RoundRecord
    h = History([RoundRecord(0, 0.1, {"per_class": np.array([0.5, 0.25])})])
    h.save(tmp_path)
    assert History.load(tmp_path).rounds[0].metrics["per_class"] == [0.5, 0.25]


# ---- strict JSON, and the append-only log of a run

def _strict_loads(text):
    """A JSON parser as strict as a browser's: NaN and Infinity are errors."""
    def refuse(name):
        raise ValueError(f"not strict JSON: {name}")
    return json.loads(text, parse_constant=refuse)


def test_saved_json_is_strict_and_reads_back_nan_and_infinities(tmp_path):
    from fedkit.history import dumps, loads
    h = History([RoundRecord(0, float("nan"), {"loss": float("nan"), "epsilon": float("inf"), "low": -math.inf,
                                                "per_class": np.array([0.5, np.nan]), "none": None},
                             {"site-1": {"train_loss": np.float32("nan"), "epsilon_next": math.inf}})],
                results={"stats": {"std": [1.0, float("nan")]}})
    h.save(tmp_path)
    raw = _strict_loads((tmp_path / "history.json").read_text())
    assert raw["rounds"][0]["metrics"]["loss"] is None and raw["rounds"][0]["metrics"]["epsilon"] is None
    assert raw["rounds"][0]["metrics"]["per_class"] == [0.5, None] and raw["results"]["stats"]["std"] == [1.0, None]
    back = History.load(tmp_path)
    m, row = back.rounds[0].metrics, back.rounds[0].clients["site-1"]
    assert math.isnan(m["loss"]) and m["epsilon"] == math.inf and m["low"] == -math.inf and m["none"] is None
    assert m["per_class"][0] == 0.5 and math.isnan(m["per_class"][1]) and math.isnan(back.rounds[0].seconds)
    assert math.isnan(row["train_loss"]) and row["epsilon_next"] == math.inf
    assert math.isnan(back.results["stats"]["std"][1])
    assert loads(dumps({"a/b": {"~": math.nan}}))["a/b"]["~"] != 0  # JSON-pointer escapes
    with pytest.raises(ValueError):
        json.dumps({"x": math.nan}, allow_nan=False)  # what the strict writers guard against


def test_the_log_appends_only_what_is_new(tmp_path, history):
    from fedkit.history import HistoryLog, read_log
    path = tmp_path / "history.jsonl"
    log = HistoryLog(path, history)
    first = log.state
    assert first.rounds == 3 and first.events == 1 and first.bytes == path.stat().st_size
    before = path.read_bytes()
    history.append(RoundRecord(3, 0.5, {"accuracy": math.nan}))
    history.events.append({"round": 3, "what": "stopped", "reason": "budget"})
    history.results["cross_site"] = {"accuracy": {"a": {"a": 1.0}}}
    state = log.sync()
    data = path.read_bytes()
    assert data.startswith(before) and state.bytes == len(data) and state.rounds == 4 and state.events == 2
    assert len(data.splitlines()) == len(before.splitlines()) + 3
    assert log.sync() == state  # nothing new: nothing written
    history.results["cross_site"]["accuracy"]["a"]["b"] = 0.5  # changed in place: written again
    assert log.sync().bytes > state.bytes
    for line in path.read_text().splitlines():
        _strict_loads(line)
    again = read_log(path).history
    assert again.to_dict()["events"] == history.to_dict()["events"]
    assert math.isnan(again.rounds[3].metrics["accuracy"]) and again.results == history.results
    assert [r.round for r in again] == [0, 1, 2, 3]


def test_a_log_resumed_from_a_state_is_cut_back_to_it(tmp_path, history):
    from fedkit.history import HistoryLog, read_log
    path = tmp_path / "history.jsonl"
    state = HistoryLog(path, history).state
    with open(path, "ab") as f:
        f.write(b'{"round":{"round":3,"seconds":1,"metrics":{}}}\n{"event":{"what":"to')  # after it, and torn
    resumed = read_log(path, path.read_bytes()[:state.bytes], strict_end=True).history
    log = HistoryLog(path, resumed, state)
    assert path.stat().st_size == state.bytes and log.state == state
    resumed.append(RoundRecord(3, 0.1, {"accuracy": 0.9}))
    log.sync()
    assert [r.round for r in read_log(path).history] == [0, 1, 2, 3]
    path.write_bytes(path.read_bytes().replace(b'"round":0', b'"round":9', 1))
    with pytest.raises(ValueError, match="does not begin with the"):
        HistoryLog(path, resumed, state)  # the file no longer begins as that state says


def test_load_reads_the_log_where_it_is_further_along(tmp_path, history):
    from fedkit.history import HistoryLog
    with pytest.raises(FileNotFoundError, match="no history in"):
        History.load(tmp_path)
    log = HistoryLog(tmp_path / "history.jsonl", history)
    assert History.load(tmp_path).to_dict() == history.to_dict()  # a run killed before its end has the log only
    history.save(tmp_path)
    history.append(RoundRecord(3, 0.5, {"accuracy": 1.0}))
    log.sync()  # a resumed run, still going: history.json is from an earlier end
    assert len(History.load(tmp_path)) == 4
    history.save(tmp_path)
    assert History.load(tmp_path).to_dict() == history.to_dict()
    with open(tmp_path / "history.jsonl", "ab") as f:
        f.write(b'{"round": {"rou')  # torn by a kill: a reader skips it
    assert len(History.load(tmp_path)) == 4
    (tmp_path / "history.jsonl").write_bytes(b'{"fedkit_history": 1}\nnot json\n')
    assert len(History.load(tmp_path)) == 4  # a damaged log does not hide history.json
    (tmp_path / "history.json").unlink()
    with pytest.raises(ValueError, match="line 2, is not JSON"):
        History.load(tmp_path)


@pytest.mark.parametrize("bad, message", [
    ({"rounds": {}}, "'rounds' must be a list"),
    ({"rounds": [{"round": 0, "seconds": 1.0}]}, "rounds[0] must have the keys round, seconds, metrics"),
    ({"rounds": [{"round": -1, "seconds": 1.0, "metrics": {}}]}, "rounds[0].round must be an integer >= 0"),
    ({"rounds": [{"round": 0, "seconds": "1", "metrics": {}}]}, "rounds[0].seconds must be a number"),
    ({"rounds": [{"round": 0, "seconds": 1, "metrics": {}, "clients": {"a": 1}}]}, "rounds[0].clients must map"),
    ({"events": [1]}, "'events' must be a list of objects"),
    ({"results": []}, "'results' must be an object"),
    ([], "a history is a JSON object"),
])
def test_from_dict_says_what_is_malformed(bad, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        History.from_dict(bad)
