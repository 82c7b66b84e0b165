"""MkDocs hook: Sphinx roles in docstrings become links in the API reference.

gridfl's docstrings use Sphinx roles (``:class:`~gridfl.Syft```), which Markdown renders
as ``:class:<code>~gridfl.Syft</code>``. This turns each into an optional autorefs
reference: a link when the name is documented, plain code when it is not (no warning).
The reST ``Example::`` that opens a literal block loses its second colon.
"""

from __future__ import annotations

import html
import re

_ROLE = re.compile(
    r":(?:py:)?(?:class|func|meth|attr|data|mod|exc|obj|const):<code>(~?)([^<]+)</code>"
)


def _autoref(match: re.Match[str]) -> str:
    short, name = match.group(1), html.unescape(match.group(2)).strip()
    title = name.rsplit(".", 1)[-1] if short else name
    ident, code = html.escape(name), html.escape(title)
    return f'<autoref identifier="{ident}" optional><code>{code}</code></autoref>'


def on_page_content(html_text: str, **kwargs: object) -> str:
    return _ROLE.sub(_autoref, html_text).replace("::</p>", ":</p>")
