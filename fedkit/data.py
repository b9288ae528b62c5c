"""Datasets and the partitioners that spread them over clients.

``load("digits")`` works offline (scikit-learn ships it) and is the default everywhere;
``"synthetic"`` is generated; ``"mnist"`` and ``"cifar10"`` come through torchvision.
Partitioners are deterministic by seed and return a `Partition`: one index array per client.

>>> data = load("digits")
>>> parts = dirichlet(data.train, clients=8, alpha=0.5, seed=0)
>>> len(parts), sum(len(p) for p in parts) == len(data.train)
(8, True)
"""

from __future__ import annotations

import inspect
import math
import numbers
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Sequence

import numpy as np
import torch

from .errors import ConfigError, refusal
from .extras import require


@dataclass(frozen=True, eq=False)
class Dataset:
    """Features ``x`` (float32; images as N,C,H,W) and integer labels ``y``, held as tensors."""

    x: torch.Tensor
    y: torch.Tensor
    num_classes: int
    name: str = ""

    def __post_init__(self) -> None:
        if len(self.x) != len(self.y):
            raise ConfigError(f"dataset {self.name!r}: {len(self.x)} feature rows but {len(self.y)} labels")

    def __len__(self) -> int:
        return len(self.y)

    @property
    def labels(self) -> np.ndarray:
        return self.y.numpy()

    def subset(self, indices: np.ndarray) -> "Dataset":
        idx = torch.as_tensor(np.asarray(indices, dtype=np.int64))
        return Dataset(self.x[idx], self.y[idx], self.num_classes, self.name)

    def split(self, fraction: float, seed: int = 0) -> tuple["Dataset", "Dataset"]:
        """Randomly split into (rest, held-out) with ``fraction`` of the samples held out."""
        if not 0.0 <= fraction < 1.0:
            raise ConfigError(f"split fraction must be in [0, 1), got {fraction}")
        order = np.random.default_rng(seed).permutation(len(self))
        n_out = int(round(fraction * len(self)))
        return self.subset(np.sort(order[n_out:])), self.subset(np.sort(order[:n_out]))


IGNORE_INDEX = -100  # CrossEntropyLoss's default ignore_index: a label it skips while the sample is still counted


def _values(t: torch.Tensor, limit: int = 5) -> str:
    """The distinct values of ``t`` (at most ``limit``), with how many samples hold each: ``-100 (37 samples)``."""
    values, counts = torch.unique(t, return_counts=True)
    shown = [f"{v.item()!r} ({int(n)} sample{'s' if n != 1 else ''})" for v, n in zip(values[:limit], counts[:limit])]
    return ", ".join(shown) + (f" and {len(values) - limit} more value(s)" if len(values) > limit else "")


def check_dataset(d: Dataset, who: str) -> None:
    """Refuse, naming ``who`` ("site-2's training split", "the test set") and the bad values, labels a model
    cannot learn from or be scored on (not int64 class indices in [0, num_classes), e.g. CrossEntropy's ignore
    index -100) and features that are NaN or infinite. One vectorised pass over the data: run it once per
    dataset, when a federation is built."""
    k = d.num_classes
    if isinstance(k, (bool, np.bool_)) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ConfigError(f"{who}: num_classes must be a whole number >= 1 (the classes its labels index), got {k!r}")
    y = d.y
    rule = f"labels must be int64 class indices in [0, {k}) (num_classes={k})"
    if not isinstance(y, torch.Tensor) or y.dtype != torch.int64 or y.ndim != 1:
        what = (f"a {type(y).__name__}" if not isinstance(y, torch.Tensor) else
                f"a tensor of {y.dtype} with shape {tuple(y.shape)}")
        fix = ("convert them with y.long()" if isinstance(y, torch.Tensor) and not y.is_floating_point() and
               not y.is_complex() and y.dtype != torch.bool else "give each sample its class index as an integer")
        raise ConfigError(f"{who}: {rule}, one per sample, but they are {what}; {fix} (a 1-D torch.int64 tensor)")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= k):
        bad = y[(y < 0) | (y >= k)]
        ignore = (f"; {IGNORE_INDEX} is CrossEntropyLoss's ignore index, which skips a sample in training yet counts "
                  "it, and scores it as wrong: drop those samples instead") if bool((bad == IGNORE_INDEX).any()) else ""
        raise ConfigError(f"{who}: {rule}, but {len(bad)} of {len(y)} label(s) are outside it: {_values(bad)}{ignore}. "
                          "Drop or relabel those samples, or give the Dataset the right num_classes")
    x = d.x
    # the sum is finite when every value is (an overflow only sends it to the exact check): ~50x faster than isfinite
    if isinstance(x, torch.Tensor) and x.is_floating_point() and len(x) and not math.isfinite(x.sum()):
        finite = torch.isfinite(x.reshape(len(x), -1)).all(dim=1)
        if not bool(finite.all()):
            rows = torch.nonzero(~finite).flatten()
            shown = ", ".join(str(int(i)) for i in rows[:5]) + (", ..." if len(rows) > 5 else "")
            raise ConfigError(f"{who}: {len(rows)} of {len(x)} sample(s) have NaN or infinite features (rows {shown}); "
                              "a model trained or scored on them gives NaN or meaningless numbers. Drop or impute "
                              "those samples first")


