"""A griffe extension for the API reference: Sphinx roles in docstrings become code spans.

The docstrings follow the Google style but name other objects with Sphinx roles
(``:func:`orthoptim.param_groups```), which markdown would print as they are. This turns them
into plain code spans (`orthoptim.param_groups`); a cross-link could point at an object the
reference does not document.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|data|attr|obj|exc):`~?([^`]+)`")


class SphinxRoles(griffe.Extension):
    def on_instance(self, *, obj: griffe.Object, **kwargs: Any) -> None:
        if obj.docstring is not None:
            obj.docstring.value = ROLE.sub(r"`\1`", obj.docstring.value)
