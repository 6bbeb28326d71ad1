"""Starting worker and watchdog processes, without multiprocessing.Process.

Why not ``multiprocessing``: its start methods import the caller's main
module in every child (and in the fork server), so a script without an
``if __name__ == "__main__":`` guard ran itself once per worker; avoiding
that takes private API, and so does keeping our preload list off the fork
server the user's own pools share.  Its children are also members of the
caller's process group, so Ctrl-C, SIGTERM and SIGHUP to the group reach
them (and the watchdog that must outlive the caller).  Like loky, shmarray
therefore starts its own children:

* ``forkserver`` (the default): one small server per coordinator process,
  started on first use with ``subprocess`` in a session of its own.  It
  imports numpy, numba and the worker code once, with one thread for numba,
  OpenMP and BLAS, and forks a child per request, so children start in
  milliseconds and share those pages.  It reaps its children and reports
  each exit status on a pipe whose read end is the child's *sentinel*.  It
  exits when the coordinator's end of its socket closes.
* ``spawn``: a fresh interpreter per child (``subprocess``), in a session
  of its own; slow to start, inherits nothing.
* ``fork``: ``os.fork()`` of the coordinator itself; fast, but unsafe once
  the coordinator runs threads (numba's pool, BLAS, Jupyter), like
  multiprocessing's fork.

No child ever imports the caller's ``__main__``.  A child receives its
target as ``"module:function"``, its arguments pickled, and file
descriptors, which stand in the arguments as :class:`Fd` placeholders.
"""

from __future__ import annotations

import atexit
import errno
import importlib
import logging
import math
import os
import pickle
import select
import selectors
import signal
import socket
import struct
import subprocess
import sys
import threading
import traceback
from typing import NamedTuple

from shmarray.interrupts import at_exit

log = logging.getLogger(__name__)

METHODS = ("forkserver", "spawn", "fork")
DEFAULT_METHOD = "forkserver"

# One thread per child for every pool a kernel could start: N workers on N
# cores must not each start N threads.  Set in the environment of the fork
# server and of spawned children before they import numpy or numba, which
# read them at import, so no library's internals need touching.
THREAD_VARS = (
    "OMP_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "MKL_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "NUMBA_NUM_THREADS",
)
PRELOAD = ("numpy", "numba", "shmarray.worker", "shmarray.watchdog")


class Fd(NamedTuple):
    """Stands for the ``position``-th file descriptor passed with a request."""

    position: int


def child_environment() -> dict[str, str]:
    env = dict(os.environ)
    env.update({var: "1" for var in THREAD_VARS})
    return env


def _resolve(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(module), name)


def _substitute(args: tuple, fds: list[int]) -> tuple:
    return tuple(fds[a.position] if type(a) is Fd else a for a in args)


class Request(NamedTuple):
    """What a child is to run, and where: the coordinator's import path and
    working directory, so kernels importable there are importable here."""

    target: str  # "module:function"
    args: tuple
    sys_path: list[str]
    cwd: str
    report: int | None  # the fd (index) to report a failed import on

    @classmethod
    def make(cls, target: str, args: tuple, report: int | None) -> Request:
        return cls(target, args, list(sys.path), os.getcwd(), report)


def run_target(request: Request, fds: list[int]) -> int:
    """Run a request in a child; the exit code.  A target reports its own
    start-up failures to its coordinator, and so does this function when the
    target cannot even be imported, on the ``report`` descriptor, as a
    ``descriptors.StartFailed`` frame; what escapes the target afterwards is
    a bug, printed once."""
    sys.path[:] = request.sys_path
    try:
        os.chdir(request.cwd)
    except OSError:
        pass
    try:
        target = _resolve(request.target)
    except BaseException as exc:
        if request.report is None or not _report(fds[request.report], exc):
            traceback.print_exc()
        return 1
    try:
        target(*_substitute(request.args, fds))
        return 0
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except BaseException:
        traceback.print_exc()
        return 1
    finally:
        for stream in (sys.stdout, sys.stderr):
            try:
                stream.flush()
            except Exception:
                pass


def _report(fd: int, exc: BaseException) -> bool:
    """Send ``exc`` as a StartFailed frame on ``fd``; False if that failed."""
    try:
        from multiprocessing.connection import Connection

        from shmarray.descriptors import StartFailed, encode

        Connection(fd, readable=False).send_bytes(
            encode(
                StartFailed(
                    "import",
                    type(exc).__qualname__,
                    str(exc),
                    "".join(traceback.format_exception(exc)),
                )
            )
        )
        return True
    except BaseException:
        return False


