"""Errors a user can act on: the CLI prints their message, without a traceback."""


class RecoError(Exception):
    """Base of reco's errors; the message says what is wrong and how to fix it."""


class ConfigError(RecoError, ValueError):
    """A configuration that cannot be run; the message names the key and the fix."""


def raised_in_task(err: BaseException) -> BaseException:
    """The exception a Ray task or actor call raised: Ray re-raises it wrapped (an instance of
    the original's class too, where it can be), with its text the whole remote traceback and
    the original as `cause`."""
    cause = getattr(err, "cause", None)
    return cause if isinstance(cause, BaseException) else err


FAILURES_SHOWN = 5


def shards_failed_message(desc: str, failures: list[str], total: int) -> str:
    """For a stage whose other shards are done and kept: how many of `total` failed, the
    first few `failures` (one line each), and what to do."""
    shown = "\n  ".join(failures[:FAILURES_SHOWN])
    more = f"\n  and {len(failures) - FAILURES_SHOWN} more" if len(failures) > FAILURES_SHOWN else ""
    return (f"{desc}: {len(failures)} of {total} shards failed ({total - len(failures)} done); "
            f"re-run the same command to retry them:\n  {shown}{more}")
