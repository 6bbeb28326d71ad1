"""What workers print and log, brought to the caller.

In a worker, file descriptors 1 and 2 are pipes to the coordinator, and
``sys.stdout``/``sys.stderr`` are :class:`Tagged` streams: each line starts
with ``[worker 1 rows 256:512]`` and is written to the pipe at once, with no
buffer in the worker, so a line printed right before a segfault is not lost.
numba's ``print`` in nopython mode writes through ``sys.stdout``, so it is
tagged too; output from C code that writes to the descriptors directly
arrives untagged.

Python ``logging`` records travel as records, as with
``logging.handlers.QueueHandler``: the worker's root handler
(:class:`RecordHandler`) writes each one as a single framed line on the
stderr pipe (:data:`RECORD_MARK`, then the record's attributes as JSON),
and the coordinator hands it to ``logging.getLogger(record.name)`` there,
so the caller's levels, filters and handlers apply.  The worker and rows
are in the message prefix and in the attributes ``shmarray_worker`` and
``shmarray_rows``.  Workers start with the caller's logger levels as they
were when the engine started (:func:`caller_levels`), so a record nobody
would show costs nothing to send.

In the coordinator, the :class:`Forwarder` holds every worker's pipes and
writes what comes to the caller's ``sys.stdout``/``sys.stderr`` as they are
at that moment (a notebook's streams, in a notebook).  The driver reads the
pipes while it waits for a map and drains them when the map ends, so what a
map printed shows before the map returns, in the cell that ran it.
"""

from __future__ import annotations

import codecs
import io
import json
import logging
import os
import select
import sys
import threading
from collections.abc import Callable

# Starts a line on a worker's stderr pipe that holds a logging record.  A
# worker's own lines start with its tag, so only C code writing to the
# descriptor directly could forge one, and it would have to mean to.
RECORD_MARK = "\x1eshmarray-record "


class Tagged(io.TextIOBase):
    """A text stream that writes to file descriptor ``fd`` unbuffered, each
    line prefixed with the worker and the rows it is computing."""

    encoding = "utf-8"  # shadows TextIOBase's read-only one

    def __init__(
        self,
        fd: int,
        worker: int,
        rows: Callable[[], tuple | None],
        name: str,
        wrote: Callable[[], None] = lambda: None,
    ):
        self._fd = fd
        self._worker = worker
        self._rows = rows
        self.name = name
        self._wrote = wrote
        self._at_line_start = True

    def fileno(self) -> int:
        return self._fd

    def writable(self) -> bool:
        return True

    def isatty(self) -> bool:
        return False

    def prefix(self) -> str:
        rows = self._rows()
        if rows is None:
            return f"[worker {self._worker}] "
        return f"[worker {self._worker} rows {rows[0]}:{rows[1]}] "

    def write(self, text: str) -> int:
        if not isinstance(text, str):
            raise TypeError(f"write() argument must be str, not {type(text).__name__}")
        if not text:
            return 0
        parts = []
        for line in text.splitlines(keepends=True):
            if self._at_line_start:
                parts.append(self.prefix())
            parts.append(line)
            self._at_line_start = line.endswith(("\n", "\r"))
        self._send("".join(parts).encode("utf-8", "backslashreplace"))
        return len(text)

    def write_line(self, line: str) -> None:
        """``line`` (ending in a newline) as it is, untagged, on a line of
        its own: a line begun by a ``print(..., end="")`` is ended first."""
        if not self._at_line_start:
            line = "\n" + line
            self._at_line_start = True
        self._send(line.encode("ascii", "backslashreplace"))

    def _send(self, data: bytes) -> None:
        while data:
            try:
                data = data[os.write(self._fd, data) :]
            except InterruptedError:
                continue
            except OSError:
                break  # the coordinator is gone: nobody to tell
        self._wrote()  # after the write: the driver then finds it

    def flush(self) -> None:
        pass  # nothing is held


_streams: tuple[Tagged, ...] = ()


def end_lines() -> None:
    """End a line a chunk left begun (``print(..., end="")``), so the next
    chunk's output starts on a line of its own, with its own tag."""
    for stream in _streams:
        if not stream._at_line_start:
            stream.write("\n")


def install_in_worker(
    worker: int,
    rows: Callable[[], tuple | None],
    log_levels: int | dict[str, int],
    wrote: Callable[[], None] = lambda: None,
) -> None:
    """Tag this worker's ``sys.stdout``/``sys.stderr``; send ``logging``
    records to the coordinator as records (:class:`RecordHandler`), the
    loggers set to ``log_levels`` (:func:`caller_levels`; an int: the root
    level alone).  ``wrote()`` runs after each write (it counts them in the
    control block, so the driver's lean path knows there is output to
    forward)."""
    global _streams
    sys.stdout = Tagged(1, worker, rows, "<stdout>", wrote)
    sys.stderr = Tagged(2, worker, rows, "<stderr>", wrote)
    _streams = (sys.stdout, sys.stderr)
    if isinstance(log_levels, int):
        log_levels = {"": log_levels}
    # A forked worker inherits the caller's handlers: they would write here
    # what the caller's own handlers then write again.  The coordinator is
    # the one place records are handled.
    for logger in list(logging.root.manager.loggerDict.values()):
        if isinstance(logger, logging.Logger):
            logger.handlers[:] = [h for h in logger.handlers if isinstance(h, logging.NullHandler)]
    for name, level in log_levels.items():
        logging.getLogger(name or None).setLevel(level)
    logging.root.handlers[:] = [RecordHandler(sys.stderr, worker, rows)]


