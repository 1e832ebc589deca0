"""The pure parts of the slow-client and log guards: the repeat throttle, the parser-error
redaction, and the connection cap fitted to the open-file limit."""

from __future__ import annotations

import asyncio
import errno
import logging
import resource
import sys

from aiohttp.http_exceptions import BadHttpMessage

from proxy.connections import fit_to_open_files
from proxy.logs import JsonFormatter, LoopErrorThrottle, RedactParserErrors, Throttle


def test_throttle_admits_one_per_window_and_counts_the_rest() -> None:
    """Within `every_s` of an admitted event its kind is held back; the next one admitted
    says how many were; other kinds are counted apart."""
    now = [100.0]
    throttle = Throttle(10.0, clock=lambda: now[0])
    assert throttle.admit("accept") == 0
    assert [throttle.admit("accept") for _ in range(3)] == [None, None, None]
    assert throttle.admit("other") == 0
    now[0] += 9.9
    assert throttle.admit("accept") is None
    now[0] += 0.1
    assert throttle.admit("accept") == 4
    assert throttle.admit("accept") is None


def record_with(exc: Exception, *args: object) -> logging.LogRecord:
    try:
        raise exc
    except Exception:
        exc_info = sys.exc_info()
    return logging.LogRecord(
        "aiohttp.server", logging.ERROR, __file__, 1, "%s from %s", args, exc_info
    )


def test_parser_error_in_a_traceback_or_an_argument_keeps_only_its_class() -> None:
    """A record carrying a parser error (raised, chained, or as an argument) is formatted
    with its class and status, never its text, which quotes the refused bytes."""
    secret = "Authorization: Bearer pit-SECRET"
    chained = RuntimeError("while handling")
    chained.__cause__ = BadHttpMessage(f"Invalid header value char: {secret}")
    records = [
        record_with(BadHttpMessage(secret), "Error handling request", "127.0.0.1"),
        record_with(chained, "Error handling request", "127.0.0.1"),
        logging.LogRecord(
            "proxy", logging.INFO, __file__, 1, "%s: %s", ("refused", BadHttpMessage(secret)), None
        ),
    ]
    redact, formatter = RedactParserErrors(), JsonFormatter()
    lines = [formatter.format(record) for record in records if redact.filter(record)]
    assert len(lines) == 3
    assert all("SECRET" not in line and "BadHttpMessage 400" in line for line in lines), lines


def test_other_exceptions_keep_their_traceback() -> None:
    """Only parser errors are reduced: an ordinary failure is logged whole."""
    record = record_with(ValueError("plain failure"), "Unhandled", "x")
    assert RedactParserErrors().filter(record)
    assert "plain failure" in JsonFormatter().format(record)


def test_connection_cap_fits_the_open_file_limit() -> None:
    """Half of what is left after the reserve (a client and an upstream descriptor each),
    never more than configured, never less than one; no limit keeps the configured cap."""
    assert fit_to_open_files(4096, 256) == 96
    assert fit_to_open_files(50, 256) == 50
    assert fit_to_open_files(4096, 20) == 1
    assert fit_to_open_files(4096, resource.RLIM_INFINITY) == 4096


def test_loop_error_reports_are_throttled_per_message(caplog) -> None:
    """asyncio reports a failing accept() once per attempt: 500 such reports make one line
    (each other message its own), and the next after the window counts the held back."""
    now = [0.0]
    loop = asyncio.new_event_loop()
    try:
        loop.set_exception_handler(LoopErrorThrottle(Throttle(10.0, clock=lambda: now[0])))
        emfile = OSError(errno.EMFILE, "Too many open files")
        with caplog.at_level(logging.ERROR, logger="asyncio"):
            for _ in range(500):
                loop.call_exception_handler(
                    {"message": "socket.accept() out of system resource", "exception": emfile}
                )
            loop.call_exception_handler({"message": "something else"})
            now[0] = 10.0
            loop.call_exception_handler(
                {"message": "socket.accept() out of system resource", "exception": emfile}
            )
    finally:
        loop.close()
    messages = [record.getMessage() for record in caplog.records]
    assert len(messages) == 3, messages
    assert "499 more like this" in messages[2]
