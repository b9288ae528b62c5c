"""Datasets and partitioners: determinism, coverage, the skew each scheme promises, and bad input."""

from __future__ import annotations

import sys

import numpy as np
import pandas as pd
import pytest
import torch

import fedkit
from fedkit import data as D
from fedkit.data import Dataset, Partition

SCHEMES = {
    "iid": lambda ds, n, seed: D.iid(ds, clients=n, seed=seed),
    "dirichlet": lambda ds, n, seed: D.dirichlet(ds, clients=n, alpha=0.5, seed=seed),
    "shards": lambda ds, n, seed: D.shards(ds, clients=n, shards_per_client=2, seed=seed),
    "quantity_skew": lambda ds, n, seed: D.quantity_skew(ds, clients=n, alpha=0.5, seed=seed),
}


@pytest.fixture(scope="module")
def digits() -> D.Data:
    return D.load("digits")


@pytest.fixture(scope="module")
def synth() -> D.Data:
    return D.synthetic(samples=1000, features=6, classes=4, seed=3)


@pytest.fixture(params=["digits", "synthetic"])
def train(request, digits, synth) -> Dataset:
    return digits.train if request.param == "digits" else synth.train


def tagged(n: int, classes: int = 3) -> Dataset:
    """A dataset whose feature row i is the number i, so any subset tells which samples it holds."""
    return Dataset(torch.arange(n, dtype=torch.float32).unsqueeze(1), torch.arange(n) % classes, classes, "tagged")


def largest_class_share(parts: Partition) -> float:
    c = parts.counts()
    return float((c.max(axis=1) / c.sum(axis=1)).mean())


# ------------------------------------------------------------------------------------- loaders

def test_digits_sizes_shapes_and_standardization(digits):
    assert digits.name == "digits"
    assert len(digits.train) == 1437 and len(digits.test) == 360
    assert tuple(digits.train.x.shape) == (1437, 1, 8, 8)
    assert tuple(digits.test.x.shape) == (360, 1, 8, 8)
    assert digits.train.x.dtype == torch.float32 and digits.train.y.dtype == torch.int64
    assert digits.input_shape == (1, 8, 8) and digits.num_classes == 10
    assert abs(float(digits.train.x.mean())) < 1e-4
    assert abs(float(digits.train.x.std()) - 1.0) < 1e-3
    # the test split uses the train statistics, so it is only roughly standardized
    assert abs(float(digits.test.x.mean())) < 0.1
    # stratified: every class is in both splits
    assert set(digits.train.labels.tolist()) == set(range(10)) == set(digits.test.labels.tolist())


def test_digits_is_deterministic_and_case_insensitive(digits):
    again = D.load("DIGITS")
    assert torch.equal(again.train.x, digits.train.x) and torch.equal(again.test.y, digits.test.y)


def test_synthetic_sizes_and_determinism():
    a = D.synthetic(samples=500, features=7, classes=3, seed=1)
    b = D.synthetic(samples=500, features=7, classes=3, seed=1)
    c = D.synthetic(samples=500, features=7, classes=3, seed=2)
    assert len(a.train) == 400 and len(a.test) == 100  # 20% test
    assert a.input_shape == (7,) and a.num_classes == 3
    assert a.train.x.dtype == torch.float32 and a.train.y.dtype == torch.int64
    assert set(a.train.labels.tolist()) <= {0, 1, 2}
    assert torch.equal(a.train.x, b.train.x) and torch.equal(a.test.y, b.test.y)
    assert not torch.equal(a.train.x, c.train.x)


def test_load_synthetic_passes_options():
    d = D.load("synthetic", samples=100, features=3, classes=5)
    assert len(d.train) + len(d.test) == 100 and d.input_shape == (3,) and d.num_classes == 5


def test_unknown_dataset_lists_choices():
    with pytest.raises(fedkit.ConfigError) as e:
        D.load("imagenet")
    msg = str(e.value)
    assert "imagenet" in msg
    for choice in D.DATASETS:
        assert choice in msg


def test_digits_takes_no_options():
    with pytest.raises(fedkit.ConfigError, match="samples"):
        D.load("digits", samples=10)


@pytest.mark.parametrize("what, kwargs", [("samples", {"samples": 5}), ("features", {"features": 0}),
                                          ("classes", {"classes": 1}), ("samples", {"samples": 10.5})])
def test_synthetic_bad_sizes(what, kwargs):
    with pytest.raises(fedkit.ConfigError, match=what):
        D.synthetic(**kwargs)


