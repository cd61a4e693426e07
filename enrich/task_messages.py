"""The task messages the service sends: the tasks' names, their Celery priorities, their payloads.

`SourceCallTask` is the `job_queue.fetch_source` task's payload and `LookupTask` `fetch_lookup`'s:
their fields, in order, are the task's positional arguments, so every send of a call (the first,
a wait, a retry, a dead letter's requeue) is built from one of them, and the worker reads its
arguments back into the same class.
"""

from __future__ import annotations

import dataclasses

from enrich.lookups import FETCH_TASK as FETCH_TASK  # the task registry (a layer below) names it
from enrich.services import Services

LOOKUP_TASK = "job_queue.fetch_lookup"
FINALIZE_TASK = "job_queue.finalize_lookup"


def celery_priority(priority: int) -> int:
    """API priority 1..10 (10 most urgent) onto the Redis transport's 0..9 (0 served first).

    A batch item (pipeline.BATCH_PRIORITY, 0) shares the lowest level with priority 1.
    """
    return 10 - max(1, min(10, priority))


@dataclasses.dataclass(frozen=True)
class SourceCallTask:
    """One call of one source for one lookup, as the fetch_source task carries it.

    `attempt`: failed attempts so far; `reserved`: its token is taken (it waited for its slot);
    `requeue`: a dead letter sent again, whose answer replaces the settled one; `held_since`: when
    a batch item's call was first held back for its source's rate limit (0: never); `token_at`:
    when its reserved token is due (time.time(); 0: none), before which it takes no send slot (it
    is sent a little ahead of it).  Fields are only ever added last, with a default, so a message
    of the previous release still reads.
    """

    lookup_id: str
    source: str
    kind: str
    value: str
    priority: int
    attempt: int = 0
    reserved: bool = False
    requeue: bool = False
    held_since: float = 0.0
    token_at: float = 0.0

    def args(self) -> list:
        """The task's positional arguments."""
        return [getattr(self, field.name) for field in dataclasses.fields(self)]

    def options(self, task_id: str | None = None, priority: int | None = None) -> dict:
        """apply_async options: its Celery priority (or `priority`, already on Celery's scale) and id."""
        options: dict = {"priority": celery_priority(self.priority) if priority is None else priority}
        if task_id:
            options["task_id"] = task_id
        return options


@dataclasses.dataclass(frozen=True)
class LookupTask:
    """A lookup's first task (fetch_lookup): every source named in `call_ids` called at once, each
    under its own call id (the Celery task id of that source's later sends)."""

    lookup_id: str
    kind: str
    value: str
    priority: int
    call_ids: dict[str, str]

    def args(self) -> list:
        return [getattr(self, field.name) for field in dataclasses.fields(self)]


def send_task(parts: Services, name: str, args: list, options: dict) -> None:
    """Put a task on the broker (`options` as for apply_async: task_id, priority)."""
    parts.celery.send_task(name, args=args, **options)
