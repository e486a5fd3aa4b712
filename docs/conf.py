"""Sphinx configuration for the twisted_smtpd documentation.

Build with::

    pip install sphinx
    python -m sphinx -W -b html docs docs/_build/html
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
import zlib

# Document the code in this checkout, not an installed copy.
sys.path.insert(0, os.path.abspath(os.path.join(os.path.dirname(__file__), "..")))

import twisted_smtpd  # noqa: E402

project = "twisted_smtpd"
author = "the twisted_smtpd authors"
copyright = "the twisted_smtpd authors"
release = twisted_smtpd.__version__
version = ".".join(release.split(".")[:2])

extensions = [
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.intersphinx",
]

exclude_patterns = ["_build"]
templates_path: list[str] = []
html_static_path: list[str] = []
html_theme = "alabaster"
html_title = f"twisted_smtpd {release}"

# -- autodoc / napoleon -------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "description"
autodoc_default_options = {"show-inheritance": False}
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# -- intersphinx --------------------------------------------------------------
# The documentation must build offline (and with -W).  Intersphinx tries each
# location of a project in turn and only warns when *all* of them fail, so
# every project gets a second, local location: an empty inventory written
# here.  Online, links into Python and Twisted resolve; offline, they render
# as plain text and the build stays warning-free.


def _empty_inventory() -> str:
    path = os.path.join(tempfile.gettempdir(), "twisted_smtpd-empty-objects.inv")
    header = (
        b"# Sphinx inventory version 2\n"
        b"# Project: none\n"
        b"# Version: 0\n"
        b"# The remainder of this file is compressed using zlib.\n"
    )
    with open(path, "wb") as file:
        file.write(header + zlib.compress(b""))
    return path


_EMPTY = _empty_inventory()
intersphinx_mapping = {
    "python": ("https://docs.python.org/3", (None, _EMPTY)),
    "twisted": ("https://docs.twisted.org/en/stable/api/", (None, _EMPTY)),
}
intersphinx_timeout = 10

# -- epytext markup in docstrings ----------------------------------------------
# The code uses Twisted's epytext inline markup (C{...}, L{...}, I{...}) inside
# Google-style sections.  Turn it into reStructuredText before napoleon runs.

_PUBLIC = set(twisted_smtpd.__all__)
_MARKUP = re.compile(r"([CLIBU])\{")


def _target(name: str) -> str:
    if name in _PUBLIC:
        return f"~twisted_smtpd.{name}"
    return name


def _convert(kind: str, body: str) -> str:
    body = body.strip()
    if kind == "C":
        return f"``{body}``"
    if kind == "I":
        return f"*{body}*"
    if kind == "B":
        return f"**{body}**"
    if kind == "U":
        return f"`<{body}>`_"
    # L{...}: a cross-reference, maybe L{text <target>}.
    match = re.fullmatch(r"(.+?)\s*<([\w.]+)>", body, re.DOTALL)
    if match:
        return f":py:obj:`{match.group(1)} <{match.group(2)}>`"
    return f":py:obj:`{_target(body)}`"


def epytext_to_rst(text: str) -> str:
    """Replace epytext inline markup, allowing nested braces inside it."""
    out = []
    pos = 0
    while True:
        match = _MARKUP.search(text, pos)
        if match is None:
            out.append(text[pos:])
            return "".join(out)
        depth = 1
        index = match.end()
        while index < len(text) and depth:
            if text[index] == "{":
                depth += 1
            elif text[index] == "}":
                depth -= 1
            index += 1
        if depth:  # unbalanced: leave it alone
            out.append(text[pos : match.end()])
            pos = match.end()
            continue
        out.append(text[pos : match.start()])
        out.append(_convert(match.group(1), text[match.end() : index - 1]))
        pos = index


def _literal_examples(lines: list[str]) -> list[str]:
    """Module docstrings show examples as bare indented blocks: make them
    literal blocks (``::``) so the code is shown as written."""
    out: list[str] = []
    for index, line in enumerate(lines):
        indented = line.startswith((" ", "\t")) and line.strip()
        after_blank = index >= 2 and not lines[index - 1].strip()
        previous = lines[index - 2] if index >= 2 else ""
        if (
            indented
            and after_blank
            and previous.strip()
            and not previous.startswith((" ", "\t"))
            and not previous.rstrip().endswith("::")
        ):
            out[-1:] = ["::", ""]
        out.append(line)
    return out


def _process_docstring(app, what, name, obj, options, lines):  # noqa: ANN001
    if what == "module":
        # Literal blocks keep their text as written, so do these first.
        lines[:] = _literal_examples(lines)
    text = "\n".join(lines)
    # Epytext markup outside literal blocks only: split on "::" blocks.
    lines[:] = _convert_outside_literals(text).split("\n")


def _convert_outside_literals(text: str) -> str:
    out: list[str] = []
    prose: list[str] = []
    in_literal = False
    for line in text.split("\n"):
        if in_literal and line.strip() and not line.startswith((" ", "\t")):
            in_literal = False
        if in_literal:
            out.append(line)
            continue
        prose.append(line)
        if line.rstrip().endswith("::"):
            out.append(epytext_to_rst("\n".join(prose)))
            prose = []
            in_literal = True
    if prose:
        out.append(epytext_to_rst("\n".join(prose)))
    return "\n".join(out)


# -- the reply table, generated from twisted_smtpd.replies --------------------

from docutils import nodes  # noqa: E402
from docutils.statemachine import StringList  # noqa: E402
from sphinx.util.docutils import SphinxDirective  # noqa: E402


class ReplyTable(SphinxDirective):
    """``.. smtpd-reply-table::``: every ``R...`` constant of the replies module."""

    def run(self):  # noqa: ANN201
        from twisted_smtpd import replies

        rows = [
            (name, value)
            for name, value in vars(replies).items()
            if name.startswith("R") and isinstance(value, replies.Reply)
        ]
        rows.sort(key=lambda row: (row[1].code, row[0]))
        lines = [
            ".. list-table::",
            "   :header-rows: 1",
            "   :widths: 35 8 10 47",
            "",
            "   * - Constant",
            "     - Code",
            "     - Enhanced",
            "     - Text",
        ]
        for name, reply in rows:
            text = reply.text.replace("\n", " / ")
            lines += [
                f"   * - ``{name}``",
                f"     - {reply.code}",
                f"     - {reply.enhanced or '—'}",
                f"     - ``{text}``",
            ]
        container = nodes.container()
        self.state.nested_parse(
            StringList(lines, source="twisted_smtpd.replies"), 0, container
        )
        return container.children


def setup(app):  # noqa: ANN001, ANN201
    # Before napoleon (priority 500), so it sees reStructuredText.
    app.connect("autodoc-process-docstring", _process_docstring, priority=100)
    app.add_directive("smtpd-reply-table", ReplyTable)
    return {"parallel_read_safe": True}
