"""Scatter and gather: send the global model to the sampled clients, aggregate what they send back.

FedAvg (McMahan et al. 2017, "Communication-Efficient Learning of Deep Networks from Decentralized
Data") is this loop with the weighted mean of the clients' weight differences, each client weighed
by its number of training samples. Use it as the baseline for every other algorithm.

Faults are expected: a round goes ahead with the valid results that arrived, if there are at least
``min_clients`` of them; replies that failed, came late, or do not fit the global model are
screened out with their reason in the history; a round that falls short is retried with the clients
that failed (the valid results stay), and after ``max_retries`` the run stops with `RoundFailed`, leaving
the global model as the last good round made it. A round that clients refuse (a spent privacy budget)
ends the run cleanly, with a ``stopped`` event.

FedOpt (Reddi et al. 2021, "Adaptive Federated Optimization") is the same loop with a server
optimizer (`fedkit.server_opt`) applied to the aggregated difference; `FedOpt(...)` is a `FedAvg`
with ``server_opt`` set. Use it when FedAvg's progress stalls on non-IID clients. FedProx and
SCAFFOLD are `FedAvg` with an extension (`fedkit.workflows.extensions`), and so are DP-SGD and
DP-FedAvg (`fedkit.privacy.dp_sgd`, `fedkit.privacy.dp_fedavg`); a privacy budget can end a run early.

The loop never touches tensors itself: it asks the global model (``fl.model``) for the task data,
to screen the replies and to apply the round. With ``he=CKKS()`` the simulator gives the server an
encrypted model and the same loop aggregates ciphertexts; what cannot work on ciphertexts (a server
optimizer, a rule other than the weighted mean, SCAFFOLD, DP-FedAvg's server step) is refused when
the workflow is built, with the reason.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Sequence

import torch

from ..aggregate import Rule, by_samples, rule_name, weighted_mean
from ..errors import NO_VALUE, ConfigError
from ..exchange import DXO, MetaKey, Weights
from ..global_model import HE_RULE, Encryption, Step, aggregate
from ..rounds import check_settings
from ..server import Controller, ServerContext
from ..server_opt import SGD, ServerOptimizer
from ..train import has_client_half
from ..weights import add, check_update
from .extensions import Extension, Proximal, Scaffold, bind_all


@dataclass(frozen=True)
class FedAvg(Controller):
    """Federated averaging over ``rounds`` rounds.

    ``aggregate`` is any rule ``[(update, weight), ...] -> update`` (see `fedkit.aggregate`; a rule
    with settings goes in as ``functools.partial(trimmed_mean, beta=0.2)`` or a lambda);
    ``weigh`` turns a client's result into its aggregation weight (`by_samples` by default,
    `by_steps` as NVFlare offers, or `uniform`); ``server_opt`` (see `fedkit.server_opt`) moves the
    global model along the aggregate, None adds it as it is. ``he`` (`fedkit.privacy.he.CKKS`)
    encrypts the updates and the global model: the server aggregates ciphertexts it cannot read.

    >>> FedAvg(rounds=5, clients_per_round=4, min_clients=3).rounds
    5
    """

    rounds: int = 10
    clients_per_round: int | None = None  # None: every client, every round
    sample_rate: float | None = None  # Poisson sampling: each client joins a round with this probability (DP-FedAvg)
    min_clients: int | None = None  # valid results a round needs; None: every sampled client (0 only with sample_rate)
    max_retries: int = 2  # a round short of min_clients is tried again this often before the run stops
    task_timeout: float | None = None  # seconds a client may take; a later answer is dropped as 'late'
    max_norm_ratio: float | None = 10.0  # reject updates this many times larger than is typical (round's median, recent
    # ones) both whole and per local step: a client with more data takes more steps (global_model.step_norms)
    aggregate: Rule = weighted_mean
    weigh: Callable[[DXO], float] = by_samples
    extensions: tuple[Extension, ...] = ()  # e.g. Proximal(mu) for FedProx, Scaffold() for SCAFFOLD
    server_opt: ServerOptimizer | None = None  # None: plain FedAvg, global + aggregate
    task_name: str = "train"
    he: Encryption | None = None  # homomorphic encryption (fedkit.privacy.he.CKKS): the server sums ciphertexts; None: plaintext

    def __post_init__(self) -> None:
        if isinstance(self.rounds, bool) or not isinstance(self.rounds, int) or self.rounds < 1:
            raise ConfigError("{rounds} must be an integer >= 1", obj=self, field="rounds", value=self.rounds)
        check_settings(self)  # min_clients, max_retries, task_timeout, max_norm_ratio, the sampling
        if not callable(self.aggregate):
            raise ConfigError(f"{type(self).__name__}.aggregate must be a rule [(update, weight), ...] -> update such as "
                              f"fedkit.aggregate.weighted_mean, got {self.aggregate!r}")
        if not callable(self.weigh):
            raise ConfigError(f"{type(self).__name__}.weigh must be a function of a result such as "
                              f"fedkit.aggregate.by_samples, got {self.weigh!r}")
        if self.server_opt is not None and not isinstance(self.server_opt, ServerOptimizer):
            raise ConfigError(f"FedAvg.server_opt must be a server optimizer (with init and step) such as "
                              f"fedkit.server_opt.SGD(momentum=0.6), or None for plain FedAvg; got {self.server_opt!r}")
        if not isinstance(self.extensions, tuple) or not all(isinstance(e, Extension) for e in self.extensions):
            raise ConfigError(f"extensions must be a tuple of fedkit.workflows.Extension objects such as "
                              f"(Proximal(0.01),), got {self.extensions!r}")
        object.__setattr__(self, "extensions", bind_all(self.extensions, self))
        if self.he is not None:
            self._check_encryptable()

    def _check_encryptable(self) -> None:
        """Refuse, saying why, whatever needs to read the model or the updates on the server."""
        if not isinstance(self.he, Encryption):
            raise ConfigError(f"{type(self).__name__}.he must be fedkit.he.CKKS(...) or None, got {self.he!r}")
        if self.server_opt is not None:
            raise ConfigError("{he} cannot use the server optimizer {value}: it keeps moments of the "
                              "aggregated update and scales them element by element, which needs the update in "
                              "plaintext, and with HE the server only ever holds ciphertexts", obj=self,
                              field="server_opt", value=self.server_opt,
                              hint="use FedAvg or FedProx with HE, or drop {he} to use FedOpt")
        if self.aggregate is not weighted_mean:
            raise ConfigError(f"{{he}} cannot use the aggregation rule {rule_name(self.aggregate)!r} ({{aggregate=}}): "
                              f"{HE_RULE}", obj=self, field="aggregate",
                              hint="use the default {aggregate=weighted_mean} with HE, or drop {he}")
        for ext in self.extensions:
            why = ext.needs_plaintext or (ext.changes_aggregate and
                                          "it changes the aggregate in on_aggregate, which the server cannot read")
            if why:
                raise ConfigError(f"{{he}} cannot run {type(ext).__name__}: {why}", obj=self, field="extensions",
                                  hint="use FedAvg or FedProx with HE (DP-SGD runs on the clients, before encryption), "
                                  "or drop {he}")

    def check_model(self, model: torch.nn.Module) -> None:
        for ext in self.extensions:
            ext.check_model(model)

    def check_population(self, examples: Mapping[str, int]) -> None:
        for ext in self.extensions:
            ext.check_population(examples)

    def check_federation(self, clients: Sequence[str]) -> None:
        """Refuse, before the first round, what these ``clients`` cannot meet: more clients per round, or more
        valid results a round needs, than there are, and a rule of `fedkit.aggregate` whose settings cannot
        work with the updates a round gives (Krum's f, the trimmed fraction), found by a dry run on that many
        one-number updates."""
        n, k, m = len(clients), self.clients_per_round, self.min_clients
        if k is not None and k > n:
            raise ConfigError(f"{{clients_per_round=}} but the federation has only {n} clients", obj=self,
                              field="clients_per_round", hint="lower {clients_per_round} (None: every client, every round)")
        if m is not None and m > n:
            raise ConfigError(f"{{min_clients=}} but the federation has only {n} clients",
                              obj=self, field="min_clients", hint="lower {min_clients}")
        rule = self.aggregate
        while isinstance(rule, functools.partial):
            rule = rule.func
        if self.sample_rate is not None or getattr(rule, "__module__", None) != "fedkit.aggregate":
            return  # a round's size varies (Poisson sampling), or a rule of the user's own: the round will tell
        size = n if k is None else k
        try:
            self.aggregate([({"w": torch.tensor([float(i)])}, 1.0) for i in range(size)])
        except ConfigError as e:
            who = "every client" if k is None else "{clients_per_round=}"
            got = "" if e.value is NO_VALUE else f", got {e.value!r}"
            raise ConfigError(f"{{aggregate=}} cannot aggregate the {size} updates of a round ({who}): {e.template}{got}",
                              obj=self, field="aggregate", hint=e.hint) from None

    def control_flow(self, fl: ServerContext) -> None:
        self.check_context(fl)
        for r in range(fl.start_round, self.rounds):
            for ext in self.extensions:  # e.g. a spent privacy budget: the last completed round stays the result
                if (reason := ext.before_round(fl, r)) is not None:
                    fl.stop(reason)
            with fl.round(r) as rnd:  # sampling, retries, min_clients, the screens: this workflow's settings
                results = rnd.train(self.targets(fl, r), meta=self.task_meta(fl))
                fl.model.update(results, rule=self.aggregate, weigh=self.weigh, step=self.server_step(fl, r))
                for ext in self.extensions:
                    ext.after_aggregate(fl, results)
                for ext in self.extensions:
                    rnd.metrics.update(ext.round_metrics(fl, results))

    def check_context(self, fl: ServerContext) -> None:
        """Refuse a run this workflow cannot drive: more min_clients than clients, or a model whose encryption is
        not the workflow's own (a controller running it must declare the same ``he``)."""
        if self.min_clients is not None and self.min_clients > len(fl.client_names):
            raise ConfigError(f"min_clients={self.min_clients} but the federation has only {len(fl.client_names)} clients")
        if fl.model.encryption != self.he:
            raise ConfigError(f"{type(self).__name__} has he={self.he!r} but the server's model has encryption "
                              f"{fl.model.encryption!r}: the run was not provisioned for it. A controller that runs "
                              "another one must declare the same he (e.g. `he = inner.he`)")

    def targets(self, fl: ServerContext, round: int) -> list[str]:
        """The clients of ``round``: Poisson-sampled with ``sample_rate``, else ``clients_per_round`` of them."""
        return fl.sample(self.clients_per_round, rate=self.sample_rate)

    def task_meta(self, fl: ServerContext) -> dict[str, Any]:
        """The training task's meta: the extensions' entries and their client halves (`fedkit.train.TrainHook`)."""
        meta = {k: v for ext in self.extensions for k, v in ext.task_meta(fl).items()}
        hooks = tuple(ext for ext in self.extensions if has_client_half(ext))
        if hooks:
            meta[MetaKey.HOOKS] = hooks
        return meta

    def server_step(self, fl: ServerContext, round: int) -> Step | None:
        """The round's server step when this workflow does more than add the rule's aggregate (a server optimizer,
        an extension's ``on_aggregate``): `step`; else None, and the model applies the rule itself, in whatever
        form it holds the weights (plaintext, or ciphertext for the weighted mean)."""
        if self.server_opt is None and not any(ext.changes_aggregate for ext in self.extensions):
            return None
        return lambda weights, results: self.step(weights, results, fl.server.state, round=round, fl=fl)

    def step(self, weights: Weights, results: dict[str, DXO], state: dict[str, Any], *, round: int,
             fl: ServerContext) -> Weights:
        """One server update: aggregate the screened WEIGHT_DIFFs and apply the result to ``weights``.

        ``state`` is the run's state (``fl.server.state``, checkpointed); the server optimizer keeps
        its own under ``"server_opt"``, made by ``server_opt.init`` on the first step. Each extension's
        ``on_aggregate`` may then change the aggregate (DP-FedAvg's noise on the sum). A round without
        results (Poisson sampling drew nobody) aggregates to zero.
        """
        if results:
            diff = aggregate(results, self.aggregate, self.weigh, weights)
        else:
            diff = {k: torch.zeros_like(v) for k, v in weights.items()}
        for ext in self.extensions:
            diff = ext.on_aggregate(fl, round, results, diff)
            check_update(diff, weights, f"extension {type(ext).__name__}")
        if self.server_opt is None:
            return add(weights, diff)
        if "server_opt" not in state:
            state["server_opt"] = self.server_opt.init(weights)
        new, state["server_opt"] = self.server_opt.step(weights, diff, state["server_opt"], round)
        check_update(new, weights, f"server optimizer {self.server_opt!r}")
        return new


def FedProx(rounds: int = 10, mu: float = 0.01, **options) -> FedAvg:
    """FedAvg whose clients add the proximal term mu/2 * ||w - w_global||^2 (Li et al. 2020).

    >>> FedProx(rounds=3, mu=0.1).extensions
    (Proximal(mu=0.1),)
    """
    return FedAvg(rounds=rounds, **{**options, "extensions": (Proximal(mu), *options.get("extensions", ()))})


def SCAFFOLD(rounds: int = 10, **options) -> FedAvg:
    """FedAvg with SCAFFOLD's control variates on both sides (Karimireddy et al. 2020).

    Use it on strongly non-IID data with several local steps, where FedAvg's clients drift apart.
    """
    return FedAvg(rounds=rounds, **{**options, "extensions": (Scaffold(), *options.get("extensions", ()))})


def FedOpt(rounds: int = 10, server_opt: ServerOptimizer = SGD(lr=1.0, momentum=0.6), **settings: Any) -> FedAvg:
    """FedAvg whose server moves the global model with ``server_opt`` (default: NVFlare's FedOpt, FedAvgM).

    Reddi et al. 2021, "Adaptive Federated Optimization". ``settings`` are the other `FedAvg`
    fields (``clients_per_round``, ``aggregate``, ``weigh``, ...).

    >>> from fedkit.server_opt import Yogi
    >>> FedOpt(rounds=20, server_opt=Yogi(lr=0.03)).server_opt
    Yogi(lr=0.03, beta1=0.9, beta2=0.99, tau=0.001, lr_schedule=None)
    """
    if server_opt is None:
        raise ConfigError("FedOpt needs a server optimizer such as fedkit.server_opt.Adam(); "
                          "for none, use FedAvg")
    return FedAvg(rounds=rounds, server_opt=server_opt, **settings)