def test_synthetic_integral_float_is_rejected_cleanly():
    with pytest.raises(fedkit.ConfigError, match="samples must be an integer"):
        D.synthetic(samples=100.0)


def test_synthetic_unknown_option_is_config_error():
    with pytest.raises(fedkit.ConfigError, match="colour"):
        D.load("synthetic", colour="red")


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_torchvision_missing_is_config_error(monkeypatch, name):
    monkeypatch.setitem(sys.modules, "torchvision", None)  # makes `import torchvision` fail
    with pytest.raises(fedkit.ConfigError) as e:
        D.load(name)
    msg = str(e.value)
    assert "torchvision" in msg and "digits" in msg and name in msg


# ---------------------------------------------------------------------------------------- split

def test_split_fractions_and_disjointness():
    ds = tagged(200)
    rest, held = ds.split(0.25, seed=4)
    assert len(held) == 50 and len(rest) == 150
    a, b = set(rest.x[:, 0].long().tolist()), set(held.x[:, 0].long().tolist())
    assert not a & b and a | b == set(range(200))
    # labels travel with their rows
    assert torch.equal(rest.y, rest.x[:, 0].long() % 3)
    again = ds.split(0.25, seed=4)[1]
    other = ds.split(0.25, seed=5)[1]
    assert torch.equal(again.x, held.x) and not torch.equal(other.x, held.x)
    assert len(ds.split(0.0)[1]) == 0 and len(ds.split(0.0)[0]) == 200


@pytest.mark.parametrize("fraction", [-0.1, 1.0, 1.5, float("nan")])
def test_split_bad_fraction(fraction):
    with pytest.raises(fedkit.ConfigError, match="fraction"):
        tagged(10).split(fraction)


def test_dataset_length_mismatch():
    with pytest.raises(fedkit.ConfigError, match="3 feature rows but 2 labels"):
        Dataset(torch.zeros(3, 2), torch.zeros(2, dtype=torch.int64), 2, "bad")


# ------------------------------------------------------------------------- partitions: generic

@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_partition_deterministic_by_seed(train, scheme):
    make = SCHEMES[scheme]
    a, b, c = make(train, 6, 11), make(train, 6, 11), make(train, 6, 12)
    assert len(a) == 6
    assert all(np.array_equal(x, y) for x, y in zip(a.indices, b.indices))
    assert not all(np.array_equal(x, y) for x, y in zip(a.indices, c.indices))


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_partition_covers_every_sample_once(train, scheme):
    parts = SCHEMES[scheme](train, 7, 0)
    assert len(parts) == 7 and parts.dataset is train
    everything = np.sort(np.concatenate(parts.indices))
    assert np.array_equal(everything, np.arange(len(train)))
    assert all(len(idx) > 0 for idx in parts.indices)
    assert all(idx.dtype == np.int64 and np.all(np.diff(idx) > 0) for idx in parts.indices)  # sorted, unique


def test_counts_and_summary(digits):
    parts = D.dirichlet(digits.train, clients=5, alpha=0.3, seed=2)
    c = parts.counts()
    assert c.shape == (5, 10)
    assert np.array_equal(c.sum(axis=1), [len(i) for i in parts.indices])
    assert np.array_equal(c.sum(axis=0), np.bincount(digits.train.labels, minlength=10))
    assert c.sum() == len(digits.train)
    df = parts.summary()
    assert isinstance(df, pd.DataFrame)
    assert list(df.index) == [f"site-{i}" for i in range(1, 6)]
    assert list(df.columns) == [f"class {k}" for k in range(10)] + ["total"]
    assert np.array_equal(df["total"].to_numpy(), c.sum(axis=1))
    assert df["total"].sum() == len(digits.train)
    assert np.array_equal(df.drop(columns="total").to_numpy(), c)


def test_partition_indexing_iteration_and_slicing():
    ds = tagged(30)
    parts = D.iid(ds, clients=4, seed=0)
    first = parts[0]
    assert isinstance(first, Dataset) and first.num_classes == 3 and first.name == "tagged"
    assert np.array_equal(first.x[:, 0].long().numpy(), parts.indices[0])
    assert np.array_equal(first.labels, parts.indices[0] % 3)
    assert np.array_equal(parts[-1].x[:, 0].long().numpy(), parts.indices[3])
    listed = list(parts)
    assert len(listed) == 4 and all(isinstance(d, Dataset) for d in listed)
    assert [len(d) for d in listed] == [len(i) for i in parts.indices] == [8, 8, 7, 7]
    middle = parts[1:3]
    assert isinstance(middle, list) and len(middle) == 2
    assert np.array_equal(middle[1].x[:, 0].long().numpy(), parts.indices[2])
    assert len(parts[::2]) == 2
    with pytest.raises(IndexError):
        parts[4]


