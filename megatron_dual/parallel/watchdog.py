"""What a rank is waiting for, so that a stalled or dead peer ends the job with a sentence instead of a hang.

Every collective the loop issues is preceded by :func:`phase` (``"token counts all-reduce"``, ``"gradient
all-reduce"``, ``"checkpoint barrier"``, ...). Process groups are created with ``parallel.timeout`` (seconds), so a
collective whose peer stopped (SIGSTOP, a hung node) raises after that long and one whose peer died raises at once
(gloo: ``RuntimeError`` / ``DistBackendError``); :func:`as_stalled` turns such an error into a
:class:`StalledRankError` that names this rank and the phase. NCCL aborts the process from its own watchdog after
the same timeout (no exception to turn into a sentence; its log line names the collective).
"""

from __future__ import annotations

from datetime import timedelta

__all__ = ["DEFAULT_TIMEOUT_S", "StalledRankError", "phase", "current_phase", "as_stalled", "timeout_delta"]

DEFAULT_TIMEOUT_S = 600.0  # parallel.timeout: long enough for a slow checkpoint, far below torch's 30 minutes

_current = "start-up"
# substrings of the errors gloo / the c10d store raise when a peer is gone or a wait timed out
_MARKERS = (
    "timed out",
    "timeout",
    "connection",
    "closed by peer",
    "reset by peer",
    "broken pipe",
    "gloo",
    "nccl",
    "socket",
    "peer",
    "store",
)


class StalledRankError(RuntimeError):
    """A collective failed because another rank stopped, died or never joined; the message names this rank and what
    it was waiting for."""


def phase(name: str) -> None:
    """Record what this rank is about to wait for (read by :func:`as_stalled`)."""
    global _current
    _current = name


def current_phase() -> str:
    return _current


def timeout_delta(seconds: float) -> timedelta:
    return timedelta(seconds=float(seconds))


def as_stalled(exc: BaseException, rank: int, world: int, timeout_s: float | None = None) -> StalledRankError | None:
    """A one-line :class:`StalledRankError` for ``exc`` when it is a failed collective of a multi-rank job (a
    timeout or a lost peer); None for anything else."""
    if world <= 1 or not isinstance(exc, RuntimeError) or isinstance(exc, StalledRankError):
        return None
    text = " ".join(str(exc).split())
    lowered = text.lower()
    is_dist = type(exc).__name__ in ("DistBackendError", "DistStoreError", "DistNetworkError", "DistError")
    if not is_dist and not any(m in lowered for m in _MARKERS):
        return None
    timed_out = "timed out" in lowered or "timeout" in lowered
    what = (
        f"timed out after {timeout_s:g} s (parallel.timeout)"
        if timed_out and timeout_s
        else "timed out"
        if timed_out
        else "lost a peer rank"
    )
    cause = text if len(text) <= 160 else text[:157] + "..."
    return StalledRankError(
        f"rank {rank} of {world} {what} while waiting in the {_current}: another rank stopped, died or never joined "
        f"(check its log; a killed job resumes from the last complete checkpoint). Cause: {cause}"
    )
