"""MkDocs hook: render the Sphinx roles of shoal's docstrings (``:func:`shoal.map```).

The docstrings follow the NumPy style of scientific Python, whose cross-references are Sphinx
roles. mkdocstrings leaves them as text (``:func:map``), so this turns each one into a link to the
API reference when it names a ``shoal`` object, and into plain code otherwise.
"""

from __future__ import annotations

import re
from typing import Any

_ROLE = re.compile(r":(?:func|class|meth|mod|data|attr|exc|obj):<code>(~?)([^<]+)</code>")


def _replace(match: re.Match[str]) -> str:
    short, name = match.group(1), match.group(2)
    title = name.rsplit(".", 1)[-1] if short else name
    if name.startswith("shoal."):
        # autorefs resolves the identifier after every page is built; "optional" leaves a
        # name it cannot find (a private module) as plain code instead of failing the build.
        return f'<autoref identifier="{name}" optional><code>{title}</code></autoref>'
    return f"<code>{title}</code>"


def on_page_content(html: str, **kwargs: Any) -> str:
    return _ROLE.sub(_replace, html)
