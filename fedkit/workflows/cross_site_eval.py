"""Cross-site evaluation: every client's local model and the global model, scored on every client's data.

NVFlare's ``CrossSiteModelEval``: the server asks each client for its local model
(``submit_model``), then sends each of those models, and the global one, to every client to score
on its validation split (``validate``). The result is a matrix, model owner by data owner. Use it
after training to see how well the global model serves each site, and how far a site's own model
carries to the others (a strong diagonal with weak off-diagonal entries is the mark of non-IID
data). Local models travel to other clients and through the server in plaintext: only use it where the
sites may see each other's models, and never in a run with HE (a `Chain` with an encrypted part refuses it).

>>> from fedkit.workflows import Chain, FedAvg
>>> wf = Chain(FedAvg(rounds=5), CrossSiteEval())                  # doctest: +SKIP
>>> cross_site_dataframe(fk.Simulator(wf, ...).run())              # doctest: +SKIP
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, ClassVar

from ..errors import ConfigError, UpdateError
from ..exchange import DXO, DataKind
from ..history import History
from ..server import Controller, ServerContext
from ..weights import check_update

GLOBAL = "global"  # the row of the server's model in the matrix
METRICS = ("accuracy", "loss")


@dataclass(frozen=True)
class CrossSiteEval(Controller):
    """Score every local model and the global model on every client's validation split.

    Stores ``history.results["cross_site"]``: ``{"accuracy": {model_owner: {data_owner: value}},
    "loss": {...}, "samples": {data_owner: n}, "trained": {model_owner: bool}}``, rows in the
    federation's order with ``"global"`` last; read it with `cross_site_dataframe`.
    ``rounds`` is 0: the workflow trains nothing, so it adds no history round (a round would only repeat
    the last global accuracy), and a `Chain` of it after FedAvg has FedAvg's rounds.
    """

    rounds: ClassVar[int] = 0
    uses_local_models: ClassVar[bool] = True  # its clients keep their last local model for submit_model
    submit_task: str = "submit_model"
    validate_task: str = "validate"

    def control_flow(self, fl: ServerContext) -> None:
        if GLOBAL in fl.client_names:
            raise ConfigError(f"a client is named {GLOBAL!r}, the name cross-site evaluation gives the global "
                              "model's row; rename that client")
        with fl.round(fl.start_round, record=False) as rnd:  # every client must answer: no retry, no deadline
            submitted = rnd.send(self.submit_task)
            models = {}
            for name in fl.client_names:  # before any validation: a client's local model must be the trained one
                result = submitted[name]
                if result.kind != DataKind.WEIGHTS:
                    raise UpdateError(f"client {name!r} answered {self.submit_task} with {result.kind.value}; "
                                      "expected WEIGHTS (its local model)")
                check_update(result.data, fl.model.weights, f"client {name!r}")
                models[name] = result.data
            models[GLOBAL] = fl.model.weights
            matrix: dict[str, Any] = {m: {} for m in METRICS}
            samples: dict[str, int] = {}
            for owner, weights in models.items():
                scores = rnd.send(self.validate_task, data=DXO(DataKind.WEIGHTS, weights))
                for m in METRICS:
                    matrix[m][owner] = {site: float(scores[site].data[m]) for site in fl.client_names}
                samples = {site: int(scores[site].meta.get("num_samples", 0)) for site in fl.client_names}
            fl.history.results["cross_site"] = {
                **matrix, "samples": samples, "seconds": time.perf_counter() - rnd.started,
                "trained": {name: bool(submitted[name].meta.get("trained", True)) for name in fl.client_names}}


def cross_site_dataframe(run: Any, metric: str = "accuracy"):
    """The cross-site ``metric`` as a DataFrame: rows = whose model, columns = whose data.

    ``run`` is a `Run` or a `History` of a run that included `CrossSiteEval`.
    """
    import pandas as pd

    history = run if isinstance(run, History) else run.history
    result = history.results.get("cross_site")
    if result is None:
        raise ConfigError("this run has no cross-site results; run CrossSiteEval, e.g. "
                          "Chain(FedAvg(rounds=5), CrossSiteEval())")
    if metric not in METRICS:
        raise ConfigError(f"cross-site metric must be one of {', '.join(METRICS)}, got {metric!r}")
    df = pd.DataFrame.from_dict(result[metric], orient="index")
    df.index.name, df.columns.name = "model", "data"
    return df
