"""DP and HE together: DP on the clients first, then encryption; what cannot combine is refused."""

import math

import pytest

import fedkit as fk
from fedkit.cli import main
from fedkit.privacy.dp import ClipUpdate


def digits_sim(digits, workflow, **options):
    return fk.Simulator(workflow, model=lambda: fk.models.for_data(digits), clients=fk.data.iid(digits.train, 3, seed=0),
                        test=digits.test, seed=0, **options)


def max_rel(a, b):
    return max(float((a[k] - b[k]).abs().max() / (b[k].abs().max() + 1e-12)) for k in b)


def test_a_noiseless_unbounded_clip_then_encryption_changes_nothing(digits):
    plain = digits_sim(digits, fk.FedAvg(rounds=2)).run(progress=False)
    both = digits_sim(digits, fk.FedAvg(rounds=2, he=fk.he.CKKS()),
                      client_result_filters=[ClipUpdate(max_norm=math.inf)]).run(progress=False)
    assert max_rel(both.weights, plain.weights) < 1e-4


def test_local_dp_noise_is_added_before_encryption(digits):
    """With local noise the encrypted run differs from the plain one by the noise, not by encryption."""
    noisy_plain = digits_sim(digits, fk.FedAvg(rounds=2),
                             client_result_filters=[ClipUpdate(max_norm=5.0, noise_multiplier=0.05)]).run(progress=False)
    noisy_he = digits_sim(digits, fk.FedAvg(rounds=2, he=fk.he.CKKS()),
                          client_result_filters=[ClipUpdate(max_norm=5.0, noise_multiplier=0.05)]).run(progress=False)
    clean = digits_sim(digits, fk.FedAvg(rounds=2)).run(progress=False)
    assert max_rel(noisy_he.weights, noisy_plain.weights) < 1e-4  # same seeded noise, then encrypted
    assert max_rel(noisy_plain.weights, clean.weights) > 1e-3  # and the noise is really there


def test_dp_sgd_with_he_reports_epsilon_and_encrypts(digits):
    dp = fk.DPSGD(noise_multiplier=1.0, max_grad_norm=1.0)
    run = digits_sim(digits, fk.FedAvg(rounds=2, he=fk.he.CKKS(), extensions=(dp,))).run(progress=False)
    rounds = run.history.to_dataframe()
    assert (rounds["client_epsilon"] > 0).all() and rounds["client_epsilon"].is_monotonic_increasing
    assert (rounds["bytes_cipher_up"] > 0).all()
    assert run.summary()["accuracy_on"] == "clients' validation splits" and run.summary()["final_accuracy"] > 0.3


def test_dp_fedavg_server_noise_with_he_is_refused():
    with pytest.raises(fk.ConfigError, match="cannot run UserDP: it clips each client's update and adds noise to their sum in plaintext.*put DP on the clients"):
        fk.DPFedAvg(rounds=2, he=fk.he.CKKS())


def test_cli_he_and_dp_sgd_together(tmp_path, capsys):
    import json
    assert main(["run", "--he", "--dp-sgd", "--noise-multiplier", "1.0", "--clients", "3", "--rounds", "2", "--json",
                 "--no-progress", "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["client_epsilon"] > 0 and summary["accuracy_on"] == "clients' validation splits"
    with pytest.raises(SystemExit) as e:
        main(["run", "--he", "--dp-fedavg", "--rounds", "1", "--no-progress", "--out", str(tmp_path / "x")])
    assert e.value.code == 2


def test_cli_he_with_cyclic_runs_encrypted_not_plaintext(tmp_path, capsys):
    """Regression: `fedkit run --he --algorithm cyclic` exited 0 and trained in plaintext, scored by the server."""
    import json
    assert main(["run", "--he", "--algorithm", "cyclic", "--clients", "3", "--rounds", "2", "--json", "--no-progress",
                 "--out", str(tmp_path)]) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["accuracy_on"] == "clients' validation splits"  # the server could not read the model
    history = fk.History.load(tmp_path)
    assert all(r.metrics["bytes_cipher_up"] > 0 and "accuracy" not in r.metrics for r in history)
    assert history.results["he"]["scheme"] == "CKKS"


@pytest.mark.parametrize("argv, match", [
    (["--he", "--algorithm", "fedopt"], "cannot use the server optimizer"),
    (["--he", "--algorithm", "scaffold"], "cannot run Scaffold"),
    (["--he", "--aggregate", "krum"], "cannot use the aggregation rule 'krum(f=1)'"),
])
def test_cli_refuses_what_it_cannot_run_encrypted(tmp_path, capsys, argv, match):
    with pytest.raises(SystemExit) as e:
        main(["run", *argv, "--rounds", "1", "--no-progress", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and match in capsys.readouterr().err and not (tmp_path / "x").exists()
