"""The simulator's refusals: settings that cannot run are refused when the simulator is built (the model, its
data, the workflow's rounds), and a checkpoint written under other settings when a run resumes (saying what differs).
"""

from __future__ import annotations

import copy
import inspect
import json
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from .artifacts import strict_json
from .client import Client
from .data import ClientData, Dataset, check_dataset
from .errors import ConfigError, ConfigWarning
from .server import Controller
from .train import ModelFn

RESUMABLE = ("engine",)
"""Settings in config.json that a resume may change (with a warning): not in the fingerprint. The engine changes how
a round's work runs, not what it computes (engines agree to float rounding), and a run may continue on a machine
without the engine it began with (Ray, a GPU)."""


def as_model_fn(model: ModelFn | nn.Module) -> ModelFn:
    if isinstance(model, nn.Module):
        template = copy.deepcopy(model)
        return lambda: copy.deepcopy(template)
    if not callable(model) or isinstance(model, type) and not issubclass(model, nn.Module):
        raise ConfigError(f"model must be an nn.Module or a function that builds one, got {type(model).__name__}")
    try:
        inspect.signature(model).bind()
    except TypeError:
        raise ConfigError(f"model must be a function of no arguments that builds an nn.Module (e.g. lambda: "
                          f"fk.models.MLP(64, 10)); {getattr(model, '__name__', model)!r} needs arguments") from None
    except ValueError:  # a builtin without a signature: calling it tells
        pass
    return model


def build_model(model_fn: ModelFn) -> nn.Module:
    """One model from ``model_fn``, refused unless it is an nn.Module with parameters to train."""
    try:
        model = model_fn()
    except Exception as e:
        raise ConfigError(f"building the model failed: model() raised {type(e).__name__}: {e}") from e
    if not isinstance(model, nn.Module):
        raise ConfigError(f"model must build an nn.Module, but model() returned {model!r:.80} (of type {type(model).__name__})")
    if next(model.parameters(), None) is None:
        raise ConfigError(f"model() built a {type(model).__name__} without parameters: there is nothing to train or "
                          "average; give a model with at least one parameter")
    return model


def check_new_each_call(model_fn: ModelFn, probe: nn.Module) -> None:
    """Refuse a builder that hands out one instance every time: clients would train, and the server score, one
    shared model, so runs would differ and a resume be refused for a model that changed under it."""
    if model_fn() is probe:
        raise ConfigError(f"model() returned the same {type(probe).__name__} instance twice; return a new model each "
                          "call, e.g. lambda: Net() (or pass the instance itself, model=net, which is copied)")


def check_rounds(workflow: Controller) -> None:
    """Refuse a workflow whose ``rounds`` is not a whole number: the rounds it plans, >= 1 (0 for a workflow that
    records no round, such as FedStats); a workflow without ``rounds`` plans no count."""
    rounds = getattr(workflow, "rounds", None)
    if rounds is not None and (isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 0):
        raise ConfigError("{rounds} must be a whole number >= 1 (the rounds it runs; 0 for one that records none)",
                          obj=workflow, field="rounds", value=rounds)


def check_client_data(name: str, data: ClientData, val_fraction: float | None = None) -> None:
    """Refuse, naming client ``name``, an empty training split and labels or features a model cannot learn from
    (`fedkit.data.check_dataset`); ``val_fraction``: the split the simulator made, named in the hint."""
    for part, d in (("training", data.train), ("validation", data.val)):
        if isinstance(d, Dataset):
            check_dataset(d, f"{name}'s {part} split")
    if isinstance(data.train, Dataset) and len(data.train) == 0:
        held = len(data.val) if isinstance(data.val, Dataset) else 0
        why = (f"val_fraction={val_fraction:g} holds out all {held} of its samples for validation; lower val_fraction "
               "or give it more data" if val_fraction is not None else
               "its ClientData has an empty train set; give it training samples or leave it out of the federation")
        raise ConfigError(f"{name} has no training samples, so it would take part in every round with 0 samples: {why}")


