"""How precise is an encrypted FedAvg round, layer by layer, when layers differ in size by many orders?

CKKS's error in a number is an absolute one (about 1e-9 at the default scale 2^40) plus a part
proportional to the largest value in the same ciphertext (about 4e-16 of it). This prints, for every
layer, the error of the decrypted global model after one encrypted round against the plaintext
weighted mean of the very same updates, relative to the layer's own largest value, in two cases:

  1. the digits MLP, 4 clients, one round at lr=50 (weights grow to ~1e7; the issue's case), the
     clients' updates kept in plaintext just before they are encrypted;
  2. two layers, values ~1e10 beside values ~1e-2, 3 clients answering fixed updates of those sizes.

    python benchmarks/he_precision.py
"""

from __future__ import annotations

import torch
from torch import nn

import fedkit as fk
from fedkit.privacy.he import CKKS

Updates = dict[str, tuple[dict[str, torch.Tensor], float]]


def kept_updates(store: Updates):
    """A client result filter that keeps each client's plaintext update (client filters run before encryption)."""
    def keep(dxo, ctx):
        if dxo.kind == fk.DataKind.WEIGHT_DIFF:
            store[ctx.client] = ({k: v.clone().double() for k, v in dxo.data.items()},
                                 float(dxo.meta[fk.MetaKey.NUM_SAMPLES]))
        return dxo
    return keep


def report(title: str, sim: fk.Simulator, updates: Updates) -> None:
    start = {k: v.double() for k, v in sim.initial_weights().items()}
    run = sim.run(progress=False)
    total = sum(w for _, w in updates.values())
    expected = {k: start[k] + sum(d[k] * (w / total) for d, w in updates.values()) for k in start}
    print(f"\n{title}; error relative to each layer's own max |value|")
    print(f"{'layer':<12} {'max |value|':>12} {'max |error|':>12} {'relative':>10}")
    for k, want in expected.items():
        err = float((run.weights[k].double() - want).abs().max())
        top = float(want.abs().max())
        print(f"{k:<12} {top:>12.4g} {err:>12.3g} {err / top:>10.2e}")


class TwoScales(nn.Module):
    """Two layers of very different sizes: ~1e10 and ~1e-2."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.huge = nn.Parameter(torch.randn(4000, generator=g, dtype=torch.float64) * 1e10)
        self.small = nn.Parameter(torch.randn(10, generator=g, dtype=torch.float64) * 1e-2)


def fixed_update(seed: int, samples: int):
    def execute(task, ctx, abort):
        g = torch.Generator().manual_seed(seed)
        diff = {"huge": torch.randn(4000, generator=g, dtype=torch.float64) * 1e10,
                "small": torch.randn(10, generator=g, dtype=torch.float64) * 1e-2}
        return fk.DXO(fk.DataKind.WEIGHT_DIFF, diff, {fk.MetaKey.NUM_SAMPLES: samples})
    return execute


def main() -> None:
    torch.set_num_threads(1)
    data = fk.data.load("digits")
    updates: Updates = {}
    sim = fk.Simulator(fk.FedAvg(rounds=1, he=CKKS()), model=lambda: fk.models.for_data(data),
                       clients=fk.data.iid(data.train, clients=4, seed=0), train=fk.TrainConfig(lr=50.0, validate=False),
                       seed=0, device="cpu", client_result_filters=[kept_updates(updates)])
    report("1. one HE FedAvg round on digits, MLP, 4 clients, lr=50", sim, updates)

    updates = {}
    d = fk.Dataset(torch.zeros(2, 1), torch.zeros(2, dtype=torch.long), 2)
    clients = [fk.Client(f"c{i}", fk.ClientData(d, d), {"train": fixed_update(i, n)}, result_filters=[kept_updates(updates)])
               for i, n in enumerate((10, 30, 60))]
    sim = fk.Simulator(fk.FedAvg(rounds=1, he=CKKS(), max_norm_ratio=None), model=TwoScales, clients=clients, seed=0,
                       device="cpu")
    report("2. one HE FedAvg round, a layer of values ~1e10 beside one of ~1e-2, 3 clients", sim, updates)


if __name__ == "__main__":
    main()