def describe_status(status: int) -> int:
    """An exit code as multiprocessing reports it: -signal if killed."""
    if os.WIFSIGNALED(status):
        return -os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


# A process is alive only by its own word.  On Linux 5.3+ a pidfd refers to
# the process itself (never to a later one with a recycled pid), becomes
# readable once the process has exited (its memory unmapped), and takes
# signals.  Elsewhere the sentinel is the read end of a pipe whose write
# end only the child holds: end-of-file means it has exited.  Decided once.
_HAVE_PIDFD = hasattr(os, "pidfd_open") and hasattr(signal, "pidfd_send_signal")


class Child:
    """A started process: its pid, a sentinel that becomes readable when it
    has exited, and a way to learn its exit code.

    Created by a launcher with ``alive``, the read end of a pipe only the
    child holds, and closed by its owner once.  Whether the process runs is
    learnt from the process itself (its pidfd, or that pipe), never from a
    third process such as the fork server.  ``kill`` signals through the
    pidfd, or by pid only while the pipe shows the process alive, so a
    recycled pid is never signalled.
    """

    def __init__(self, pid: int, alive: int):
        self.pid = pid
        self._alive = alive
        self._pidfd = -1
        self._code: int | None = None
        self.status_known = True  # False: it exited, but nobody could say how
        self.closed = False
        if _HAVE_PIDFD:
            try:
                fd = os.pidfd_open(pid)
            except OSError:
                fd = -1  # gone already, or no pidfds here after all
            # Opened while the pipe showed the process alive: then the pidfd
            # is surely this process's, not a recycled pid's.
            if fd >= 0 and wait_readable([alive], 0):
                os.close(fd)
                fd = -1
            self._pidfd = fd
        self.sentinel = self._pidfd if self._pidfd >= 0 else alive

    def _collect(self) -> int | None:  # launcher-specific
        raise NotImplementedError

    def exited(self) -> bool:
        """Whether the process has exited (its own word; no waiting)."""
        return self.closed or bool(wait_readable([self.sentinel], 0))

    @property
    def exitcode(self) -> int | None:
        """None while it runs; its exit code (-signal if killed) after."""
        if self._code is None and not self.closed and self.exited():
            self._code = self._collect()
        return self._code

    def join(self, timeout: float | None = None) -> int | None:
        """Wait up to ``timeout`` seconds for it to exit; its exit code."""
        if not self.closed and not self.exited():
            wait_readable([self.sentinel], timeout)
        return self.exitcode

    def _signal(self, sig: int) -> None:
        if self.closed:
            return
        try:
            if self._pidfd >= 0:
                signal.pidfd_send_signal(self._pidfd, sig)
            elif not self.exited():
                os.kill(self.pid, sig)
        except ProcessLookupError:
            pass

    def terminate(self) -> None:
        self._signal(signal.SIGTERM)

    def kill(self) -> None:
        self._signal(signal.SIGKILL)

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            for fd in {self._alive, self._pidfd}:
                if fd >= 0:
                    try:
                        os.close(fd)
                    except OSError:
                        pass


def wait_readable(fds: list, timeout: float | None) -> list:
    """Those of ``fds`` (ints or objects with fileno) that are readable, or
    at end-of-file, within ``timeout`` seconds (None: no limit)."""
    poller = select.poll()
    by_fd = {}
    for obj in fds:
        fd = obj if isinstance(obj, int) else obj.fileno()
        by_fd[fd] = obj
        poller.register(fd, select.POLLIN)
    ms = -1 if timeout is None else max(0, math.ceil(timeout * 1000))
    return [by_fd[fd] for fd, _ in poller.poll(ms)]


# -- fork server -----------------------------------------------------------------


class _ServedChild(Child):
    """A child of the fork server, which reports its exit status on a pipe
    once it has reaped it."""

    def __init__(self, pid: int, alive: int, status: int):
        self._status = status
        super().__init__(pid, alive)

    def _collect(self) -> int | None:
        # It has exited: the server writes its status when it reaps it.
        data = b""
        if wait_readable([self._status], 2.0):
            try:
                data = os.read(self._status, 4)
            except OSError:
                pass
        if len(data) < 4:
            self.status_known = False  # the server is gone: nobody can tell
            return 255
        return struct.unpack("i", data)[0]

    def close(self) -> None:
        if not self.closed:
            try:
                os.close(self._status)
            except OSError:
                pass
        super().close()


