"""Model shapes, parameter counts and `for_data`'s choices."""

from __future__ import annotations

import pytest
import torch

import fedkit
from fedkit.data import Data, Dataset, synthetic
from fedkit.models import MLP, SimpleNetwork, SmallCNN, for_data


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def fake(name: str, shape: tuple[int, ...], classes: int = 10, n: int = 4) -> Data:
    ds = Dataset(torch.zeros(n, *shape), torch.zeros(n, dtype=torch.int64), classes, name)
    return Data(name, ds, ds)


def test_simple_network_cifar_shape_and_size():
    torch.manual_seed(0)
    net = SimpleNetwork()
    assert net(torch.randn(5, 3, 32, 32)).shape == (5, 10)
    assert n_params(net) == 62006
    net100 = SimpleNetwork(num_classes=100)
    assert net100(torch.randn(2, 3, 32, 32)).shape == (2, 100)
    assert n_params(net100) == 62006 + 90 * 84 + 90


def test_simple_network_rejects_other_sizes():
    with pytest.raises(RuntimeError):
        SimpleNetwork()(torch.randn(1, 1, 28, 28))


def test_mlp_flattens_any_shape():
    m = MLP(64, 10)
    assert m(torch.randn(3, 1, 8, 8)).shape == (3, 10)
    assert m(torch.randn(3, 64)).shape == (3, 10)
    assert n_params(m) == 64 * 64 + 64 + 64 * 10 + 10
    assert n_params(MLP(20, 4, hidden=8)) == 20 * 8 + 8 + 8 * 4 + 4


@pytest.mark.parametrize("side, fc_in", [(8, 32 * 2 * 2), (28, 32 * 7 * 7), (10, 32 * 2 * 2)])
def test_small_cnn_shapes(side, fc_in):
    net = SmallCNN(in_channels=1, num_classes=10, side=side)
    assert net(torch.randn(2, 1, side, side)).shape == (2, 10)
    assert net.fc.in_features == fc_in
    assert n_params(net) == (1 * 16 * 9 + 16) + (16 * 32 * 9 + 32) + (fc_in * 10 + 10)


def test_small_cnn_channels_and_width():
    net = SmallCNN(in_channels=3, num_classes=5, side=16, width=4)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, 5)


@pytest.mark.parametrize("name, shape, cls", [
    ("digits", (1, 8, 8), MLP),
    ("mnist", (1, 28, 28), SmallCNN),
    ("cifar10", (3, 32, 32), SimpleNetwork),
    ("synthetic", (20,), MLP),
])
def test_for_data_auto(name, shape, cls):
    data = fake(name, shape)
    model = for_data(data)
    assert type(model) is cls
    assert model(data.train.x).shape == (len(data.train), data.num_classes)


def test_for_data_on_real_data():
    syn = synthetic(samples=100, features=5, classes=3)
    m = for_data(syn)
    assert isinstance(m, MLP) and m(syn.test.x).shape == (20, 3)
    digits = fake("digits", (1, 8, 8))
    cnn = for_data(digits, "cnn")
    assert isinstance(cnn, SmallCNN) and cnn(digits.train.x).shape == (4, 10)
    assert isinstance(for_data(digits, "mlp"), MLP)
    assert isinstance(for_data(fake("cifar10", (3, 32, 32)), "mlp"), MLP)
    cifar_cnn = for_data(fake("cifar10", (3, 32, 32)), "cnn")
    assert cifar_cnn(torch.zeros(1, 3, 32, 32)).shape == (1, 10)


def test_for_data_uses_num_classes():
    assert for_data(fake("synthetic", (6,), classes=7))(torch.zeros(2, 6)).shape == (2, 7)
    assert for_data(fake("mnist", (1, 28, 28), classes=3))(torch.zeros(2, 1, 28, 28)).shape == (2, 3)


def test_cnn_needs_images():
    with pytest.raises(fedkit.ConfigError, match="'cnn' needs image data") as e:
        for_data(fake("synthetic", (20,)), "cnn")
    assert "(20,)" in str(e.value)


@pytest.mark.parametrize("name, shape", [("digits", (1, 8, 8)), ("mnist", (1, 28, 28)), ("synthetic", (20,))])
def test_simple_needs_cifar_shape(name, shape):
    with pytest.raises(fedkit.ConfigError, match="3x32x32") as e:
        for_data(fake(name, shape), "simple")
    assert repr(name) in str(e.value)


@pytest.mark.parametrize("kind", ["resnet", "MLP", ""])
def test_unknown_model_kind(kind):
    with pytest.raises(fedkit.ConfigError) as e:
        for_data(fake("digits", (1, 8, 8)), kind)
    msg = str(e.value)
    assert repr(kind) in msg and "auto, mlp, cnn, simple" in msg


def test_small_cnn_takes_non_square_images():
    import torch
    from fedkit.models import SmallCNN
    assert SmallCNN(1, 10, side=(8, 12))(torch.zeros(2, 1, 8, 12)).shape == (2, 10)



class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(4, 2)


def _relu_net():
    class Net(_Net):
        def forward(self, x):
            return torch.relu(self.fc(x))
    return Net


def _relu_net_again():
    class Net(_Net):
        def forward(self, x):
            """The same code, with a docstring and a comment."""
            return torch.relu(self.fc(x))  # a comment
    return Net


def _tanh_net():
    class Net(_Net):  # a notebook cell defining Net again, with tanh
        def forward(self, x):
            return torch.tanh(self.fc(x))
    return Net


def test_architecture_tells_activations_apart_as_modules_and_in_forward():
    from fedkit.models import architecture
    relu = architecture(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.ReLU()))
    tanh = architecture(torch.nn.Sequential(torch.nn.Linear(4, 2), torch.nn.Tanh()))
    assert relu["forward"] == tanh["forward"] == {}  # torch's own classes: their repr says it all
    assert relu["modules"] != tanh["modules"] and "ReLU()" in relu["modules"]
    a, b, c = (architecture(cls()) for cls in (_relu_net(), _relu_net_again(), _tanh_net()))
    assert a["modules"] == c["modules"]  # the same layers: only the code of forward tells them apart
    [ha], [hb], [hc] = (list(x["forward"].values()) for x in (a, b, c))
    assert ha == hb and ha != hc and len(ha) == 16  # comments and docstrings aside, the code
    assert architecture(MLP(4, 2))["forward"].keys() == {"MLP"}
