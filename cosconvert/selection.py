"""Which layers and calls the user asked to convert: ``convert(include=..., exclude=...)``.

A pattern is a glob over the fully-qualified name (``"layer4.*"``; a functional call is named
``module.path.node_name``) or a module type. A layer is selected when it matches ``include``
(if given) and not ``exclude``. Both the module walk and the graph rewrite ask the same
:class:`Selection`, fallbacks included, so a layer is never converted while reported skipped.
"""

from __future__ import annotations

import fnmatch

from torch import nn

from cosconvert.config import CosineConfig

# The reason a layer the user left out is listed as skipped.
EXCLUDED = "excluded by include/exclude"


class Selection:
    def __init__(self, config: CosineConfig) -> None:
        self.include, self.exclude = config.include, config.exclude

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
