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

Keywords typed as one ``TypedDict``.  ``map`` and its kin take their
keywords as ``**options: Unpack[MapOptions]``, so that a type checker
names a misspelt one; the page shows them as the keyword-only parameters
they are, each with its type from the ``TypedDict`` and its default from
``CallOptions`` (``args``: ``()``, ``combine``: ``operator.add``).

reST left in Markdown.  A Sphinx role (``:func:`total```) becomes plain
code (```total```), and a literal-block marker ``::`` at the end of a line
becomes ``:`` (or nothing after a space), as Sphinx would print them.
"""

from __future__ import annotations

import re

from griffe import Extension, Parameter, ParameterKind

_SECTIONS = {"Parameters", "Other Parameters"}
_UNDERLINE = re.compile(r"\s*-{3,}\s*$")
_GROUP = re.compile(r"(?P<indent>\s*)(?P<names>\*{0,2}\w+(?:, \*{0,2}\w+)+)\s*$")
_AS_FOR = re.compile(r"(?P<indent>\s*)(?P<names>\*{0,2}\w+) : (?P<ref>[Aa]s for .+?)\.?\s*$")
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|attr|data|mod|obj|exc|const):(`[^`]+`)")
_LITERAL = re.compile(r"(?P<space>\s?)::$", re.MULTILINE)
_UNPACK = re.compile(r"Unpack\[(?P<name>\w+)\]")
# Defaults of the keywords that are not fields of CallOptions.
_OTHER_DEFAULTS = {"args": "()", "combine": "operator.add"}


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


def typed_keywords(typed_dict, defaults: dict) -> list:
    """The keys of a griffe ``TypedDict`` class (its bases' first) as
    keyword-only parameters."""
    fields: dict = {}
    for base in reversed(typed_dict.mro()):
        fields.update(
            (name, member) for name, member in base.members.items() if member.is_attribute
        )
    fields.update((n, m) for n, m in typed_dict.members.items() if m.is_attribute)
    return [
        Parameter(
            name,
            annotation=member.annotation,
            kind=ParameterKind.keyword_only,
            default=defaults.get(name),
        )
        for name, member in fields.items()
    ]


def unpack_options(obj, options_module) -> None:
    """Replace every ``**options: Unpack[X]`` under ``obj`` with X's keys."""
    for member in list(obj.members.values()):
        if member.is_alias:
            continue
        if member.is_class or member.is_module:
            unpack_options(member, options_module)
        if not member.is_function:
            continue
        params = list(member.parameters)
        last = params[-1] if params else None
        if last is None or last.kind is not ParameterKind.var_keyword:
            continue
        match = _UNPACK.search(str(last.annotation))
        if match is None or match["name"] not in options_module.members:
            continue
        defaults = {
            name: str(field.value)
            for name, field in options_module["CallOptions"].members.items()
            if field.is_attribute and field.value is not None
        } | _OTHER_DEFAULTS
        keywords = typed_keywords(options_module[match["name"]], defaults)
        named = {p.name for p in params}
        member.parameters = type(member.parameters)(
            *params[:-1], *(k for k in keywords if k.name not in named)
        )


class ShmarrayDocstrings(Extension):
    """Rewrite every docstring's rendered copy as described above."""

    def on_package(self, *, pkg, **kwargs) -> None:
        if pkg.path == "shmarray" and "options" in pkg.members:
            unpack_options(pkg, pkg["options"])

    def on_object(self, *, obj, **kwargs) -> None:
        doc = obj.docstring
        if doc is None:
            return
        text = plain_markdown(doc.value)
        if obj.is_function and ", " in text:
            text = expand_groups(text)
        doc.value = text
