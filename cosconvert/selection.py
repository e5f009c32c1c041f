"""Which layers and calls the user asked to convert: ``convert(include=..., exclude=...)``.

A pattern is a glob over the fully-qualified name (``"layer4.*"``; a functional call is named
``module.path.node_name``) or a module type. A layer is selected when it matches ``include``
(if given) and not ``exclude``. Both the module walk and the graph rewrite ask the same
:class:`Selection`, fallbacks included, so a layer is never converted while reported skipped.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence

from torch import nn

# The reason a layer the user left out is listed as skipped.
EXCLUDED = "excluded by include/exclude"


class Selection:
    def __init__(self, include: Sequence[str | type] | None, exclude: Sequence[str | type] | None) -> None:
        self.include, self.exclude = include, exclude

    def __call__(self, name: str, module: nn.Module | None) -> bool:
        """True if the layer (or functional call, ``module`` None) named ``name`` is to be converted."""

        def matches(patterns) -> bool:
            return any(
                fnmatch.fnmatchcase(name, p) if isinstance(p, str) else module is not None and isinstance(module, p)
                for p in patterns
            )

        if self.include is not None and not matches(self.include):
            return False
        return not (self.exclude is not None and matches(self.exclude))


def pattern_names(patterns: Sequence[str | type] | None) -> list[str] | None:
    """``patterns`` as plain strings for the report: a type as ``module:QualName``."""
    if patterns is None:
        return None
    return [p if isinstance(p, str) else f"{p.__module__}:{p.__qualname__}" for p in patterns]