def caller_levels() -> dict[str, int]:
    """The caller's logger levels now, for the workers: the root's effective
    level (``""``) and every logger's level that was set.  A worker sends
    what these let through; the caller's handlers and filters judge the
    rest."""
    levels = {"": logging.root.getEffectiveLevel()}
    for name, logger in list(logging.root.manager.loggerDict.items()):
        if isinstance(logger, logging.Logger) and logger.level != logging.NOTSET:
            levels[name] = logger.level
    return levels


# The longest record line sent; a record with a longer message or
# traceback has them cut to fit (the forwarder passes longer lines on in
# pieces, as text).
RECORD_LIMIT = 60_000

# LogRecord attributes made again in the coordinator, not sent.
_NOT_SENT = {"args", "exc_info", "msg", "message", "asctime"}


class RecordHandler(logging.Handler):
    """A worker's one logging handler: each record goes to the coordinator,
    whole, as one line on the stderr pipe (see :func:`encode_record`)."""

    def __init__(self, stream: Tagged, worker: int, rows: Callable[[], tuple | None]):
        super().__init__()
        self._stream = stream
        self._worker = worker
        self._rows = rows

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self._stream.write_line(encode_record(record, self._worker, self._rows()))
        except Exception:
            self.handleError(record)


def encode_record(record: logging.LogRecord, worker: int, rows: tuple | None) -> str:
    """``record`` as one line: :data:`RECORD_MARK` and JSON (ASCII only),
    as ``QueueHandler.prepare`` would leave it: the message formatted with
    its arguments (and the worker's tag in front), the traceback as text in
    ``exc_text``, attributes that are not plain values as their ``repr``.

    >>> r = logging.LogRecord("m", logging.WARNING, "f.py", 3, "at %d", (7,), None)
    >>> line = encode_record(r, 1, (0, 4))
    >>> back = decode_record(line)
    >>> back.getMessage(), back.levelname, back.shmarray_worker, back.shmarray_rows
    ('[worker 1 rows 0:4] at 7', 'WARNING', 1, (0, 4))
    """
    tag = f"[worker {worker}] " if rows is None else f"[worker {worker} rows {rows[0]}:{rows[1]}] "
    message = tag + record.getMessage()
    exc_text = record.exc_text
    if record.exc_info and not exc_text:
        exc_text = logging.Formatter().formatException(record.exc_info)
    fields = {}
    for key, value in record.__dict__.items():
        if key in _NOT_SENT:
            continue
        if value is not None and not isinstance(value, (str, int, float, bool)):
            value = repr(value)
        fields[key] = value
    fields.update(
        msg=message,
        exc_text=exc_text,
        shmarray_worker=worker,
        shmarray_rows=list(rows) if rows is not None else None,
    )
    line = json.dumps(fields)
    while len(line) > RECORD_LIMIT:
        # Cut the two fields that can be long, keeping their starts.
        over = len(line) - RECORD_LIMIT
        for key in ("msg", "exc_text", "stack_info"):
            text = fields.get(key)
            if text and len(text) > 1000:
                keep = max(len(text) - over - 100, 500)
                fields[key] = f"{text[:keep]} ... [{len(text) - keep} characters cut]"
        shorter = json.dumps(fields)
        if len(shorter) >= len(line):
            break
        line = shorter
    return RECORD_MARK + line + "\n"


def decode_record(line: str) -> logging.LogRecord:
    """The record :func:`encode_record` wrote (its line, mark included)."""
    fields = json.loads(line[len(RECORD_MARK) :])
    if not isinstance(fields, dict):
        raise ValueError("not a record")
    rows = fields.get("shmarray_rows")
    fields["shmarray_rows"] = tuple(rows) if rows is not None else None
    fields["args"] = None
    fields["exc_info"] = None
    record = logging.makeLogRecord(fields)
    record.msg = str(record.msg)
    record.levelno = int(record.levelno)
    return record


def handle_record(line: str) -> bool:
    """Hand a worker's record to the caller's logger of its name, if that
    logger is enabled for its level now; False if ``line`` is no record."""
    try:
        record = decode_record(line)
    except (ValueError, TypeError, AttributeError):
        return False
    logger = logging.getLogger(record.name)
    if logger.isEnabledFor(record.levelno):
        logger.handle(record)
    return True


