"""Models: the classic CIFAR-10 `SimpleNetwork`, and small nets sized for the offline datasets."""

from __future__ import annotations

import ast
import hashlib
import inspect
import math
import textwrap
from typing import Any, Callable

import torch
from torch import nn
import torch.nn.functional as F

from .data import Data
from .errors import ConfigError


class SimpleNetwork(nn.Module):
    """The CIFAR-10 CNN of the PyTorch tutorial and NVFlare's examples: conv 6, conv 16, fc 120-84-10.

    Takes 3x32x32 images; about 62k parameters.
    """

    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.num_classes = num_classes  # the constructor's arguments, kept: how NVFlare's job API describes a model
        self.conv1 = nn.Conv2d(3, 6, 5)
        self.pool = nn.MaxPool2d(2, 2)
        self.conv2 = nn.Conv2d(6, 16, 5)
        self.fc1 = nn.Linear(16 * 5 * 5, 120)
        self.fc2 = nn.Linear(120, 84)
        self.fc3 = nn.Linear(84, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        x = torch.flatten(x, 1)
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class MLP(nn.Module):
    """A one-hidden-layer perceptron over flattened inputs: quick on CPU, strong enough for digits."""

    def __init__(self, in_features: int, num_classes: int, hidden: int = 64) -> None:
        super().__init__()
        self.in_features, self.num_classes, self.hidden = in_features, num_classes, hidden  # see SimpleNetwork
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.relu(self.fc1(torch.flatten(x, 1))))


class SmallCNN(nn.Module):
    """Two 3x3 conv layers and a linear head for small single-channel images (digits 8x8, MNIST 28x28)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10, side: int | tuple[int, int] = 8,
                 width: int = 16) -> None:
        super().__init__()
        self.in_channels, self.num_classes, self.side, self.width = in_channels, num_classes, side, width  # ditto
        h, w = (side, side) if isinstance(side, int) else side
        if h < 4 or w < 4:
            raise ConfigError(f"SmallCNN needs images of at least 4x4 pixels, got {h}x{w}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, padding=1)
        self.conv2 = nn.Conv2d(width, 2 * width, 3, padding=1)
        self.pool = nn.MaxPool2d(2)
        self.fc = nn.Linear(2 * width * (h // 4) * (w // 4), num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.pool(F.relu(self.conv1(x)))
        x = self.pool(F.relu(self.conv2(x)))
        return self.fc(torch.flatten(x, 1))


def for_data(data: Data, kind: str = "auto") -> nn.Module:
    """A sensible model for ``data``: ``"mlp"``, ``"cnn"`` (SmallCNN) or ``"simple"`` (SimpleNetwork).

    ``"auto"`` picks SimpleNetwork for 3x32x32 images, SmallCNN for other images, and an MLP for vectors.
    """
    shape = data.input_shape
    if kind == "auto":
        kind = "simple" if shape == (3, 32, 32) else "cnn" if len(shape) == 3 and data.name != "digits" else "mlp"
    if kind == "mlp":
        return MLP(math.prod(shape), data.num_classes)
    if kind == "cnn":
        if len(shape) != 3:
            raise ConfigError(f"model 'cnn' needs image data (C,H,W); {data.name!r} has shape {shape}")
        return SmallCNN(shape[0], data.num_classes, side=(shape[1], shape[2]))
    if kind == "simple":
        if shape != (3, 32, 32):
            raise ConfigError(f"model 'simple' (SimpleNetwork) needs 3x32x32 images such as cifar10; "
                              f"{data.name!r} has shape {shape}")
        return SimpleNetwork(data.num_classes)
    raise ConfigError(f"unknown model {kind!r}; choose one of: auto, mlp, cnn, simple")


def architecture(model: nn.Module) -> dict[str, Any]:
    """What ``model`` computes, as a run records it in ``config.json`` and a resume checks it: ``modules``, the
    model's ``repr`` (its layers, their sizes, and activations that are modules: ``nn.ReLU()`` vs ``nn.Tanh()``),
    and ``forward``, per class of its own (not torch's) a hash of the code of its ``forward`` (where an activation
    called as a function, ``F.relu`` vs ``torch.tanh``, shows). The hash is of the code, not its text: comments,
    docstrings and layout may change.

    Not seen: what ``forward`` reaches outside its own class's code (a helper function, a global, a function kept
    in an attribute), and a ``forward`` whose source Python cannot find (its hash is None).
    """
    own = {type(m) for m in model.modules() if not getattr(type(m).forward, "__module__", "").startswith("torch.")}
    return {"modules": repr(model),
            "forward": {cls.__qualname__: _code_hash(cls.forward) for cls in sorted(own, key=lambda c: c.__qualname__)}}


def _code_hash(fn: Callable[..., Any]) -> str | None:
    """A hash of ``fn``'s code as Python parses it (no comments, docstring or layout), or None without a source."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return None
    for node in ast.walk(tree):
        body = getattr(node, "body", None)
        if (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and body
                and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant)
                and isinstance(body[0].value.value, str)):
            node.body = body[1:] or [ast.Pass()]
    return hashlib.sha256(ast.dump(tree).encode()).hexdigest()[:16]
