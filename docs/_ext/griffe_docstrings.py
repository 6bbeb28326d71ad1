"""A griffe extension that reads shmarray's docstrings as their authors
meant them, before mkdocstrings renders them as Markdown.  The source
docstrings are not touched; only the copy griffe renders is.

Untyped parameter groups.  shmarray's docstrings share one entry among
parameters that mean the same as elsewhere::

    kernel, *arrays, args, halo, chunks
        As for ``map``.

numpydoc reads ``x1, x2 : type`` as one type for every name, and griffe,
given no type, takes the first name's annotation and default for all of
them (so ``halo`` would show as ``Kernel``, required).  Such a group becomes
one entry per name with the same description, so each name gets its own
annotation and default from the signature.  A typed group
(``out, inp : numpy.ndarray``) is left as written.  An entry whose "type"
is a cross-reference (``boundary : as for ``map````) is read the same way:
no type given, the reference moved into the description.

reST left in Markdown.  A Sphinx role (``:func:`total```) becomes plain
code (```total```), and a literal-block marker ``::`` at the end of a line
becomes ``:`` (or nothing after a space), as Sphinx would print them.
"""

from __future__ import annotations

import re

from griffe import Extension

_SECTIONS = {"Parameters", "Other Parameters"}
_UNDERLINE = re.compile(r"\s*-{3,}\s*$")
_GROUP = re.compile(r"(?P<indent>\s*)(?P<names>\*{0,2}\w+(?:, \*{0,2}\w+)+)\s*$")
_AS_FOR = re.compile(r"(?P<indent>\s*)(?P<names>\*{0,2}\w+) : (?P<ref>[Aa]s for .+?)\.?\s*$")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|obj|exc|const):(`[^`]+`)")
_LITERAL = re.compile(r"(?P<space>\s?)::$", re.MULTILINE)


def expand_groups(text: str) -> str:
    """Rewrite the untyped name groups of numpy-style Parameters sections.

    >>> print(expand_groups("Parameters\\n----------\\na, b\\n    As for x."))
    Parameters
    ----------
    a
        As for x.
    b
        As for x.
    >>> print(expand_groups("Parameters\\n----------\\nb : as for ``map``\\n    Refilled."))
    Parameters
    ----------
    b
        As for ``map``.
        Refilled.
    """
    lines = text.split("\n")
    out: list[str] = []
    section = None
    i = 0
    while i < len(lines):
        line = lines[i]
        if i + 1 < len(lines) and _UNDERLINE.match(lines[i + 1]) and line.strip():
            section = line.strip()
        match = None
        if section in _SECTIONS:
            match = _GROUP.match(line) or _AS_FOR.match(line)
        if match is None:
            out.append(line)
            i += 1
            continue
        indent = len(match["indent"])
        j = i + 1
        while (
            j < len(lines) and lines[j].strip() and len(lines[j]) - len(lines[j].lstrip()) > indent
        ):
            j += 1
        description = lines[i + 1 : j]
        if "ref" in match.groupdict():  # "name : as for ``map``": no type given
            first = description[0] if description else " " * (indent + 4)
            pad = first[: len(first) - len(first.lstrip())]
            description = [pad + match["ref"][0].upper() + match["ref"][1:] + "."] + description
        for name in match["names"].split(", "):
            out.append(match["indent"] + name)
            out.extend(description)
        i = j
    return "\n".join(out)


def plain_markdown(text: str) -> str:
    """Sphinx roles to code, ``::`` markers as Sphinx prints them.

    >>> plain_markdown("as in :func:`total`, a :class:`Block`")
    'as in `total`, a `Block`'
    >>> print(plain_markdown("Use it so::\\n\\n    f()\\nthe same as ::"))
    Use it so:
    <BLANKLINE>
        f()
    the same as
    """
    text = _ROLE.sub(r"\1", text)
    return _LITERAL.sub(lambda m: "" if m["space"] else ":", text)


class ShmarrayDocstrings(Extension):
    """Rewrite every docstring's rendered copy as described above."""

    def on_object(self, *, obj, **kwargs) -> None:
        doc = obj.docstring
        if doc is None:
            return
        text = plain_markdown(doc.value)
        if obj.is_function and ", " in text:
            text = expand_groups(text)
        doc.value = text