# --------------------------------------------------------------------- partitions: their skew

def test_iid_sizes_equal_and_labels_balanced(digits):
    parts = D.iid(digits.train, clients=10, seed=0)
    sizes = [len(i) for i in parts.indices]
    assert max(sizes) - min(sizes) <= 1
    assert largest_class_share(parts) < 0.2  # 10 balanced classes: ~0.1 plus noise
    assert parts.scheme == "iid"


def test_dirichlet_alpha_controls_skew(digits):
    iid = np.mean([largest_class_share(D.iid(digits.train, 10, seed=s)) for s in range(3)])
    skewed = np.mean([largest_class_share(D.dirichlet(digits.train, 10, alpha=0.1, seed=s)) for s in range(3)])
    near = np.mean([largest_class_share(D.dirichlet(digits.train, 10, alpha=100, seed=s)) for s in range(3)])
    assert skewed > 0.45 and skewed > 3 * iid
    assert abs(near - iid) < 0.05
    assert D.dirichlet(digits.train, 10, alpha=0.1, seed=0).scheme == "dirichlet(alpha=0.1)"


def test_dirichlet_skews_synthetic(synth):
    parts = D.dirichlet(synth.train, clients=6, alpha=0.1, seed=0)
    assert largest_class_share(parts) > 0.6  # 4 classes: IID would be ~0.25


def test_dirichlet_min_size(digits):
    parts = D.dirichlet(digits.train, clients=10, alpha=0.3, seed=1, min_size=60)
    assert min(len(i) for i in parts.indices) >= 60
    default = D.dirichlet(digits.train, clients=10, alpha=0.1, seed=1)
    assert min(len(i) for i in default.indices) >= 10
    with pytest.raises(fedkit.ConfigError, match="min_size"):
        D.dirichlet(digits.train, clients=10, alpha=0.5, seed=0, min_size=200)  # 10 x 200 > 1437


def test_shards_give_few_classes(train):
    for seed in range(3):
        parts = D.shards(train, clients=8, shards_per_client=2, seed=seed)
        classes = (parts.counts() > 0).sum(axis=1)
        assert classes.max() <= 4  # two shards, each straddling at most one class boundary
        assert np.median(classes) <= 3
        sizes = [len(i) for i in parts.indices]
        assert max(sizes) - min(sizes) <= 2  # shards are equal up to one sample
    assert parts.scheme == "shards(per_client=2)"


def test_shards_two_per_client_mostly_two_classes(digits):
    classes = np.concatenate([(D.shards(digits.train, 10, 2, seed=s).counts() > 0).sum(axis=1) for s in range(5)])
    assert np.mean(classes <= 3) >= 0.8
    assert classes.mean() < 3.0


def test_quantity_skew_sizes_unequal_labels_iid(digits):
    parts = D.quantity_skew(digits.train, clients=10, alpha=0.5, seed=0)
    sizes = np.array([len(i) for i in parts.indices])
    assert sizes.max() > 3 * sizes.min()
    assert sizes.min() >= 10  # default min_size
    c = parts.counts()
    overall = c.sum(axis=0) / c.sum()
    big = sizes >= 100
    assert big.sum() >= 3
    props = c[big] / sizes[big, None]
    assert np.abs(props - overall).max() < 0.1  # label proportions follow the whole dataset
    assert parts.scheme == "quantity_skew(alpha=0.5)"


def test_quantity_skew_min_size(digits):
    parts = D.quantity_skew(digits.train, clients=8, alpha=0.5, seed=3, min_size=80)
    assert min(len(i) for i in parts.indices) >= 80
    with pytest.raises(fedkit.ConfigError, match="quantity_skew"):
        D.quantity_skew(digits.train, clients=8, alpha=0.5, seed=0, min_size=500)


# ------------------------------------------------------------------------ partitions: bad input

@pytest.mark.parametrize("scheme", list(SCHEMES))
@pytest.mark.parametrize("clients", [0, -2, True, 2.0])
def test_bad_client_count(scheme, clients):
    with pytest.raises(fedkit.ConfigError, match="positive integer"):
        SCHEMES[scheme](tagged(20), clients, 0)


