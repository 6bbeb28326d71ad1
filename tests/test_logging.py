"""Logging: records that kernels log in workers reach the caller's logging
as records (its levels, filters and handlers apply), and the "shmarray"
logger tells of replacements, timeouts and recycling."""

from __future__ import annotations

import logging
import os
import signal
import time

import numpy as np
import pytest

import shmarray
from shmarray import output


class Keep(logging.Handler):
    """Keeps the records it is given."""

    def __init__(self, level=logging.NOTSET):
        super().__init__(level)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def kept():
    """A handler on the "kernel" logger, set to INFO, taken off afterwards."""
    logger = logging.getLogger("kernel")
    handler = Keep()
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    yield handler
    logger.removeHandler(handler)
    logger.setLevel(logging.NOTSET)


def noisy(a, off):
    log = logging.getLogger("kernel")
    log.debug("too fine for the caller's level %d", off)
    log.info("step at %d", off)
    log.warning("secret %d", off)
    try:
        raise ZeroDivisionError("division by zero")
    except ZeroDivisionError:
        log.exception("failed at %d", off)
    print("a plain print", off)


def test_worker_records_reach_the_callers_handlers_as_records(kept, capfd):
    kept.addFilter(lambda r: "secret" not in r.getMessage())
    with shmarray.Engine(workers=2) as eng:
        a = eng.zeros(8)
        eng.map(noisy, a, args=(shmarray.row_offset,), chunks=2)
    records = sorted(kept.records, key=lambda r: (r.shmarray_worker, r.levelno))
    assert [(r.name, r.levelno) for r in records] == [
        ("kernel", logging.INFO),
        ("kernel", logging.ERROR),
    ] * 2
    for r in records:
        worker, rows = r.shmarray_worker, r.shmarray_rows
        assert rows == ((0, 4) if rows[0] == 0 else (4, 8))
        assert r.process != os.getpid()  # logged in the worker
        assert r.funcName == "noisy" and r.args is None and r.exc_info is None
        tag = f"[worker {worker} rows {rows[0]}:{rows[1]}] "
        if r.levelno == logging.INFO:
            assert r.getMessage() == f"{tag}step at {rows[0]}"
        else:
            assert r.getMessage() == f"{tag}failed at {rows[0]}"
            assert r.exc_text.endswith("ZeroDivisionError: division by zero")
            # The caller's formatter shows the worker's traceback.
            assert 'raise ZeroDivisionError("division' in logging.Formatter().format(r)
    out, err = capfd.readouterr()
    # Prints stay tagged lines; no record arrives as text.
    assert "rows 0:4] a plain print 0" in out and "rows 4:8] a plain print 4" in out
    assert "shmarray-record" not in out + err and "step at" not in out + err


def test_the_callers_level_now_decides(kept):
    with shmarray.Engine(workers=2) as eng:
        a = eng.zeros(8)
        logging.getLogger("kernel").setLevel(logging.ERROR)  # after the start
        eng.map(noisy, a, args=(shmarray.row_offset,), chunks=2)
    assert sorted(r.levelno for r in kept.records) == [logging.ERROR] * 2


def test_a_record_is_one_line_whatever_it_holds():
    record = logging.LogRecord("k", logging.WARNING, "f.py", 1, "%s", ("é\n" * 50_000,), None)
    record.thing = object()  # not JSON: sent as its repr
    line = output.encode_record(record, 3, None)
    assert line.endswith("\n") and line.count("\n") == 1 and line.isascii()
    assert len(line) <= output.RECORD_LIMIT + len(output.RECORD_MARK) + 1
    back = output.decode_record(line)
    assert back.getMessage().startswith("[worker 3] é\n")
    assert "characters cut]" in back.getMessage()
    assert back.thing.startswith("<object object")
    assert back.shmarray_rows is None


def test_a_forged_or_broken_record_line_is_shown_as_text(capsys):
    output._write("stderr", output.RECORD_MARK + "{not json\nnext line\n")
    assert capsys.readouterr().err == output.RECORD_MARK + "{not json\nnext line\n"


def die_once(a, off, runs):
    runs[off // 4] += 1
    if off == 0 and runs[0] == 1:
        os.kill(os.getpid(), signal.SIGKILL)
    a[:] = 1


@pytest.mark.breaks_things
def test_a_killed_worker_is_logged_with_its_replacement(caplog):
    caplog.set_level(logging.INFO, logger="shmarray")
    with shmarray.Engine(workers=2) as eng:
        a, runs = eng.zeros(8), eng.zeros(2, np.int64)
        eng.map(die_once, a, args=(shmarray.row_offset, runs), chunks=2, retries=1)
        assert a.tolist() == [1.0] * 8 and runs.tolist() == [2, 1]
    shm = [r for r in caplog.records if r.name.startswith("shmarray")]
    crash = [r for r in shm if r.levelno == logging.WARNING and "SIGKILL" in r.getMessage()]
    assert crash and "rows 0:4" in crash[0].getMessage()
    replaced = [
        r
        for r in shm
        if r.levelno == logging.INFO and r.getMessage().startswith("replaced worker")
    ]
    assert len(replaced) == 1 and "killed by SIGKILL" in replaced[0].getMessage()
    assert replaced[0].name == "shmarray.pool"


def sleepy(a):
    time.sleep(30)


@pytest.mark.breaks_things
def test_a_timeout_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="shmarray")
    with shmarray.Engine(workers=2) as eng:
        with pytest.raises(shmarray.TaskTimeoutError):
            eng.map(sleepy, eng.zeros(4), timeout=0.5)
    timeouts = [
        r
        for r in caplog.records
        if r.name == "shmarray.rounds"
        and r.levelno == logging.WARNING
        and "timeout=0.5" in r.getMessage()
    ]
    assert len(timeouts) == 1
    assert any(r.getMessage().startswith("replaced worker") for r in caplog.records)


def test_recycling_is_logged(caplog):
    caplog.set_level(logging.INFO, logger="shmarray")
    with shmarray.Engine(workers=2, max_tasks_per_worker=1) as eng:
        eng.map(np.copyto, eng.zeros(4), eng.zeros(4))
    recycled = [r for r in caplog.records if "recycling worker" in r.getMessage()]
    assert len(recycled) == 2 and all(r.levelno == logging.INFO for r in recycled)


def test_nothing_is_printed_when_the_application_configures_nothing():
    from conftest import run_python

    proc = run_python("""
import os, signal, shmarray
def die(a):
    os.kill(os.getpid(), signal.SIGKILL)
with shmarray.Engine(workers=2) as eng:
    try:
        eng.map(die, eng.zeros(4))
    except shmarray.WorkerCrashedError:
        print("crashed")
""")
    assert proc.stdout == "crashed\n" and proc.stderr == ""
