"""The optional packages: a feature that needs one imports it through `require`, which names the extra to install.

``pip install fedkit`` holds what a notebook or ``fedkit run`` needs (torch, numpy, scikit-learn, pandas,
plotly, tqdm, ipywidgets, anywidget); everything else is an extra (README, "Install"). A missing one is
said where the feature is asked for, in the API and the command line alike (`MissingExtra`, a
`ConfigError`: ``fedkit ...`` exits 2 with the install line), never as a bare ``ModuleNotFoundError``.
``tests/test_packaging.py`` reads fedkit's source and fails on an optional import that bypasses `require`.

>>> OPTIONAL["tenseal"]  # the package, and the extra that holds it
('tenseal', 'privacy')
"""

from __future__ import annotations

import importlib
from types import ModuleType

from .errors import MissingExtra

# an optional package's top-level module: (the package to install, the extra of fedkit that holds it)
OPTIONAL = {
    "opacus": ("opacus", "privacy"),
    "tenseal": ("tenseal", "privacy"),
    "torchvision": ("torchvision", "vision"),
    "ray": ("ray", "ray"),
    "nvflare": ("nvflare", "flare"),
}


def require(module: str, feature: str, hint: str = "") -> ModuleType:
    """``module`` (of an `OPTIONAL` package), imported; or `MissingExtra` saying that ``feature`` needs it and which
    extra to install (``hint``: what else the user may do, appended)."""
    top = module.partition(".")[0]
    if top not in OPTIONAL:
        raise ValueError(f"{top} is not an optional package of fedkit (OPTIONAL lists them)")
    package, extra = OPTIONAL[top]
    try:
        return importlib.import_module(module)
    except Exception as e:  # ImportError; or a build for another torch or Python, which fails as it loads
        absent = isinstance(e, ImportError) and (e.name or "").partition(".")[0] == top
        why = "is not installed" if absent else f"could not be imported ({type(e).__name__}: {e})"
        raise MissingExtra(f"{feature} needs {package}, which {why}: pip install 'fedkit[{extra}]'{hint}",
                           extra, package) from None
