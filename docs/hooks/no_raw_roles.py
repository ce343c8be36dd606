"""MkDocs hook: a Sphinx role left in a page (``:func:`name```) is a warning, so ``mkdocs build --strict`` fails.

The API reference is rendered from docstrings as Markdown, where a Sphinx role is not markup: it reaches the reader
as raw text. A cross-reference is written ``[`name`][full.dotted.path]`` (a link to the object's entry), a name
without an entry as plain ``name`` in backquotes.
"""

from __future__ import annotations

import html
import logging
import re
from typing import Any

log = logging.getLogger("mkdocs.plugins.no_raw_roles")

#: ``:role:`target``` (``:py:func:`` too) as it reads in the rendered page: Markdown has turned the backquoted
#: target into ``<code>``; inside a code block the backquotes stay.
RAW_ROLE = re.compile(r"(?<![\w:]):((?:[a-z]+:)?[a-z]+):(?:<code>([^<]*)</code>|`([^`<]+)`)")


def raw_roles(content: str) -> list[str]:
    """The Sphinx roles in a page's rendered HTML, as they were written (``:func:`name```)."""
    return [f":{m.group(1)}:`{html.unescape(m.group(2) or m.group(3) or '')}`" for m in RAW_ROLE.finditer(content)]


def on_page_content(html_content: str, page: Any, **kwargs: Any) -> str:
    roles = raw_roles(html_content)
    for role in dict.fromkeys(roles):
        log.warning("%s: raw Sphinx role %s (%d time(s)): write [`name`][full.dotted.path] to link to its entry, "
                    "or `name` for plain code", page.file.src_uri, role, roles.count(role))
    return html_content
