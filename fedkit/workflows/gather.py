"""Gather, kept here for code that imports it from the workflows: it lives in `fedkit.rounds`, under `Round`.

>>> from fedkit.workflows.gather import needed
>>> needed(None, 5), needed(3, 5), needed(3, 2)
(5, 3, 2)
"""

from ..rounds import gather, needed

__all__ = ["gather", "needed"]
