"""The model_sha256 of each built-in workflow for one fixed seed: a refactor that changes no number leaves them equal.

Digits, 4 Dirichlet (alpha 0.5) clients, seed 0, one torch thread. Run it before and after a change and diff:

    python benchmarks/model_hashes.py > before.txt   # on the old commit
    python benchmarks/model_hashes.py | diff before.txt -
"""

from __future__ import annotations

import warnings

import torch

import fedkit as fk


def workflows() -> dict[str, fk.Controller]:
    return {
        "FedAvg": fk.FedAvg(rounds=3),
        "FedProx": fk.FedProx(rounds=3, mu=0.1),
        "SCAFFOLD": fk.SCAFFOLD(rounds=3),
        "FedOpt": fk.FedOpt(rounds=3, server_opt=fk.server_opt.Adam(lr=0.01)),
        "Cyclic": fk.workflows.Cyclic(rounds=2),
        "DP-SGD": fk.FedAvg(rounds=2, extensions=(fk.DPSGD(noise_multiplier=1.0, max_grad_norm=1.0, delta=1e-4),)),
        "DP-FedAvg": fk.DPFedAvg(rounds=3, clip=1.0, noise_multiplier=1.0, sample_rate=1.0, delta=0.01),
    }


def main() -> None:
    torch.set_num_threads(1)  # the threads are part of the result (summation order)
    data = fk.data.load("digits")
    parts = fk.data.dirichlet(data.train, clients=4, alpha=0.5, seed=0)
    for name, workflow in workflows().items():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # DP's notes on its budget: not what this script compares
            run = fk.Simulator(workflow, model=lambda: fk.models.for_data(data), clients=parts, test=data.test,
                               train=fk.TrainConfig(lr=0.05), seed=0).run(progress=False)
        print(f"{name:10s} {run.model_sha256}", flush=True)


if __name__ == "__main__":
    main()
