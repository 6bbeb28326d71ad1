"""What workers print and log, brought to the caller.

In a worker, file descriptors 1 and 2 are pipes to the coordinator, and
``sys.stdout``/``sys.stderr`` are :class:`Tagged` streams: each line starts
with ``[worker 1 rows 256:512]`` and is written to the pipe at once, with no
buffer in the worker, so a line printed right before a segfault is not lost.
numba's ``print`` in nopython mode writes through ``sys.stdout``, so it is
tagged too; output from C code that writes to the descriptors directly
arrives untagged.  Python ``logging`` records go to the tagged stderr.

In the coordinator, the :class:`Forwarder` holds every worker's pipes and
writes what comes to the caller's ``sys.stdout``/``sys.stderr`` as they are
at that moment (a notebook's streams, in a notebook).  The driver reads the
pipes while it waits for a map and drains them when the map ends, so what a
map printed shows before the map returns, in the cell that ran it.
"""

from __future__ import annotations

import codecs
import io
import logging
import os
import select
import sys
import threading
from typing import Callable


class Tagged(io.TextIOBase):
    """A text stream that writes to file descriptor ``fd`` unbuffered, each
    line prefixed with the worker and the rows it is computing."""

    def __init__(self, fd: int, worker: int, rows: Callable[[], tuple | None],
                 name: str, wrote: Callable[[], None] = lambda: None):
        self._fd = fd
        self._worker = worker
        self._rows = rows
        self._name = name
        self._wrote = wrote
        self._at_line_start = True

    @property
    def name(self) -> str:
        return self._name

    @property
    def encoding(self) -> str:
        return "utf-8"

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
        data = "".join(parts).encode("utf-8", "backslashreplace")
        while data:
            try:
                data = data[os.write(self._fd, data):]
            except InterruptedError:
                continue
            except OSError:
                break             # the coordinator is gone: nobody to tell
        self._wrote()             # after the write: the driver then finds it
        return len(text)

    def flush(self) -> None:
        pass                      # nothing is held


_streams: tuple[Tagged, ...] = ()


def end_lines() -> None:
    """End a line a chunk left begun (``print(..., end="")``), so the next
    chunk's output starts on a line of its own, with its own tag."""
    for stream in _streams:
        if not stream._at_line_start:
            stream.write("\n")


def install_in_worker(worker: int, rows: Callable[[], tuple | None],
                      log_level: int, wrote: Callable[[], None] = lambda: None) -> None:
    """Tag this worker's ``sys.stdout``/``sys.stderr``; send ``logging``
    records of ``log_level`` and above (the caller's root level when the
    engine started) to the tagged stderr.  ``wrote()`` runs after each
    write (it counts them in the control block, so the driver's lean path
    knows there is output to forward)."""
    global _streams
    sys.stdout = Tagged(1, worker, rows, "<stdout>", wrote)
    sys.stderr = Tagged(2, worker, rows, "<stderr>", wrote)
    _streams = (sys.stdout, sys.stderr)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s:%(name)s:%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(log_level)


def _write(name: str, text: str) -> None:
    """To the caller's ``sys.stdout`` or ``sys.stderr`` as it is now."""
    stream = getattr(sys, name, None)
    if stream is not None:
        try:
            stream.write(text)
            stream.flush()
        except Exception:
            pass              # the caller closed or replaced it badly


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
        self._version = 0         # bumped when the pipes change
        self._driver_poll = (None, -1)
        self._closed = False
        self._begun = 0           # pipes whose last line has not ended

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
                self._pipes[fd] = [name, codecs.getincrementaldecoder("utf-8")("replace"),
                                   "", False]
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