class ForkServer:
    """The coordinator's side of its fork server: started on first use,
    restarted if it died, shut down at interpreter exit.  Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._proc: subprocess.Popen | None = None
        self._pid = os.getpid()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _ensure(self) -> socket.socket:
        if self._pid != os.getpid():  # a forked copy: not ours
            self._sock, self._proc, self._pid = None, None, os.getpid()
        if self._sock is not None and self._proc is not None and self._proc.poll() is None:
            return self._sock
        if self._proc is not None:
            log.info(
                "shmarray's fork server (pid %d) exited with code %s; starting a new one",
                self._proc.pid,
                self._proc.returncode,
            )
        self._stop()
        ours, theirs = socket.socketpair()
        try:
            self._proc = subprocess.Popen(
                [
                    sys.executable,
                    "-c",
                    f"from shmarray.launch import serve; serve({theirs.fileno()})",
                ],
                pass_fds=(theirs.fileno(),),
                env=child_environment(),
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        self._sock = ours
        return ours

    def start(self, request: Request, fds: list[int]) -> Child:
        alive_r, alive_w = os.pipe()
        try:
            with self._lock:
                sock = self._ensure()
                try:
                    socket.send_fds(sock, [_frame(pickle.dumps(request))], [*fds, alive_w])
                    reply, got, _, _ = socket.recv_fds(sock, 16, 1)
                except BaseException:
                    # Interrupted half-way: the conversation is lost, and
                    # with it this server.  The next start gets a new one; a
                    # child it may have forked finds its pipes closed and
                    # exits.  Children started before live on: their
                    # liveness never depended on the server.
                    self._stop()
                    raise
                if len(reply) < 8 or not got:
                    self._stop()
                    raise OSError(
                        errno.EPIPE,
                        "the shmarray fork server stopped "
                        "answering; it is restarted on the next start",
                    )
                (pid,) = struct.unpack("q", reply[:8])
        except BaseException:
            os.close(alive_r)
            raise
        finally:
            os.close(alive_w)
        return _ServedChild(pid, alive_r, got[0])

    def _stop(self) -> None:
        sock, proc = self._sock, self._proc
        self._sock = self._proc = None
        if sock is not None:
            sock.close()  # the server exits on EOF
        if proc is not None:
            try:
                proc.wait(5.0)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def stop(self) -> None:
        if self._pid != os.getpid():
            return
        with self._lock:
            self._stop()

    def forget_in_child(self) -> None:
        """In a forked child: the server is the parent's; drop our copy of
        its socket (takes no lock: another thread may have held it)."""
        if self._sock is not None:
            self._sock.close()
        self._sock = self._proc = None
        self._lock = threading.Lock()
        self._pid = os.getpid()


def _frame(data: bytes) -> bytes:
    return struct.pack("q", len(data)) + data


def _recv_exactly(sock: socket.socket, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = sock.recv(n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def serve(fd: int) -> None:
    """The fork server's main loop (``python -c`` entry point)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # its children inherit this
    import multiprocessing

    # numba guards its thread-pool start with a multiprocessing lock; under
    # the fork start method that lock is anonymous, never a named semaphore
    # in /dev/shm that a killed worker would leak.
    multiprocessing.set_start_method("fork", force=True)
    for name in PRELOAD:
        importlib.import_module(name)
    sock = socket.socket(fileno=fd)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_r, False)
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    status_pipes: dict[int, int] = {}
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    sel.register(wake_r, selectors.EVENT_READ)
    while True:
        for key, _ in sel.select():
            if key.fileobj is wake_r:
                try:
                    while os.read(wake_r, 4096):
                        pass
                except BlockingIOError:
                    pass
                _reap(status_pipes)
                continue
            try:
                # The descriptors ride on the first bytes of the request.
                head, fds, _, _ = socket.recv_fds(sock, 8, 64)
                if not head:
                    raise EOFError
                head += _recv_exactly(sock, 8 - len(head))
                (n,) = struct.unpack("q", head)
                data = _recv_exactly(sock, n)
            except (EOFError, OSError):
                return  # the coordinator is gone
            request = pickle.loads(data)
            status_r, status_w = os.pipe()
            pid = os.fork()
            if pid == 0:
                sel.close()
                sock.close()
                signal.set_wakeup_fd(-1)
                signal.signal(signal.SIGCHLD, signal.SIG_DFL)
                for other in (wake_r, wake_w, status_r, status_w, *status_pipes.values()):
                    os.close(other)
                os._exit(run_target(request, fds))
            for own in fds:
                os.close(own)
            status_pipes[pid] = status_w
            try:
                socket.send_fds(sock, [struct.pack("q", pid)], [status_r])
            except OSError:
                return  # the coordinator gave up on this start (Ctrl-C)
            finally:
                os.close(status_r)
            _reap(status_pipes)


