"""The control block's protocol as written agrees with the code: the word
table and the layout diagram in ``shmarray.control``'s docstring and in
docs/internals.md name exactly the words the code defines and indexes the
block with, each on the line its constant puts it."""

from __future__ import annotations

import ast
import hashlib
import mmap
import re
import threading
from pathlib import Path

import pytest

from shmarray import atomics, blocks, control

ROOT = Path(__file__).resolve().parent.parent
INTERNALS = (ROOT / "docs" / "internals.md").read_text()
SOURCE = Path(control.__file__).read_text()
DOCSTRING = control.__doc__ or ""

TEXTS = {"control.py": DOCSTRING, "docs/internals.md": INTERNALS}


def _names(cell: str) -> list[str]:
    """The words a table cell or diagram field lists: ``"JOB, PIPED,"``,
    ``"board[k]"``."""
    names = [n.strip() for n in cell.split(",") if n.strip()]
    names = [re.sub(r"\[k\]$", "", n) for n in names]
    for name in names:
        assert re.fullmatch(r"[A-Z_]+|board", name), f"not a word name: {name!r} in {cell!r}"
    return names


def rst_table_words(text: str) -> list[str]:
    """The first column of the docstring's "Who writes what" table."""
    lines = text[text.index("Who writes what") :].splitlines()
    borders = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*=+(\s+=+)+\s*", line)]
    top, _, bottom = borders[:3]
    indent = len(lines[top]) - len(lines[top].lstrip())
    width = len(lines[top].split()[0])
    words = []
    for line in lines[borders[1] + 1 : bottom]:
        words += _names(line[indent : indent + width])
    assert lines[top + 1].split()[0] == "word"
    return words


def md_table_words(text: str) -> list[str]:
    """The first column of internals.md's "Who writes what" table."""
    lines = text[text.index("### Who writes what") :].splitlines()[1:]
    rows = []
    for line in lines:
        if line.startswith("|"):
            rows.append(line)
        elif rows:
            break
    assert rows[0].split("|")[1].strip() == "word"
    return [n for row in rows[2:] for n in _names(row.split("|")[1])]


def diagram_lines(text: str) -> dict[str, str]:
    """Each word of the layout diagram, and the line it is drawn on: ``"0"``
    to ``"3"`` for the shared lines, ``"a"`` or ``"b"`` for a worker's,
    ``"board"``.  A word is in the column that follows ``line N`` (a
    continuation row starts in that column); the writers' column after it
    is prose."""
    start = re.search(r"^[ \t]*line 0 ", text, re.MULTILINE)
    assert start is not None, "no layout diagram (a row starting 'line 0')"
    rows = []
    for row in text[start.start() :].splitlines():
        if not row.strip() or row.strip().startswith("```"):
            break
        rows.append(row)
    found: dict[str, str] = {}
    label = column = None
    for row in rows:
        fields = list(re.finditer(r"\S+(?: \S+)*", row))
        head = re.fullmatch(r"line (\w+)|board|worker i:", fields[0].group())
        if head is not None:
            if head.group() == "board":
                found["board"] = "board"
            label = head.group(1)
            if label is None:
                continue
            column = fields[1].start()
            cell = fields[1].group()
        else:
            cell = next((f.group() for f in fields if f.start() == column), "")
            if label is None or not cell:
                continue
        for name in _names(cell):
            assert name not in found, f"{name} is drawn twice"
            found[name] = label
    return found


def indexed_words() -> set[str]:
    """The names control.py indexes the block with: the index argument of a
    load, store or fetch-and-add given by name, and the name added last to
    a worker's slot (``at + DONE``, ``slot(i) + CHUNK``,
    ``_WORKERS_AT + i * _PER_WORKER + OUTPUT``)."""
    tree = ast.parse(SOURCE)
    accessors = {"_load", "_store", "_fetch_add", "_futex", "load", "store", "fetch_add", "_word"}

    def called(node: ast.Call) -> str:
        f = node.func
        return f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""

    def is_slot(node: ast.AST) -> bool:
        # at, self.at, at[i], slot(i), _WORKERS_AT + i * _PER_WORKER
        if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Add):
            return is_slot(node.left)
        if isinstance(node, ast.Subscript):
            node = node.value
        return (
            (isinstance(node, ast.Name) and node.id in ("at", "_WORKERS_AT"))
            or (isinstance(node, ast.Attribute) and node.attr == "at")
            or (isinstance(node, ast.Call) and called(node) == "slot")
        )

    used = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and called(node) in accessors and len(node.args) > 1:
            index = node.args[1]
            if isinstance(index, ast.Name) and index.id.isupper():
                used.add(index.id)
        if (
            isinstance(node, ast.BinOp)
            and isinstance(node.op, ast.Add)
            and isinstance(node.right, ast.Name)
            and node.right.id.isupper()  # a constant, not ``slot(index) + offset``
            and is_slot(node.left)
        ):
            used.add(node.right.id)
    return used


