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
    train = fk.TrainConfig(dp=fk.DPSGD(noise_multiplier=1.0, max_grad_norm=1.0))
    run = digits_sim(digits, fk.FedAvg(rounds=2, he=fk.he.CKKS()), train=train).run(progress=False)
    rounds = run.history.to_dataframe()
    assert (rounds["client_epsilon"] > 0).all() and rounds["client_epsilon"].is_monotonic_increasing
    assert (rounds["bytes_cipher_up"] > 0).all()
    assert run.summary()["accuracy_on"] == "clients' validation splits" and run.summary()["final_accuracy"] > 0.3


def test_dp_fedavg_server_noise_with_he_is_refused():
    with pytest.raises(fk.ConfigError, match="cannot run DP-FedAvg's server step.*Put DP on the clients"):
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