@dataclass(frozen=True, eq=False)
class Data:
    """A loaded dataset: train and test splits plus what a model needs to know about them."""

    name: str
    train: Dataset
    test: Dataset

    @property
    def num_classes(self) -> int:
        return self.train.num_classes

    @property
    def input_shape(self) -> tuple[int, ...]:
        return tuple(self.train.x.shape[1:])


@dataclass(frozen=True, eq=False)
class ClientData:
    """One client's local data: what it trains on and the split it validates the global model on."""

    train: Dataset
    val: Dataset


# --------------------------------------------------------------------------------------- loaders

DATASETS = ("digits", "synthetic", "mnist", "cifar10")


def load(name: str = "digits", *, root: str | Path = "data", download: bool = False, **options) -> Data:
    """Load a dataset by name: ``digits`` (default, offline), ``synthetic``, ``mnist``, ``cifar10``.

    ``synthetic`` takes ``samples``, ``features``, ``classes``, ``seed``. ``mnist`` and ``cifar10``
    read from ``root`` and need ``download=True`` the first time (and network access).
    """
    key = str(name).lower()
    if key == "digits":
        _no_options(key, options)
        return _digits()
    if key == "synthetic":
        allowed = [p for p in inspect.signature(synthetic).parameters]
        unknown = sorted(set(options) - set(allowed))
        if unknown:
            raise ConfigError(f"dataset 'synthetic' takes the options {', '.join(allowed)}; got unknown: {', '.join(unknown)}")
        return synthetic(**options)
    if key in ("mnist", "cifar10"):
        _no_options(key, options)
        return _torchvision(key, Path(root), download)
    raise ConfigError(f"unknown dataset {name!r}; choose one of: {', '.join(DATASETS)}")


def _no_options(name: str, options: dict) -> None:
    if options:
        raise ConfigError(f"dataset {name!r} takes no options, got: {', '.join(options)}")


def _digits() -> Data:
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
    y = bunch.target.astype(np.int64)
    # A fixed, stratified test split: every run and every seed is scored on the same 360 images.
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=0.2, random_state=0, stratify=y)
    # Zero mean, unit variance (one mean and std over all pixels of the train split): SGD on the raw
    # [0, 1] pixels learns several times slower in the few local steps a client takes per round.
    mean, std = x_tr.mean(), x_tr.std()
    x_tr, x_te = (x_tr - mean) / std, (x_te - mean) / std
    mk = lambda a, b: Dataset(torch.from_numpy(a), torch.from_numpy(b), 10, "digits")  # noqa: E731
    return Data("digits", mk(x_tr, y_tr), mk(x_te, y_te))


def synthetic(samples: int = 2000, features: int = 20, classes: int = 4, seed: int = 0,
              separation: float = 2.0) -> Data:
    """Gaussian blobs, one per class, in ``features`` dimensions; 20% of samples are the test set."""
    for what, value, low in (("samples", samples, 10), ("features", features, 1), ("classes", classes, 2)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < low:
            raise ConfigError(f"synthetic data: {what} must be an integer >= {low}, got {value!r}")
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, separation / np.sqrt(features), size=(classes, features)) * np.sqrt(features)
    y = rng.integers(0, classes, size=samples)
    x = (centers[y] + rng.normal(size=(samples, features))).astype(np.float32)
    n_test = samples // 5
    mk = lambda a, b: Dataset(torch.from_numpy(a), torch.from_numpy(b.astype(np.int64)), classes, "synthetic")  # noqa: E731
    return Data("synthetic", mk(x[n_test:], y[n_test:]), mk(x[:n_test], y[:n_test]))