@pytest.mark.parametrize("scheme", list(SCHEMES))
def test_more_clients_than_samples(scheme):
    with pytest.raises(fedkit.ConfigError) as e:
        SCHEMES[scheme](tagged(5), 6, 0)
    assert "6 clients" in str(e.value) and "only 5" in str(e.value)


def test_numpy_client_count_accepted():
    assert len(D.iid(tagged(20), np.int64(4))) == 4


@pytest.mark.parametrize("fn", [D.dirichlet, D.quantity_skew])
@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan"), float("inf")])
def test_bad_alpha(fn, alpha):
    with pytest.raises(fedkit.ConfigError, match="alpha must be > 0"):
        fn(tagged(50), clients=2, alpha=alpha)


def test_bad_shards():
    with pytest.raises(fedkit.ConfigError, match="shards_per_client"):
        D.shards(tagged(50), clients=2, shards_per_client=0)
    with pytest.raises(fedkit.ConfigError, match="shards"):
        D.shards(tagged(10), clients=4, shards_per_client=3)  # 12 shards > 10 samples


# ------------------------------------------------------------- partitions: many clients, min_size

def digest(parts: Partition) -> str:
    import hashlib
    return hashlib.sha256(b"".join(i.astype(np.int64).tobytes() + b"|" for i in parts.indices)).hexdigest()[:16]


@pytest.mark.parametrize("fn, kwargs, expected", [
    # what the 1000-draw rule gave before the repair existed: a draw that fits is still returned unchanged
    (D.dirichlet, dict(clients=8, alpha=0.5, seed=0), "b1c4b3fd5ebe8002"),  # the quickstart preset's split
    (D.dirichlet, dict(clients=20, alpha=0.1, seed=3), "6fd079d65fe8418d"),  # fits on the 4th draw
    (D.dirichlet, dict(clients=10, alpha=0.3, seed=1, min_size=60), "684a88d0f2edb47f"),
    (D.quantity_skew, dict(clients=8, alpha=0.5, seed=0), "3cd83aab635988e7"),
    (D.quantity_skew, dict(clients=5, alpha=0.3, seed=2), "93e57c50402680e4"),
])
def test_partitions_that_fit_are_the_same_as_before(digits, fn, kwargs, expected):
    assert digest(fn(digits.train, **kwargs)) == expected


@pytest.mark.parametrize("fn", [D.dirichlet, D.quantity_skew])
@pytest.mark.parametrize("clients, alpha", [(100, 0.5), (200, 0.1), (500, 0.5)])
def test_many_clients_always_get_min_size(digits, fn, clients, alpha):
    import time
    t0 = time.perf_counter()
    parts = fn(digits.train, clients=clients, alpha=alpha, seed=1)
    assert time.perf_counter() - t0 < 20  # was: a ConfigError after 1000 draws and 2-9 s
    n = len(digits.train)
    sizes = np.array([len(i) for i in parts.indices])
    assert len(parts) == clients and sizes.min() >= min(10, n // clients)
    assert np.array_equal(np.sort(np.concatenate(parts.indices)), np.arange(n))
    again = fn(digits.train, clients=clients, alpha=alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts.indices, again.indices))


def test_repaired_dirichlet_keeps_its_label_skew(digits):
    skewed = D.dirichlet(digits.train, clients=100, alpha=0.1, seed=0)
    iid = D.iid(digits.train, clients=100, seed=0)
    assert largest_class_share(skewed) > 0.6 > largest_class_share(iid) + 0.2
    explicit = D.dirichlet(digits.train, clients=100, alpha=0.5, seed=0, min_size=14)  # 100 x 14 <= 1437
    assert min(len(i) for i in explicit.indices) == 14


def test_quantity_skew_that_used_to_fail_now_fits(digits):
    parts = D.quantity_skew(digits.train, clients=20, alpha=0.5, seed=0)  # no draw in 1000 gave everyone 10
    sizes = np.array([len(i) for i in parts.indices])
    assert sizes.min() >= 10 and sizes.max() > 5 * sizes.min()  # still unequal sizes


def test_top_up_moves_from_the_largest_to_the_short():
    counts = np.array([[50, 0], [0, 1], [0, 0], [3, 30]])
    moves = D._top_up(counts, need=10)
    assert counts.sum(axis=1).min() >= 10 and counts.sum() == 84 and (counts >= 0).all()
    assert counts[1].tolist() == [0, 10]  # topped up with the class it already held
    assert counts[2].tolist() == [10, 0] and counts[3, 1] == 21  # an empty client gets the largest one's main class
    assert all(m > 0 for *_, m in moves)


