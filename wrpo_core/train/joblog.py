"""Reading a training job's log for its own error, line by line as the log streams.

A torchrun job's log mixes every rank's output with torchrun's; `JobLogErrors` keeps what says
why the job failed (the first `error: ...` or exception line, the last words of a process that a
signal ended, and torchrun's ChildFailedError root cause) and `job_error_text` turns it into one line.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from wrpo_core.train.jobs import ERROR_LINE, RankFailure

_RANK_PREFIX = re.compile(r"^\[(?:rank|default)\d+\]:\s?")
_FATAL_LINE = re.compile(r"^(?:terminate called\b|Fatal Python error: |what\(\): )")
"""Last words of a process that dies of a signal: C++ std::terminate, Python's fault handler."""
_LAUNCHER_NOISE = ("ChildFailedError", "torch.distributed.elastic")
_SUMMARY_FIELD = re.compile(r"^  (\w+)\s*: ?(.*)$")
_RANK_FIELD = re.compile(r"^(-?\d+) \(local_rank: (-?\d+)\)")
_EXITCODE_FIELD = re.compile(r"^(-?\d+)(?: \(pid: \d+\))?\s*(?:\((SIG\w+)\))?")


class JobLogErrors:
    """What a job's log says about its failure, gathered line by line as the log streams.

    Three kinds of lines count: the first `error: ...` or exception line a worker printed, the
    first fatal message (`terminate called ...`, `Fatal Python error: ...`) of a process about to
    die of a signal, and torchrun's ChildFailedError summary, whose root cause names the rank
    that failed first, its exit code or signal, and its recorded traceback.
    """

    def __init__(self) -> None:
        self.exception: str | None = None
        self.fatal: str | None = None
        self._summary: list[str] | None = None

    def add(self, raw: str) -> None:
        """Takes one log line (rank prefixes such as `[rank0]: ` are removed)."""
        line = _RANK_PREFIX.sub("", raw.rstrip())
        if self._summary is not None:
            self._summary.append(line)
            return
        if line.startswith("Root Cause (first observed failure):"):
            self._summary = []
            return
        stripped = line.strip()
        launcher_noise = any(noise in stripped for noise in _LAUNCHER_NOISE)
        if self.exception is None and ERROR_LINE.match(stripped) and not launcher_noise:
            self.exception = stripped.removeprefix("error: ")
        if self.fatal is None and _FATAL_LINE.match(stripped):
            self.fatal = stripped

    @property
    def root_cause(self) -> RankFailure | None:
        """torchrun's root-cause entry, once its summary has been read; else None."""
        return parse_root_cause(self._summary or [])

    def text(self) -> str | None:
        """The job's own error, said as precisely as the log allows; None if it says nothing.

        The failing rank's recorded exception comes first, then the first exception line in the
        log; a rank that a signal ended is named with the signal and its last fatal message.
        """
        failure = self.root_cause
        exception = (failure.exception if failure else None) or self.exception
        if failure is None:
            return exception or self.fatal
        if failure.signal:
            words = exception or self.fatal
            return f"{failure.describe()}" + (f"; last error in the log: {words}" if words else "")
        if exception:
            return f"{exception} ({failure.describe()})"
        return failure.describe() + (f"; last error in the log: {self.fatal}" if self.fatal else "")


def parse_root_cause(summary: list[str]) -> RankFailure | None:
    """The first entry after `Root Cause (first observed failure):` in torchrun's summary.

    An entry is `  name : value` lines (rank, exitcode, error_file, traceback); a recorded
    traceback continues on more-indented lines; a line of `=` or `-` ends the entry.
    """
    fields: dict[str, str] = {}
    traceback: list[str] = []
    for line in summary:
        if is_banner(line):
            break
        match = _SUMMARY_FIELD.match(line)
        if match and not traceback:
            fields[match.group(1)] = match.group(2).strip()
            if match.group(1) == "traceback":
                traceback.append(match.group(2).strip())
        elif traceback:
            traceback.append(line)
    rank = _RANK_FIELD.match(fields.get("rank", ""))
    exitcode = _EXITCODE_FIELD.match(fields.get("exitcode", ""))
    if not rank or not exitcode:
        return None
    error_file = fields.get("error_file")
    return RankFailure(
        rank=int(rank.group(1)),
        local_rank=int(rank.group(2)),
        exitcode=int(exitcode.group(1)),
        signal=exitcode.group(2),
        error_file=None if error_file in (None, "", "<N/A>") else error_file,
        traceback=tuple(traceback),
    )


def job_error_text(lines: Iterable[str]) -> str | None:
    """The job's own error in its log (see `JobLogErrors.text`); None if the log names none.

    Rank prefixes (`[rank0]: `) and a worker's `error: ` are removed; torchrun's own
    ChildFailedError is never the answer, but its root cause tells which rank failed and how.
    """
    errors = JobLogErrors()
    for line in lines:
        errors.add(line)
    return errors.text()


def last_words(tail: list[str]) -> str:
    """The last line of a log that is not a banner of `=` or `-`; `no output` for an empty log."""
    for line in reversed(tail):
        if line.strip() and not is_banner(line):
            return line.strip()
    return "no output"


def is_banner(line: str) -> bool:
    """True for a line of only `=` or `-` (torchrun's summary frames)."""
    stripped = line.strip()
    return bool(stripped) and set(stripped) <= {"=", "-"}
