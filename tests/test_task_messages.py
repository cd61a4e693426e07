"""task_messages.py: the tasks' payloads, their priorities, and sending them to the broker."""

from __future__ import annotations

import orjson
import pytest

from enrich import redis_broker
from enrich.task_messages import FETCH_TASK, LookupTask, SourceCallTask, celery_priority, send_task


@pytest.fixture
def app(make_sandbox_app):
    """An in-process app on the test Redis (its Celery app sends to the test Redis's broker lists)."""
    return make_sandbox_app()


# -- the task payloads and priorities ----------------------------------------------------------


def test_a_source_call_task_is_its_fields_in_order_and_survives_the_broker_json():
    task = SourceCallTask(
        "L1",
        "viacep",
        "cep",
        "01310100",
        7,
        attempt=2,
        reserved=True,
        requeue=True,
        held_since=12.5,
        token_at=99.5,
    )

    args = task.args()

    assert args == ["L1", "viacep", "cep", "01310100", 7, 2, True, True, 12.5, 99.5]
    assert SourceCallTask(*orjson.loads(orjson.dumps(args))) == task
    # A payload sent before the optional fields existed still reads, with their defaults.
    assert SourceCallTask(*args[:5]) == SourceCallTask("L1", "viacep", "cep", "01310100", 7)


def test_a_lookup_task_is_its_fields_in_order_and_survives_the_broker_json():
    task = LookupTask("L1", "cep", "01310100", 4, {"brasilapi": "c1", "viacep": "c2"})

    assert task.args() == ["L1", "cep", "01310100", 4, {"brasilapi": "c1", "viacep": "c2"}]
    assert LookupTask(*orjson.loads(orjson.dumps(task.args()))) == task


@pytest.mark.parametrize(
    ("priority", "task_id", "override", "options"),
    [
        (10, "call-1", None, {"priority": 0, "task_id": "call-1"}),
        (1, "call-1", None, {"priority": 9, "task_id": "call-1"}),
        (0, None, None, {"priority": 9}),  # a batch item's call: the lowest level
        (5, "call-1", 0, {"priority": 0, "task_id": "call-1"}),  # a reserved slot jumps the queue
    ],
)
def test_options_give_the_celery_priority_or_the_override_and_the_task_id(
    priority, task_id, override, options
):
    task = SourceCallTask("L1", "viacep", "cep", "01310100", priority)
    assert task.options(task_id, priority=override) == options


@pytest.mark.parametrize(
    ("priority", "level"), [(10, 0), (9, 1), (5, 5), (1, 9), (0, 9), (-3, 9), (11, 0), (99, 0)]
)
def test_celery_priority_maps_api_priorities_onto_the_brokers_levels_within_bounds(priority, level):
    assert celery_priority(priority) == level


def test_send_task_puts_the_payload_on_the_brokers_list_for_its_level(parts):
    task = SourceCallTask("L1", "viacep", "cep", "01310100", 7)

    send_task(parts, FETCH_TASK, task.args(), task.options("call-1"))

    lists = redis_broker.priority_lists(parts.settings.key_prefix)
    waiting = {name: parts.redis.lrange(name, 0, -1) for name in lists}
    assert [name for name, messages in waiting.items() if messages] == [lists[celery_priority(7)]]
    (raw,) = waiting[lists[celery_priority(7)]]
    message = orjson.loads(raw)
    assert message["headers"]["task"] == FETCH_TASK and message["headers"]["id"] == "call-1"
    args, kwargs, _ = orjson.loads(redis_broker.message_text(message))
    assert SourceCallTask(*args) == task and kwargs == {}