_TORCHVISION = {
    # name: (class name, per-channel mean, per-channel std), the usual normalisation constants
    "mnist": ("MNIST", (0.1307,), (0.3081,)),
    "cifar10": ("CIFAR10", (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
}


def _torchvision(name: str, root: Path, download: bool) -> Data:
    torchvision = require("torchvision", f"dataset {name!r}",
                          " (it must match your torch: else the pair that PyTorch's install selector gives), "
                          "or use the offline dataset 'digits'")
    cls_name, mean, std = _TORCHVISION[name]
    cls = getattr(torchvision.datasets, cls_name)
    try:
        train, test = (cls(str(root), train=t, download=download) for t in (True, False))
    except RuntimeError as e:
        raise ConfigError(
            f"dataset {name!r} is not in {root.resolve()} ({e}). Download it once with "
            f"fk.data.load({name!r}, root={str(root)!r}, download=True) or `fedkit run --dataset {name} "
            "--download`, on a machine with network access."
        ) from None

    def tensors(ds) -> Dataset:
        x = torch.as_tensor(np.asarray(ds.data), dtype=torch.float32) / 255.0
        x = x.unsqueeze(1) if x.ndim == 3 else x.permute(0, 3, 1, 2)
        m = torch.tensor(mean).view(1, -1, 1, 1)
        s = torch.tensor(std).view(1, -1, 1, 1)
        return Dataset(((x - m) / s).contiguous(), torch.as_tensor(np.asarray(ds.targets), dtype=torch.int64), 10, name)

    return Data(name, tensors(train), tensors(test))


# ----------------------------------------------------------------------------------- partitions

@dataclass(frozen=True, eq=False)
class Partition(Sequence[Dataset]):
    """A dataset spread over clients: ``indices[i]`` are client i's samples. Indexing gives datasets."""

    dataset: Dataset
    indices: tuple[np.ndarray, ...]
    scheme: str

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        return self.dataset.subset(self.indices[i])

    def __iter__(self) -> Iterator[Dataset]:
        return (self[i] for i in range(len(self)))

    def counts(self) -> np.ndarray:
        """Samples per client (rows) per class (columns)."""
        labels = self.dataset.labels
        return np.stack([np.bincount(labels[idx], minlength=self.dataset.num_classes) for idx in self.indices])

    def summary(self):
        """A DataFrame of samples per client per class, with a total column."""
        import pandas as pd

        df = pd.DataFrame(self.counts(), index=[f"site-{i + 1}" for i in range(len(self))],
                          columns=[f"class {c}" for c in range(self.dataset.num_classes)])
        df["total"] = df.sum(axis=1)
        return df


SEED_LIMIT = 2**63  # seeds are whole numbers in [0, 2**63): what every generator in fedkit takes without folding


def check_seed(seed: Any, what: str = "seed") -> int:
    """``seed`` as an int, or `ConfigError` unless it is a whole number in [0, 2**63) (no bool, no float)."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or not 0 <= seed < SEED_LIMIT:
        raise refusal(what, "must be a whole number in [0, 2**63) (e.g. 0)", seed)
    return int(seed)


def _whole(scheme: str, what: str, value: Any, low: int) -> int:
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)) or value < low:
        raise ConfigError(f"{scheme}: {{{what}}} must be a whole number >= {low}", field=what, value=value)
    return int(value)


def _alpha(scheme: str, alpha: Any, meaning: str) -> float:
    if isinstance(alpha, (bool, np.bool_)) or not isinstance(alpha, numbers.Real) or not (math.isfinite(alpha) and alpha > 0):
        raise ConfigError(f"{scheme} {{alpha}} must be > 0 and finite ({meaning})", field="alpha", value=alpha)
    return float(alpha)


def _check(dataset: Dataset, clients: Any, scheme: str = "partition", seed: Any = 0) -> int:
    if not isinstance(dataset, Dataset):
        hint = " (a fk.data.Data: pass its .train)" if isinstance(dataset, Data) else ""
        raise ConfigError(f"{scheme}: dataset must be a fk.data.Dataset{hint}, got {type(dataset).__name__}")
    if isinstance(clients, (bool, np.bool_)) or not isinstance(clients, (int, np.integer)) or clients < 1:
        raise ConfigError("{clients} must be a positive integer", field="clients", value=clients)
    if clients > len(dataset):
        raise ConfigError(f"{{clients={clients}}}: cannot give {clients} clients at least one sample each: the dataset "
                          f"has only {len(dataset)} samples", field="clients", hint="use fewer {clients} or more data")
    check_seed(seed, "seed")
    return int(clients)


def _min_size(scheme: str, min_size: Any, n: int, clients: int) -> int:
    """The samples every client must get: ``min_size``, or by default min(10, n // clients), which always fits."""
    if min_size is None:
        return min(10, n // clients)
    need = _whole(scheme, "min_size", min_size, 1)
    if clients * need > n:
        raise ConfigError(f"{scheme}: {{min_size={need}}} for each of {clients} clients needs "
                          f"{clients * need} samples, but the dataset has only {n}", field="min_size",
                          hint=f"use {{min_size}} <= {n // clients}, fewer {{clients}}, or more data")
    return need


def _partition(dataset: Dataset, parts: list[np.ndarray], scheme: str) -> Partition:
    return Partition(dataset, tuple(np.sort(np.asarray(p, dtype=np.int64)) for p in parts), scheme)


# How many independent draws the partitioners try before they make the last one fit. A draw that fits
# within these is returned as it always was (so the partitions, and every run's model, stay the same);
# past them the old rule raised after seconds to minutes, now the last draw is repaired (`_top_up`).
DRAWS = 1000


def _top_up(counts: np.ndarray, need: int) -> list[tuple[int, int, int, int]]:
    """Moves that give every client (row of ``counts``, clients x classes) at least ``need`` samples.

    Each move ``(donor, receiver, class, m)`` hands ``m`` samples of one class from a client with more than
    ``need`` to one with fewer, smallest receivers first. It keeps the skew: a receiver gets more of the
    classes it already holds (its largest first, from the largest client with samples of it to spare),
    and only a receiver that holds none of those gets the largest client's most common class. Needs
    ``need * clients <= counts.sum()`` (then some client always has more than ``need`` while one has
    fewer); ``counts`` is updated in place.
    """
    sizes = counts.sum(axis=1)
    moves = []
    for r in np.argsort(sizes, kind="stable"):
        while sizes[r] < need:
            spare = sizes > need
            donor = k = -1
            for c in np.argsort(-counts[r], kind="stable"):
                if counts[r, c] == 0:
                    break
                holders = spare & (counts[:, c] > 0)
                if holders.any():
                    donor, k = int(np.argmax(np.where(holders, sizes, -1))), int(c)
                    break
            if donor < 0:
                donor = int(np.argmax(sizes))
                k = int(np.argmax(counts[donor]))
            m = int(min(need - sizes[r], sizes[donor] - need, counts[donor, k]))
            counts[donor, k] -= m
            counts[r, k] += m
            sizes[donor] -= m
            sizes[r] += m
            moves.append((donor, int(r), k, m))
    return moves


def iid(dataset: Dataset, clients: int, seed: int = 0) -> Partition:
    """Shuffle and deal out: each client gets about the same number of samples of every class."""
    clients = _check(dataset, clients, "iid", seed)
    order = np.random.default_rng(seed).permutation(len(dataset))
    return _partition(dataset, np.array_split(order, clients), "iid")


def dirichlet(dataset: Dataset, clients: int, alpha: float, seed: int = 0, min_size: int | None = None) -> Partition:
    """Label skew: each class is split over clients in proportions drawn from Dirichlet(alpha).

    Small ``alpha`` (0.1) gives each client a few dominant classes; large ``alpha`` (100) is close to
    IID. Following Hsu et al. 2019 ("Measuring the Effects of Non-Identical Data Distribution") and the
    NIID-Bench recipe, a client already holding its fair share gets no more of later classes, and the
    draw is repeated until every client has at least ``min_size`` samples (default: min(10, N/clients)).
    With many clients (100 or more on digits) no draw may fit: after `DRAWS` draws the last one is
    repaired, samples moving from the largest clients to the ones short of ``min_size``, so any
    ``min_size`` with ``clients * min_size <= N`` works.
    """
    clients = _check(dataset, clients, "dirichlet", seed)
    a = _alpha("dirichlet", alpha, "small = more skewed, e.g. 0.1; large = near IID")
    n = len(dataset)
    need = _min_size("dirichlet", min_size, n, clients)
    rng = np.random.default_rng(seed)
    labels = dataset.labels
    by_class = [np.flatnonzero(labels == k) for k in range(dataset.num_classes)]
    concentration = np.full(clients, a)
    fair = n / clients
    for _ in range(DRAWS):
        # counts[c, k]: class k's samples dealt to client c; chunks[k]: class k shuffled, cut at cuts[k]
        counts = np.zeros((clients, len(by_class)), dtype=np.int64)
        sizes = np.zeros(clients, dtype=np.int64)
        chunks = []
        for k, idx in enumerate(by_class):
            idx = rng.permutation(idx)
            p = rng.dirichlet(concentration)
            p = p * (sizes < fair)  # full clients take no more
            total = p.sum()
            p = p / total if total > 0 else np.full(clients, 1.0 / clients)
            ends = (np.cumsum(p) * len(idx)).astype(int)  # client c's chunk ends at ends[c]; the last takes the rest
            ends[-1] = len(idx)
            chunks.append(idx)
            counts[0, k] = ends[0]
            np.subtract(ends[1:], ends[:-1], out=counts[1:, k])
            sizes += counts[:, k]
        if sizes.min() >= need:
            break
    else:
        _top_up(counts, need)  # the moves only change how many of each class a client has
    # client c takes, of each class, the next counts[c, k] samples of that class's shuffled order
    ends = np.cumsum(counts, axis=0)
    starts = ends - counts
    parts = [np.concatenate([chunks[k][starts[c, k]:ends[c, k]] for k in range(len(chunks))]) for c in range(clients)]
    return _partition(dataset, parts, f"dirichlet(alpha={alpha})")


def shards(dataset: Dataset, clients: int, shards_per_client: int = 2, seed: int = 0) -> Partition:
    """Pathological non-IID (McMahan et al. 2017): sort by label, cut into shards, deal each client a few.

    With 2 shards per client most clients see only two classes.
    """
    clients = _check(dataset, clients, "shards", seed)
    shards_per_client = _whole("shards", "shards_per_client", shards_per_client, 1)
    total = clients * shards_per_client
    if total > len(dataset):
        raise ConfigError(f"{{clients={clients}}} x {{shards_per_client={shards_per_client}}} = {total} shards, more than "
                          f"the {len(dataset)} samples", field="shards_per_client",
                          hint="use fewer {clients} or {shards_per_client}")
    rng = np.random.default_rng(seed)
    # random tie-break inside each label so that shards of one class are not always the same samples
    order = np.lexsort((rng.random(len(dataset)), dataset.labels))
    pieces = np.array_split(order, total)
    deal = rng.permutation(total).reshape(clients, shards_per_client)
    return _partition(dataset, [np.concatenate([pieces[s] for s in row]) for row in deal],
                      f"shards(per_client={shards_per_client})")


def quantity_skew(dataset: Dataset, clients: int, alpha: float = 0.5, seed: int = 0, min_size: int | None = None) -> Partition:
    """Quantity skew: labels stay IID but client sizes follow Dirichlet(alpha) proportions.

    Every client gets at least ``min_size`` samples (default: min(10, N/clients)): draws that give one
    fewer are repeated, and after `DRAWS` of them the last is repaired, the largest clients giving
    samples to the smallest.
    """
    clients = _check(dataset, clients, "quantity_skew", seed)
    a = _alpha("quantity_skew", alpha, "small = very unequal sizes")
    n = len(dataset)
    need = _min_size("quantity_skew", min_size, n, clients)
    rng = np.random.default_rng(seed)
    order = rng.permutation(n)
    concentration = np.full(clients, a)
    for _ in range(DRAWS):
        p = rng.dirichlet(concentration)
        if not (np.all(np.isfinite(p)) and p.sum() > 0):  # an alpha so large or small that the draw degenerates
            p = np.full(clients, 1.0 / clients)
        cuts = (np.cumsum(p) * n).astype(int)[:-1]
        sizes = np.diff(cuts, prepend=0, append=n)
        if sizes.min() >= need:
            break
    else:
        counts = sizes[:, None].copy()
        _top_up(counts, need)
        cuts = np.cumsum(counts[:, 0])[:-1]
    return _partition(dataset, np.split(order, cuts), f"quantity_skew(alpha={alpha})")
