"""Differential privacy with Opacus: the names a notebook uses, from the files that hold them.

Two guarantees answer two questions; each run reports the epsilon it has spent after every round.

* **Example-level DP** (`DPSGD`, in `fedkit.privacy.dp_sgd`): what a client sends changes little with
  any one of its training examples. ``FedAvg(extensions=(DPSGD(noise_multiplier=1.0),))``; each
  client's ``epsilon`` is in its history rows, the worst client's in the round's ``client_epsilon``.
* **User-level DP** (`DPFedAvg` / `UserDP`, in `fedkit.privacy.dp_fedavg`): the global model changes
  little with any one client's whole data. ``DPFedAvg(rounds, clip, noise_multiplier, sample_rate)``;
  the round's ``epsilon``.

Use DP-SGD when single records (patients, images) are what must stay hidden and clients are few;
use DP-FedAvg when whole clients (users, devices) must, which needs many clients for useful accuracy.

Accounting is Opacus' (`fedkit.privacy.accounting`): RDP (``"rdp"``, the default) or PRV (``"prv"``).
**Budget**: with ``target_epsilon`` a run never exceeds it. Without a noise multiplier the noise is
chosen so that the planned rounds end at the target; with one, the run stops before the round that
would cross the target (a ``"stopped"`` event, the reason in ``run.summary()["stopped"]``, status
``"done"``), and the last completed round is checkpointed.

Every random number is seeded from (run seed, round, client) or from the accountant's step count, so
a private run repeats exactly and a resumed one ends with the same weights and the same epsilon.
Opacus' ``secure_mode`` (noise hardened against floating-point attacks) is off, as in Opacus by default.

>>> wf = DPFedAvg(rounds=20, clip=1.0, noise_multiplier=1.0, sample_rate=0.1)
>>> round(epsilon([[1.0, 0.1, 20]], delta=1e-5), 2) == round(epsilon(account([], 1.0, 0.1, 20), 1e-5), 2)
True
"""

from .accounting import MECHANISMS, account, epsilon, noise_multiplier_for, opacus_accountant
from .clipping import AdaptiveClip, ClipUpdate, add_noise, adapt_clip, clip_update, noisy_mean, split_noise
from .dp_fedavg import DPFedAvg, UserDP
from .dp_sgd import DPSGD, BudgetExhausted, check_model

__all__ = ["MECHANISMS", "account", "epsilon", "noise_multiplier_for", "opacus_accountant", "AdaptiveClip",
           "ClipUpdate", "add_noise", "adapt_clip", "clip_update", "noisy_mean", "split_noise", "DPFedAvg", "UserDP",
           "DPSGD", "BudgetExhausted", "check_model"]
