"""What a failed ``vitq`` command prints and the status it exits with: one line that says what to do,
never a traceback, and an exit status a script can branch on.

| status | meaning |
|---|---|
| 0 | done (a waited-for job succeeded) |
| 1 | the job ended ``failed`` or ``cancelled`` |
| 2 | usage: a bad flag or value, or a request the API refused (4xx other than auth) |
| 3 | ``--timeout`` passed while waiting; the job keeps running |
| 4 | the API cannot be reached (not running, wrong ``--url``), or answered with a 5xx |
| 5 | authentication: no API key, or a key the API refused (401/403) |
| 130 | interrupted (Ctrl-C); a job already submitted keeps running |

Importing this module costs nothing heavy: ``httpx`` and ``core`` are looked up in ``sys.modules``
only when an exception is being described, so ``vitq --help`` never pays for them.
"""

from __future__ import annotations

import difflib
import os
import sys
from collections.abc import Iterable
from enum import IntEnum
from pathlib import Path


class ExitCode(IntEnum):
    """The documented exit statuses of ``vitq`` (docs/cli.md)."""

    OK = 0
    JOB_FAILED = 1
    """The job ended ``failed`` or ``cancelled``."""
    USAGE = 2
    """A bad flag or value, or a request the API refused with a 4xx (other than 401/403)."""
    TIMEOUT = 3
    """``--timeout`` passed while waiting for a job; the job keeps running."""
    UNREACHABLE = 4
    """No API at ``--url`` (or it answered 5xx)."""
    AUTH = 5
    """No API key, or a key the API refused."""
    INTERRUPTED = 130


class CliError(Exception):
    """A failure the CLI explains in one line: ``vitq: error: <message>``, exit ``code``."""

    def __init__(self, message: str, code: ExitCode = ExitCode.USAGE) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


class WaitTimeout(CliError):
    """``--timeout`` passed; says how to keep waiting or stop the job."""

    def __init__(self, job_id: str, status: str, timeout: float, percent: float | None = None) -> None:
        where = f"{status}, {percent:.0f}%" if isinstance(percent, int | float) else status
        super().__init__(
            f"job {job_id} is still {where} after {timeout:g} s; it keeps running: "
            f"`vitq jobs wait {job_id}` to wait again, `vitq jobs cancel {job_id}` to stop it",
            ExitCode.TIMEOUT,
        )


def did_you_mean(name: str, candidates: Iterable[str]) -> str:
    """`` (did you mean 'fmnist-vit-tiny'?)`` for the closest candidates, or ``""``."""
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    return " (did you mean " + " or ".join(repr(c) for c in close) + "?)"


def key_sources() -> str:
    """Where the CLI looks for a key, in order, for messages about a missing or refused one."""
    key_file = Path(os.environ.get("VITQ_DATA_DIR", ".vitq")) / "local-api-key"
    return f"--api-key, $VITQ_API_KEY, or the key file {key_file.resolve()} (written by `vitq serve`)"


def _api_error_line(exc: object, url: str, key_given: bool) -> tuple[str, ExitCode]:
    status, code, message = exc.status, exc.code, exc.message  # type: ignore[attr-defined]
    head = f"{status} {code}: {message}"
    if status == 401:
        if not (key_given if exc.key_sent is None else exc.key_sent):  # type: ignore[attr-defined]
            return f"no API key: give one with {key_sources()}", ExitCode.AUTH
        return (f"the API at {url} refused this key ({code}): check {key_sources()}; "
                "`vitq admin keys create --tenant NAME` makes a new one", ExitCode.AUTH)
    if status == 403:
        return f"{head} (this key may not do that)", ExitCode.AUTH
    if status == 429:
        return f"{head}; try again later", ExitCode.USAGE
    if status >= 500:
        return f"the API at {url} failed: {head} (a server bug: the server log has the traceback)", \
            ExitCode.UNREACHABLE
    return head, ExitCode.USAGE


def describe(exc: BaseException, *, url: str | None = None, key_given: bool = True) -> tuple[str, ExitCode] | None:
    """The one line and exit status for ``exc``, or ``None`` for an exception that is a bug (a traceback
    is then the honest answer). ``url`` and ``key_given`` make the network and auth messages concrete."""
    url = url or os.environ.get("VITQ_URL") or "http://127.0.0.1:8000"
    if isinstance(exc, CliError):
        return exc.message, exc.code
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted", ExitCode.INTERRUPTED
    client = sys.modules.get("vitq.client")
    if client is not None and isinstance(exc, client.VitqApiError):
        return _api_error_line(exc, url, key_given)
    httpx = sys.modules.get("httpx")
    if httpx is not None:
        if isinstance(exc, httpx.ConnectError | httpx.ConnectTimeout):
            return (f"cannot reach the vitq API at {url} ({_reason(exc)}): start it with `vitq serve`, "
                    "or point --url / $VITQ_URL at a running one", ExitCode.UNREACHABLE)
        if isinstance(exc, httpx.TimeoutException):
            return f"the vitq API at {url} did not answer in time ({type(exc).__name__}); try again", \
                ExitCode.UNREACHABLE
        if isinstance(exc, httpx.HTTPError):
            return f"talking to the vitq API at {url} failed: {_reason(exc)}", ExitCode.UNREACHABLE
    errors = sys.modules.get("core.errors")
    if errors is not None and isinstance(exc, errors.VitqError):
        return exc.message, ExitCode.USAGE  # type: ignore[attr-defined]
    if isinstance(exc, FileNotFoundError | IsADirectoryError | PermissionError | NotADirectoryError):
        return f"{exc.strerror}: {exc.filename}", ExitCode.USAGE
    return None


def _reason(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    return text.splitlines()[0][:200]
