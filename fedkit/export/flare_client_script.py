"""The client script of a FLARE job exported by fedkit (copied into the job as ``fedkit_client.py``).

FLARE runs it on every site through its Client API: receive the global model, score it on the
experiment's test split (the "global accuracy" of the round before), train it with fedkit's own local
training on this site's part of the split, and send back the weight difference with
NUM_STEPS_CURRENT_ROUND set to the weight fedkit gives the client (by default its number of training
samples, so FLARE's FedAvg weighs as fedkit's does). For cross-site evaluation it answers FLARE's
``submit_model`` with the site's local model and ``validate`` with the scores on its validation split,
as fedkit's `CrossSiteEval` asks its clients. The experiment's settings are
``fedkit_experiment.json``, next to this file. Needs fedkit and nvflare installed on the site.
"""

import json
from pathlib import Path


def main() -> None:
    import nvflare.client as flare  # optional dependency: only FLARE's clients run this script
    from nvflare.app_common.abstract.fl_model import FLModel, ParamsType
    from nvflare.app_common.app_constant import AlgorithmConstants
    from nvflare.apis.fl_constant import FLMetaKey

    from fedkit.export.flare_site import FedkitSite, log_round

    here = Path(__file__).resolve().parent
    settings = json.loads((here / "fedkit_experiment.json").read_text())
    flare.init()
    site = FedkitSite(settings, flare.get_site_name())
    while flare.is_running():
        received = flare.receive()
        if received is None:
            break
        if flare.is_train():
            rnd = received.current_round
            scores = site.evaluate(received.params)  # the global model FLARE sent: the result of the round before
            mu = (received.meta or {}).get(AlgorithmConstants.FEDPROX_MU)  # FLARE's FedProxRecipe sends it
            out = site.train(received.params, rnd, mu)
            log_round(here, {"site": site.name, "round": rnd, "global_accuracy": scores["accuracy"],
                             "global_loss": scores["loss"], "samples": out["samples"], "steps": out["steps"],
                             "weight": out["weight"], **out["metrics"]})
            flare.send(FLModel(params=out["diff"], params_type=ParamsType.DIFF, metrics=scores,
                               meta={FLMetaKey.NUM_STEPS_CURRENT_ROUND: out["weight"]}))
        elif flare.is_submit_model():  # cross-site evaluation: this site's locally trained model
            flare.send(FLModel(params=site.local_weights(received.params or {})))
        else:  # cross-site evaluation: a model scored on this site's validation split
            flare.send(FLModel(metrics=site.validate(received.params)))

if __name__ == "__main__":
    main()
