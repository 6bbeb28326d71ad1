"""How an Engine shows itself in a notebook: ``Engine._repr_html_``.

A small HTML summary built from the public surface only (``stats()``,
``blocks``, ``workers``, ``start_method``, ``wait``): one row per worker
(pid, RSS and unique memory (USS), chunks run, kernels installed, busy
time, replacements) and the shared blocks
with their total size.  Every value is escaped, and nothing here raises: a
notebook asks for the HTML whenever the engine is a cell's value, closed or
not, and a failure would hide the cell's output.
"""

from __future__ import annotations

import html
from typing import Any

from shmarray.blocks import format_bytes

# Blocks listed one by one; past this, a line says how many more.
BLOCKS_SHOWN = 10

_STYLE = "text-align: right; padding: 0 0.6em"


def engine_html(engine: Any) -> str:
    """The HTML for ``engine`` (an :class:`shmarray.Engine`): a closed
    engine says so; one that cannot be read here (a forked child's copy,
    or closing meanwhile) falls back to its ``repr``."""
    try:
        if engine.closed:
            return _box(
                "shmarray.Engine", "<p>closed: its blocks are unlinked and its workers stopped</p>"
            )
        return _live(engine)
    except Exception:
        return f"<pre>{html.escape(repr(engine))}</pre>"


def _live(engine: Any) -> str:
    stats = engine.stats()
    blocks = engine.blocks
    title = (
        f"shmarray.Engine: {engine.workers} workers "
        f"(start method {engine.start_method}, wait {engine.wait})"
    )
    # Short headers: the table fits a notebook's column and a phone.
    head = ("worker", "pid", "RSS", "USS", "chunks", "kernels", "busy", "replaced")
    rows = [
        (
            s.worker,
            s.pid,
            format_bytes(s.rss),
            format_bytes(s.uss),
            s.tasks,
            s.kernels,
            f"{s.busy:.2f} s",
            s.replaced,
        )
        for s in stats
    ]
    workers = _table(head, rows)
    total = sum(b.size for b in blocks)
    shown = [(b.name, format_bytes(b.size)) for b in blocks[:BLOCKS_SHOWN]]
    parts = [
        workers,
        f"<p>{len(blocks)} shared block{'s' if len(blocks) != 1 else ''}, "
        f"{_e(format_bytes(total))} in all</p>",
    ]
    if shown:
        parts.append(_table(("block", "size"), shown))
        if len(blocks) > BLOCKS_SHOWN:
            parts.append(f"<p>... and {len(blocks) - BLOCKS_SHOWN} more</p>")
    return _box(title, "".join(parts))


def _e(value: object) -> str:
    return html.escape(str(value))


def _table(head: tuple[str, ...], rows: list[tuple]) -> str:
    th = "".join(f'<th style="{_STYLE}">{_e(h)}</th>' for h in head)
    body = "".join(
        "<tr>" + "".join(f'<td style="{_STYLE}">{_e(v)}</td>' for v in row) + "</tr>"
        for row in rows
    )
    # As wide as its columns (a notebook's CSS may stretch tables to 100%).
    return (
        f'<table style="width: auto; margin: 0"><thead><tr>{th}</tr></thead>'
        f"<tbody>{body}</tbody></table>"
    )


def _box(title: str, body: str) -> str:
    # Wider than the page (a phone), it scrolls inside its own box.
    return (
        f'<div class="shmarray-engine" style="overflow-x: auto; max-width: 100%">'
        f"<strong>{_e(title)}</strong>{body}</div>"
    )