@pytest.mark.parametrize("fn", [D.dirichlet, D.quantity_skew])
def test_min_size_that_cannot_fit_says_the_largest_that_can(fn):
    with pytest.raises(fedkit.ConfigError, match=r"min_size=6 for each of 10 clients needs 60 samples, but the dataset has "
                                                 r"only 50; use min_size <= 5"):
        fn(tagged(50), clients=10, alpha=0.5, min_size=6)


BAD = [
    (D.dirichlet, dict(alpha="0.5"), "alpha must be > 0"), (D.dirichlet, dict(alpha=None), "alpha"),
    (D.dirichlet, dict(alpha=True), "alpha"), (D.quantity_skew, dict(alpha="x"), "alpha"),
    (D.dirichlet, dict(min_size="x"), "min_size must be a whole number >= 1"), (D.dirichlet, dict(min_size=2.5), "min_size"),
    (D.dirichlet, dict(min_size=0), "min_size"), (D.quantity_skew, dict(min_size=-1), "min_size"),
    (D.iid, dict(seed=-1), r"seed must be a whole number in \[0, 2\*\*63\)"), (D.iid, dict(seed=2**63), "seed"),
    (D.dirichlet, dict(seed=1.7), "seed"), (D.shards, dict(seed="0"), "seed"), (D.quantity_skew, dict(seed=None), "seed"),
    (D.shards, dict(shards_per_client=1.5), "shards_per_client must be a whole number"),
    (D.shards, dict(shards_per_client="2"), "shards_per_client"), (D.iid, dict(clients="4"), "positive integer"),
]


@pytest.mark.parametrize("fn, kwargs, match", BAD)
def test_bad_partition_arguments_are_config_errors(fn, kwargs, match):
    args = dict(clients=2, **({"alpha": 0.5} if fn is D.dirichlet else {}))
    with pytest.raises(fedkit.ConfigError, match=match):
        fn(tagged(50), **{**args, **kwargs})


def test_numpy_seed_and_largest_seed_accepted():
    assert len(D.iid(tagged(20), 2, seed=np.int64(3))) == 2
    assert len(D.dirichlet(tagged(20), 2, alpha=1.0, seed=2**63 - 1)) == 2


def test_data_instead_of_a_dataset_is_explained(digits):
    with pytest.raises(fedkit.ConfigError, match=r"pass its \.train"):
        D.iid(digits, clients=2)


def test_labels_a_model_cannot_learn_from_and_nan_features_are_refused_naming_the_values():
    """Issue 18 item 8: check_dataset says who, which values, and what to do (once per dataset, vectorised)."""
    x, y = torch.zeros(6, 2), torch.tensor([0, 1, 2, 0, 1, 2])
    D.check_dataset(Dataset(x, y, 3), "site-1's training split")  # good labels and features pass
    D.check_dataset(Dataset(x[:0], y[:0], 3), "site-1's validation split")  # an empty split too
    ignore = y.clone()
    ignore[[0, 3]] = -100
    cases = [
        (Dataset(x, ignore, 3), r"site-9's training split: labels must be int64 class indices in \[0, 3\).*2 of 6 "
                                r"label\(s\) are outside it: -100 \(2 samples\); -100 is CrossEntropyLoss's ignore index"),
        (Dataset(x, y, 2), r"2 of 6 label\(s\) are outside it: 2 \(2 samples\).*right num_classes"),
        (Dataset(x, y.int(), 3), r"torch\.int32 with shape \(6,\); convert them with y\.long\(\)"),
        (Dataset(x, y.float(), 3), r"torch\.float32.*give each sample its class index as an integer"),
        (Dataset(x, y.view(6, 1), 3), r"shape \(6, 1\)"),
        (Dataset(x, y, 0), r"num_classes must be a whole number >= 1.*got 0"),
        (Dataset(x, y, True), r"num_classes must be a whole number >= 1.*got True"),
    ]
    nan = x.clone()
    nan[4, 1], nan[5, 0] = float("nan"), float("-inf")
    cases.append((Dataset(nan, y, 3), r"2 of 6 sample\(s\) have NaN or infinite features \(rows 4, 5\)"))
    for dataset, match in cases:
        with pytest.raises(fedkit.ConfigError, match=match):
            D.check_dataset(dataset, "site-9's training split")
