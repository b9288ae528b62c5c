"""Torch CPU threads of a run: chosen deliberately ("auto": one for a small model), applied around the run and
restored after, recorded in config.json / the summary / the fingerprint, and results deterministic for a setting."""

import json

import pytest
import torch

import fedkit as fk
from fedkit.cli import main
from fedkit.simulator import AUTO_ONE_THREAD_BELOW, torch_threads


def sim(digits, tmp_path=None, rounds=2, **kw):
    parts = fk.data.iid(digits.train, clients=3, seed=0)
    return fk.Simulator(fk.FedAvg(rounds=rounds), model=lambda: fk.models.for_data(digits), clients=parts,
                        test=digits.test, out=tmp_path, **kw)


def test_auto_is_one_thread_for_a_small_model_on_the_cpu(digits):
    s = sim(digits)
    assert sum(p.numel() for p in s.model_fn().parameters()) < AUTO_ONE_THREAD_BELOW
    assert s.threads == 1 and s.describe()["threads"] == 1


def test_auto_keeps_torchs_setting_for_a_large_model():
    x = torch.zeros(4, 1000)
    data = fk.Dataset(x, torch.zeros(4, dtype=torch.long), 2)
    big = fk.Simulator(fk.FedAvg(rounds=1), model=lambda: torch.nn.Linear(1000, 1001), clients=[data])
    assert big.threads == torch.get_num_threads()


def test_the_run_uses_its_threads_and_restores_the_previous_value(digits):
    before = torch.get_num_threads()
    seen = []
    s = sim(digits, threads=2, on_round=[lambda record: seen.append(torch.get_num_threads())])
    run = s.run(progress=False)
    assert seen == [2, 2] and torch.get_num_threads() == before
    assert run.summary()["threads"] == 2
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == before


def test_restored_after_an_interrupt_too(digits):
    before = torch.get_num_threads()

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim(digits, threads=before + 1, on_round=[stop]).run(progress=False)
    assert torch.get_num_threads() == before


@pytest.mark.parametrize("bad", [0, -1, 1.5, "two", True, None])
def test_bad_thread_settings_are_refused(digits, bad):
    with pytest.raises(fk.ConfigError, match="threads must be 'auto' or a whole number >= 1"):
        sim(digits, threads=bad)
    with pytest.raises(fk.ConfigError, match="Experiment.threads"):
        fk.Experiment(threads=bad)


def test_deterministic_for_a_setting_and_recorded_in_the_fingerprint(digits, tmp_path):
    a = sim(digits, threads=1).run(progress=False)
    b = sim(digits, threads=1).run(progress=False)
    assert a.model_sha256 == b.model_sha256
    assert sim(digits, threads=1).fingerprint() != sim(digits, threads=2).fingerprint()

    def stop(record):
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        sim(digits, tmp_path / "r", rounds=3, threads=1, on_round=[stop]).run(progress=False)
    assert json.loads((tmp_path / "r" / "config.json").read_text())["threads"] == 1
    with pytest.raises(fk.CheckpointError, match="these differ: threads 1 then, 2 now"):  # another thread count
        sim(digits, tmp_path / "r", rounds=3, threads=2).resume(progress=False)
    assert sim(digits, tmp_path / "r", rounds=3, threads=1).resume(progress=False).status == "done"


def test_cli_threads_flag(tmp_path, capsys):
    argv = ["--clients", "3", "--rounds", "1", "--json", "--no-progress"]
    assert main(["run", *argv, "--threads", "2", "--out", str(tmp_path / "two")]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["threads"] == 2 and json.loads((tmp_path / "two" / "config.json").read_text())["threads"] == 2
    assert main(["run", *argv, "--out", str(tmp_path / "auto")]) == 0  # auto: the digits MLP gets one thread
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["threads"] == 1
    with pytest.raises(SystemExit) as e:
        main(["run", "--threads", "0"])
    assert e.value.code == 2 and "--threads" in capsys.readouterr().err
