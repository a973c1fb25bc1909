"""The refresher's seam to a job scheduler: run a job once after a delay, by id; APScheduler behind it.

The refresher only ever needs one pending run per job id (each job reschedules itself when it ends),
so the seam is four calls. Tests pass a fake that records what is scheduled and runs a job when the
test says so, with a fake clock: nothing sleeps, and no private method is patched.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Protocol

from apscheduler.executors.pool import ThreadPoolExecutor
from apscheduler.jobstores.base import JobLookupError
from apscheduler.schedulers.background import BackgroundScheduler

logging.getLogger("apscheduler").setLevel(logging.ERROR)

Job = Callable[[], None]


class Scheduler(Protocol):
    """Runs jobs on worker threads, never on the event loop."""

    def start(self) -> None: ...

    def shutdown(self) -> None:
        """Stop running jobs; a job under way finishes on its own thread."""

    def schedule(self, job_id: str, delay: float, job: Job) -> None:
        """Run ``job`` once, ``delay`` seconds from now (0: as soon as a worker is free), replacing
        the pending run of ``job_id`` if there is one. After ``shutdown`` it does nothing."""

    def cancel(self, job_id: str) -> None:
        """Drop the pending run of ``job_id``, if any."""


class ApScheduler:
    """``Scheduler`` over APScheduler's BackgroundScheduler: one date-triggered job per id.

    ``max_instances=1`` keeps two runs of one id from overlapping; ``coalesce`` and no misfire grace
    run a late job once, however late. Delays are turned into dates with ``time.time``, the clock
    APScheduler itself compares them with.
    """

    def __init__(self, workers: int) -> None:
        self._scheduler = BackgroundScheduler(
            executors={"default": ThreadPoolExecutor(max_workers=workers)},
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
            timezone=UTC,
        )

    def start(self) -> None:
        self._scheduler.start()

    def shutdown(self) -> None:
        self._scheduler.shutdown(wait=False)

    def schedule(self, job_id: str, delay: float, job: Job) -> None:
        when = datetime.fromtimestamp(time.time() + delay, UTC)
        # RuntimeError: the scheduler is shutting down.
        with contextlib.suppress(RuntimeError, JobLookupError):
            self._scheduler.add_job(job, "date", run_date=when, id=job_id, replace_existing=True)

    def cancel(self, job_id: str) -> None:
        with contextlib.suppress(JobLookupError):
            self._scheduler.remove_job(job_id)