def _write(name: str, text: str) -> None:
    """To the caller's ``sys.stdout`` or ``sys.stderr`` as it is now; the
    records among stderr's lines to the caller's loggers, in order."""
    if name == "stderr" and RECORD_MARK in text:
        plain: list[str] = []
        # Not splitlines(): it also splits at the mark's \x1e.
        pieces = text.split("\n")
        lines = [p + "\n" for p in pieces[:-1]] + [pieces[-1]]
        for line in lines:
            if line.startswith(RECORD_MARK) and line.endswith("\n"):
                _put(name, "".join(plain))
                plain = []
                try:
                    if handle_record(line):
                        continue
                except Exception:
                    continue  # a caller's filter or handler failed
            plain.append(line)
        text = "".join(plain)
    _put(name, text)


def _put(name: str, text: str) -> None:
    stream = getattr(sys, name, None)
    if stream is not None and text:
        try:
            stream.write(text)
            stream.flush()
        except Exception:
            pass  # the caller closed or replaced it badly


# Bytes read at a time, and the longest line begun that is kept waiting for
# its end: both bound the coordinator's memory whatever a worker writes.
READ_BYTES = 1 << 16
LINE_LIMIT = 1 << 16


class Forwarder:
    """The coordinator's ends of every worker's output pipes, and the
    forwarding of what arrives to the caller's streams.

    No thread of its own (a thread would make every later ``fork()`` of the
    coordinator unsafe, and Python 3.12 warns about it): whoever waits on
    the workers reads these pipes too, the driver while a map runs and the
    pool while workers start, and the driver drains them when a map ends.
    Lines are written whole, so the lines of two workers never mix."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pipes: dict[int, list] = {}
        self._version = 0  # bumped when the pipes change
        self._driver_poll: tuple[select.poll | None, int] = (None, -1)
        self._closed = False
        self._begun = 0  # pipes whose last line has not ended

    @property
    def fds(self) -> list[int]:
        return list(self._pipes)

    def add(self, out_fd: int, err_fd: int) -> None:
        """Forward these read ends from now on (closed at end-of-file)."""
        with self._lock:
            for fd, name in ((out_fd, "stdout"), (err_fd, "stderr")):
                os.set_blocking(fd, False)
                # [stream name, decoder, the line begun, a piece of a line
                # went out without its end]
                self._pipes[fd] = [
                    name,
                    codecs.getincrementaldecoder("utf-8")("replace"),
                    "",
                    False,
                ]
            self._version += 1

    def pending(self) -> bool:
        """Whether any pipe has output waiting: one poll, no wait (0.7 us
        with two workers)."""
        poller, version = self._driver_poll
        if version != self._version:
            with self._lock:
                version = self._version
                poller = select.poll()
                for fd in self._pipes:
                    poller.register(fd, select.POLLIN)
            self._driver_poll = (poller, version)
        assert poller is not None  # made on the first call (version -1)
        return bool(poller.poll(0))

    def drain(self) -> None:
        """Forward everything the pipes hold now, a line begun included
        (ended here: the caller's next line must not run into it).  Called
        when a map ends."""
        self.forward(list(self._pipes), final=True)

    @property
    def begun(self) -> bool:
        """Whether a line begun waits for its end."""
        return self._begun > 0

    def forward(self, fds, final: bool = False) -> list[int]:
        """Forward what ``fds`` hold now; returns those found at end-of-file
        (closed here: stop polling them)."""
        closed = []
        with self._lock:
            for fd in fds:
                entry = self._pipes.get(fd)
                if entry is None:
                    continue
                if self._read(fd, entry, final):
                    closed.append(fd)
                    del self._pipes[fd]
                    self._version += 1
                    os.close(fd)
        return closed

    def _read(self, fd: int, entry: list, final: bool) -> bool:
        """Forward what ``fd`` holds; True at end-of-file.  Whole lines go
        out as they come; a line begun waits for its end, but never grows
        past ``LINE_LIMIT`` characters (output with no newline, such as a
        progress line of dots or a C library's, goes out in pieces), so
        memory stays bounded whatever a worker writes."""
        name, decoder, begun, open_ = entry
        if begun or open_:
            self._begun -= 1
        eof = False
        while True:
            try:
                data = os.read(fd, READ_BYTES)
            except BlockingIOError:
                break
            except OSError:
                eof = True
                break
            if not data:
                eof = True
                break
            text = begun + decoder.decode(data)
            cut = max(text.rfind("\n"), text.rfind("\r")) + 1
            done, begun = text[:cut], text[cut:]
            if len(begun) > LINE_LIMIT:
                done, begun = text, ""
            if done:
                _write(name, done)
                entry[3] = not done.endswith(("\n", "\r"))
        if eof or final:
            begun += decoder.decode(b"", final=True)
            if begun or entry[3]:
                _write(name, begun + "\n")
            begun = ""
            entry[3] = False
        entry[2] = begun
        if begun or entry[3]:
            self._begun += 1
        return eof

    def close(self) -> None:
        """Forward what is left (the workers have exited) and close."""
        if self._closed:
            return
        self.forward(list(self._pipes), final=True)
        with self._lock:
            self._closed = True
            for fd in self._pipes:
                os.close(fd)
            self._pipes.clear()

    def forget_in_child(self) -> None:
        """In a forked child: close the copies of the pipes."""
        for fd in self._pipes:
            try:
                os.close(fd)
            except OSError:
                pass
        self._pipes = {}
        self._closed = True