def test_the_code_indexes_the_block_with_exactly_the_listed_words():
    # A word added to the code but not to control.WORDS (so to no table)
    # fails here; so does a listed word the code never touches.
    assert len(set(control.WORDS)) == len(control.WORDS)
    assert indexed_words() == set(control.WORDS) - {"board"}
    assert set(control.WORDS) == {*control.SHARED_WORDS, *control.WORKER_WORDS, "board"}


def test_the_words_are_distinct_and_fit_their_lines():
    shared = [getattr(control, w) for w in control.SHARED_WORDS]
    own = [getattr(control, w) for w in control.WORKER_WORDS]
    assert all(type(v) is int for v in shared + own)
    assert len(set(shared)) == len(shared) and len(set(own)) == len(own)
    assert all(0 <= v < control._WORKERS_AT for v in shared)
    assert all(0 <= v < control._PER_WORKER for v in own)
    assert control.LINE * 8 == 128  # "a 128-byte line"
    assert control._WORKERS_AT % control.LINE == 0
    assert control._PER_WORKER == 2 * control.LINE  # lines a and b
    # The board: the block's last BOARD_CHUNKS bytes, after the last worker.
    for n in (1, 2, 5):
        assert control.words(n) * 8 - control.BOARD_CHUNKS == control.slot(n) * 8


@pytest.mark.parametrize("where", TEXTS)
def test_the_word_table_names_every_word_once(where):
    text = TEXTS[where]
    words = rst_table_words(text) if where == "control.py" else md_table_words(text)
    assert len(words) == len(set(words)), f"{where}: a word listed twice"
    assert set(words) == set(control.WORDS), (
        f"{where}'s word table: missing {sorted(set(control.WORDS) - set(words))}, "
        f"unknown {sorted(set(words) - set(control.WORDS))}"
    )


@pytest.mark.parametrize("where", TEXTS)
def test_the_layout_diagram_puts_each_word_on_its_line(where):
    drawn = diagram_lines(TEXTS[where])
    assert set(drawn) == set(control.WORDS), (
        f"{where}'s diagram: missing {sorted(set(control.WORDS) - set(drawn))}, "
        f"unknown {sorted(set(drawn) - set(control.WORDS))}"
    )
    shared_lines = set()
    for name, line in drawn.items():
        if name == "board":
            continue
        value = getattr(control, name)
        if name in control.SHARED_WORDS:
            assert line.isdigit(), f"{where}: shared {name} drawn on a worker's line {line}"
            assert value // control.LINE == int(line), f"{where}: {name} is not on line {line}"
            shared_lines.add(int(line))
        else:
            assert line in ("a", "b"), f"{where}: {name} drawn on shared line {line}"
            assert value // control.LINE == "ab".index(line), (
                f"{where}: {name} is not on a worker's line {line}"
            )
    # The worker lines follow the last shared line drawn.
    assert max(shared_lines) + 1 == control._WORKERS_AT // control.LINE


def test_the_diagrams_agree_with_each_other():
    assert diagram_lines(DOCSTRING) == diagram_lines(INTERNALS)


def test_internals_describes_every_storage():
    for kind in ('"shm"', '"memfd"'):
        assert kind in (blocks.__doc__ or "") and kind in INTERNALS


def test_the_primitives_live_in_atomics():
    # control builds on them and defines none of its own.
    for name in ("_load", "_store", "_fetch_add", "_relax", "_sched_yield", "_futex"):
        assert getattr(control, name) is getattr(atomics, name)
    for name in ("_now_ns", "_usleep", "SYS_FUTEX", "FUTEX_WAIT", "FUTEX_WAKE"):
        assert getattr(control, name) is getattr(atomics, name)
    assert "@intrinsic" not in SOURCE and "llvmlite" not in SOURCE


def test_control_carries_the_hash_of_the_atomics_it_inlines():
    # numba's cache checks control.py alone: an edit to atomics.py that left
    # control.py as it was would load the old machine code.
    digest = hashlib.sha256(Path(atomics.__file__).read_bytes()).hexdigest()[:16]
    assert control._ATOMICS_SHA256 == digest, (
        "shmarray/atomics.py changed: set control._ATOMICS_SHA256 to "
        f"{digest!r}, so that numba compiles control's functions again."
    )


def test_output_counts_every_write_from_any_thread():
    # wrote() runs in whatever thread of the worker printed: a load and a
    # store could lose a count; a fetch-and-add cannot.
    buf = mmap.mmap(-1, control.ControlBlock.nbytes(1))
    ctl = control.ControlBlock(buf, 1)
    words = control.WorkerWords(buf, 0)
    per_thread, threads = 20_000, 4
    go = threading.Barrier(threads)

    def write() -> None:
        go.wait()
        for _ in range(per_thread):
            words.wrote()

    pool = [threading.Thread(target=write) for _ in range(threads)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert ctl.output() == per_thread * threads