def _reap(status_pipes: dict[int, int]) -> None:
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        w = status_pipes.pop(pid, None)
        if w is not None:
            try:
                os.write(w, struct.pack("i", describe_status(status)))
            except OSError:
                pass
            os.close(w)


# -- spawn -----------------------------------------------------------------------


class _SpawnedChild(Child):
    def __init__(self, popen: subprocess.Popen, alive: int):
        self._popen = popen
        super().__init__(popen.pid, alive)

    def _collect(self) -> int | None:
        return self._popen.poll()

    def close(self) -> None:
        if not self.closed and self._popen.poll() is None:
            self.kill()
            self._popen.wait()  # reap: never leave a zombie
        super().close()


def spawned() -> None:
    """A spawned child's ``python -c`` entry point: the request on stdin."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    request, fds = pickle.load(sys.stdin.buffer)
    sys.stdin.close()
    sys.exit(run_target(request, fds))


def _spawn(request: Request, fds: list[int]) -> Child:
    alive_r, alive_w = os.pipe()  # closes, and wakes us, when it exits
    try:
        popen = subprocess.Popen(
            [sys.executable, "-c", "from shmarray.launch import spawned; spawned()"],
            pass_fds=(*fds, alive_w),
            stdin=subprocess.PIPE,
            env=child_environment(),
            start_new_session=True,
        )
        try:
            assert popen.stdin is not None  # stdin=PIPE
            pickle.dump((request, list(fds)), popen.stdin)
            popen.stdin.close()
        except BaseException:
            popen.kill()
            popen.wait()
            raise
    except BaseException:
        os.close(alive_r)
        raise
    finally:
        os.close(alive_w)
    return _SpawnedChild(popen, alive_r)


# -- fork ------------------------------------------------------------------------


class _ForkedChild(Child):
    def _collect(self) -> int | None:
        # It has exited (by its pidfd: a zombie now; by its pipe: about to
        # be), so waiting to reap it takes a moment at most.
        try:
            _, status = os.waitpid(self.pid, 0)
        except ChildProcessError:
            self.status_known = False
            return 255
        return describe_status(status)

    def close(self) -> None:
        if not self.closed and self._code is None:
            if not self.exited():
                self.kill()
            self.join()  # reap: never leave a zombie
        super().close()


def _fork(request: Request, fds: list[int]) -> Child:
    alive_r, alive_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            os.setsid()
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            keep = sorted({0, 1, 2, alive_w, *fds})
            lo = 3
            for fd in keep:
                if fd >= lo:
                    os.closerange(lo, fd)
                    lo = fd + 1
            os.closerange(lo, os.sysconf("SC_OPEN_MAX") if hasattr(os, "sysconf") else 4096)
            code = run_target(request, list(fds))
        finally:
            os._exit(code)
    os.close(alive_w)
    return _ForkedChild(pid, alive_r)


_SERVER = ForkServer()
# Registered at import, before the engines' own exit hook (shmarray.dispatch
# imports this module first), so it runs after every engine has closed.
atexit.register(at_exit, _SERVER.stop)
os.register_at_fork(after_in_child=_SERVER.forget_in_child)


def start(
    method: str, target: str, args: tuple, fds: list[int], report: int | None = None
) -> Child:
    """Start ``target(*args)`` (``"module:function"``) in a new process by
    ``method``; ``fds`` are passed to it (the caller keeps its own copies:
    close them once started), and the target cannot be imported, the error
    is sent on ``fds[report]``."""
    request = Request.make(target, args, report)
    if method == "forkserver":
        return _SERVER.start(request, list(fds))
    if method == "spawn":
        return _spawn(request, list(fds))
    if method == "fork":
        return _fork(request, list(fds))
    raise ValueError(f"start_method must be one of {list(METHODS)}; got {method!r} instead.")


def server_pid() -> int | None:
    """The fork server's pid, if it runs (for tests that count children)."""
    return _SERVER.pid


def stop_server() -> None:
    _SERVER.stop()