def check_fits(model: nn.Module, test: Dataset, clients: Sequence[Client]) -> None:
    """Run ``model`` once on one client example and one test example; refuse a test set it cannot score.

    Done when the simulator is built, so a test set of the wrong shape fails now, not after a round of training.
    """
    data = [getattr(getattr(c, "data", None), "train", None) for c in clients]
    client = next((d for d in data if isinstance(d, Dataset) and len(d) > 0), None)
    shape_of = lambda d: tuple(d.x.shape[1:])  # noqa: E731
    shapes = f"test examples have shape {shape_of(test)}" + (f", the clients' {shape_of(client)}" if client else "")
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        for what, d in (("a client's", client), ("the test set's", test)):
            if d is None or len(d) == 0:
                continue
            try:
                with torch.no_grad():
                    out = model(d.x[:1].to(device))
            except Exception as e:
                raise ConfigError(f"the model cannot take {what} examples ({shapes}): on one example it raised "
                                  f"{type(e).__name__}: {e}") from None
            if d is test:
                top = int(test.y.max()) if len(test) else -1
                if not (isinstance(out, torch.Tensor) and out.ndim == 2 and out.shape[0] == 1 and out.shape[1] > top):
                    got = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
                    raise ConfigError(f"the model cannot score the test set ({shapes}): on one test example it gives "
                                      f"{got}, but scoring needs one score per class, shape (1, >= {top + 1}) for the "
                                      f"test labels 0..{top}")
    finally:
        model.train(was_training)


def differing(saved: Path, sim: Any) -> str:
    """Which of the settings in ``saved`` (a run's config.json) ``sim`` does not share, in words."""
    try:
        before = json.loads(saved.read_text())
        now = json.loads(strict_json(sim.describe()))
        keys = [k for k in sorted(set(before) | set(now)) if k not in RESUMABLE and before.get(k) != now.get(k)]
    except (OSError, ValueError, AttributeError):
        keys = []
    if not keys:
        return "workflow, training, data split, model, seed or threads differ"
    return "these differ: " + ", ".join(_one_difference(k, before, now) for k in keys)


def _one_difference(key: str, before: dict[str, Any], now: dict[str, Any]) -> str:
    """A setting of config.json that differs, in words: its name, and for threads and the model, how."""
    if key == "threads":
        return f"threads {before.get('threads')} then, {now.get('threads')} now"
    if key == "model":
        return f"the model ({_model_difference(before.get('model'), now['model'])})"
    return key


def _model_difference(then: Any, now: dict[str, Any]) -> str:
    """How the `fedkit.models.architecture` of a run's model (``then``, from its config.json) differs from ``now``."""
    if not isinstance(then, dict) or not isinstance(then.get("forward"), dict):
        return "not recorded by the fedkit that started the run, so this version cannot tell it is the same"
    a, b = str(then.get("modules")).splitlines(), now["modules"].splitlines()
    if a != b:  # the first line that differs (a layer, its size, an activation module)
        i = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
        first = [repr(lines[i].strip()) if i < len(lines) else "nothing" for lines in (a, b)]
        return f"its modules: {first[0]} then, {first[1]} now"
    classes = sorted(k for k in set(then["forward"]) | set(now["forward"]) if then["forward"].get(k) != now["forward"].get(k))
    unread = [k for k in classes if None in (then["forward"].get(k), now["forward"].get(k))]
    return (f"the code of {', '.join(c + '.forward' for c in classes)}"
            + (f"; the source of {', '.join(unread)} could not be read then or now" if unread else ""))


def engine_change(saved: Path, sim: Any) -> ConfigWarning | None:
    """What a resume should say when ``sim``'s engine is not the one the run in ``saved`` (its config.json) used."""
    try:
        before = json.loads(saved.read_text()).get("engine")
    except (OSError, ValueError, AttributeError):
        return None
    if before is None or before == sim.engine_name:
        return None
    return ConfigWarning(f"the run in {saved.parent} ran on engine {before!r} and resumes on {sim.engine_name!r}: the "
                         "rounds from here run on another engine, so the final weights can differ from an uninterrupted "
                         "run's in the last bits (engines agree to float rounding, not bit for bit) and its model_sha256 "
                         f"will not match; resume with {{engine={before!r}}} to get the same bits", obj=sim)
