"""History: records per round and client, their tables, and saving/loading a run's history."""

from __future__ import annotations

import json
import math

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
    assert df["round"].tolist() == [0, 1, 2]
    assert df["seconds"].tolist() == [1.5, 1.25, 1.0]
    assert df["accuracy"].tolist() == [0.5, 0.75, 0.875]
    assert df["loss"].isna().tolist() == [False, True, False]


def test_client_dataframe(history):
    df = history.client_dataframe()
    assert len(df) == 5
    assert df[["round", "client"]].values.tolist() == [
        [0, "site-1"], [0, "site-2"], [1, "site-1"], [2, "site-2"], [2, "site-1"]]
    assert df["train_loss"].tolist() == [2.2, 1.8, 1.1, 0.4, 0.6]
    assert df.groupby("client")["samples"].sum().to_dict() == {"site-1": 30, "site-2": 60}
    assert History().client_dataframe().empty


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
    assert rounds["round"].tolist() == [0, 1, 2] and rounds["accuracy"].tolist() == [0.5, 0.75, 0.875]
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
