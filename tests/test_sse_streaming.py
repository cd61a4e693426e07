"""Lookup event streams: the log, the shared subscription, replay and live over real HTTP (gunicorn gevent)."""

from __future__ import annotations

import threading
import time

import psutil
import pytest
from conftest import FAST_LIMITS, wait_for
from sse_client import Comment, Event, Stream, read_all

from enrich.services import services
from sse_streaming import RESYNC, EventHub, EventLog, Listener, Notice, follow

# -- the log and the hub, in process -----------------------------------------------------------


@pytest.fixture
def events(redis_client, settings):
    return EventLog(redis_client, settings)


@pytest.fixture
def hub(settings):
    hub = EventHub(settings)
    yield hub
    hub.stop()


def test_published_events_get_increasing_log_ids_and_a_timestamp(events):
    ids = [events.publish("L1", "source", {"n": n}) for n in range(5)]
    logged = events.read_after("L1")
    assert [m.id for m in logged] == ids
    assert [m.type for m in logged] == ["source"] * 5
    assert all('"timestamp":' in m.data for m in logged)
    assert sorted(ids, key=lambda i: tuple(map(int, i.split("-")))) == ids
    assert [m.id for m in events.read_after("L1", ids[2])] == ids[3:]
    assert events.redis.ttl(events.stream_key("L1")) > 0


def _notices(listener, count):
    """The next `count` announcements, skipping the resync a fresh subscription sends."""
    notices = []
    while len(notices) < count:
        item = listener.inbox.get(timeout=5)
        if item is not RESYNC:
            notices.append(item)
    return notices


def test_the_hub_announces_each_event_with_the_id_before_it(events, hub):
    listener = hub.listen("L2")
    assert hub.stats()["subscribed"]
    first = events.publish("L2", "source", {"n": 1})
    second = events.publish("L2", "progress", {"done": 1, "total": 1})
    events.publish("someone-else", "source", {"n": 0})  # not followed here: not delivered
    notices = _notices(listener, 2)
    assert [(n.previous_id, n.message.id, n.message.type) for n in notices] == [
        ("0-0", first, "source"),
        (first, second, "progress"),
    ]
    assert listener.inbox.empty()
    hub.close(listener)
    hub.close(listener)  # idempotent
    assert hub.stats()["open_streams"] == 0


def test_one_connection_serves_every_listener_of_the_process(events, hub, redis_client):
    listeners = [hub.listen(f"L{n % 50}") for n in range(500)]
    assert hub.stats() == {**hub.stats(), "open_streams": 500, "lookups_followed": 50}
    pubsub_clients = [c for c in redis_client.client_list() if c.get("sub") not in (None, "0")]
    ours = [c for c in pubsub_clients if int(c.get("sub", 0)) > 0]
    assert len(ours) >= 1
    events.publish("L7", "source", {"n": 7})
    receivers = [listener for listener in listeners if listener.lookup_id == "L7"]
    for listener in receivers:
        assert _notices(listener, 1)[0].message.type == "source"
    for listener in listeners:
        hub.close(listener)
    assert hub.stats()["open_streams"] == 0 and hub.stats()["lookups_followed"] == 0


def _drain(generator, count):
    return [next(generator) for _ in range(count)]


def test_the_flask_sse_api_publishes_to_a_stream_and_reads_it_back(app):
    """`sse.publish` and `sse.messages`: flask-sse's blueprint API, which the README documents, over
    the lookup logs; an event published through it reaches a stream, which ends at `complete`."""
    from sse_streaming import sse

    with app.app_context():
        first = sse.publish({"state": "ok"}, type="source", channel="L-api")
        sse.publish("done", type="complete", channel="L-api")
        received = list(sse.messages(channel="L-api"))
    assert [(m.type, m.id) for m in received][0] == ("source", first)
    assert [m.type for m in received] == ["source", "complete"]
    assert '"state":"ok"' in received[0].data and '"data":"done"' in received[1].data


def test_follow_replays_then_goes_live_without_duplicates(events):
    listener = Listener("L3")
    first = events.publish("L3", "source", {"n": 1})
    second = events.publish("L3", "source", {"n": 2})
    stream = follow(events, listener, "0-0", heartbeat=5)
    assert [m.id for m in _drain(stream, 2)] == [first, second]
    # An announcement of an event the replay already sent is dropped ...
    listener.inbox.put(Notice(first, events.read_after("L3", first)[0]))
    # ... and one that follows the last id sent goes out as it is.
    third = events.publish("L3", "source", {"n": 3})
    listener.inbox.put(Notice(second, events.read_after("L3", second)[0]))
    assert next(stream).id == third


def test_follow_reads_the_gap_when_an_announcement_was_missed(events):
    listener = Listener("L4")
    stream = follow(events, listener, "0-0", heartbeat=5)
    first = events.publish("L4", "source", {"n": 1})
    listener.inbox.put(Notice("0-0", events.read_after("L4")[0]))
    assert next(stream).id == first
    second = events.publish("L4", "source", {"n": 2})  # its announcement is lost
    third = events.publish("L4", "complete", {"n": 3})
    listener.inbox.put(Notice(second, events.read_after("L4", second)[0]))
    assert [m.id for m in stream] == [second, third]  # the gap, then the end after `complete`


def test_follow_reads_the_log_after_a_hub_reconnect_and_heartbeats_when_quiet(events):
    listener = Listener("L5")
    stream = follow(events, listener, "0-0", heartbeat=0.05)
    assert next(stream) is None  # heartbeat
    first = events.publish("L5", "source", {"n": 1})
    listener.inbox.put(RESYNC)
    assert next(stream).id == first


def test_the_hub_reconnects_and_streams_catch_up_from_the_log(events, hub, redis_client):
    listener = hub.listen("L6")
    redis_client.client_kill_filter(_type="pubsub")
    wait_for(lambda: hub.stats()["reconnects"] >= 1, message="the hub to notice the lost connection")
    wait_for(lambda: hub.stats()["subscribed"], message="the hub to subscribe again")
    published = events.publish("L6", "complete", {"n": 1})
    stream = follow(events, listener, "0-0", heartbeat=5)
    assert [m.id for m in stream] == [published]


# -- over real HTTP: gunicorn with one gevent worker, no Celery worker ---------------------------


@pytest.fixture(scope="module")
def web(redis_url, sandbox_url, tmp_path_factory):
    """A web process only: lookups stay queued, the test publishes their events itself."""
    from stack import Stack

    stack = Stack(redis_url, sandbox_url, tmp_path_factory.mktemp("web"), SSE_HEARTBEAT_INTERVAL="0.3")
    try:
        stack.start_web()
        yield stack
    finally:
        stack.stop()


def _queued_lookup(stack, sandbox, seed: int) -> dict:
    response = stack.post_lookup(sandbox.identifiers("cnpj", 1, seed=seed)[0], refresh=True)
    assert response.status_code == 202, response.text
    return response.json()


def _publisher(stack) -> EventLog:
    return services(stack.app).events


def test_a_stream_opens_with_a_snapshot_at_once_and_sends_heartbeats(web, sandbox):
    lookup = _queued_lookup(web, sandbox, seed=101)
    stream = Stream(web.web_url + lookup["links"]["events"])
    try:
        assert stream.response.headers["Content-Type"].startswith("text/event-stream")
        assert stream.response.headers["Cache-Control"] == "no-cache"
        snapshot = stream.records.get(timeout=5)
        assert isinstance(snapshot, Event) and snapshot.type == "snapshot" and snapshot.id is None
        assert snapshot.json["id"] == lookup["id"] and snapshot.json["status"] == "queued"
        assert snapshot.retry and "timestamp" in snapshot.json
        beats = [stream.records.get(timeout=5) for _ in range(2)]
        assert all(isinstance(record, Comment) and record.text == "heartbeat" for record in beats)
    finally:
        stream.close()


def test_events_from_another_process_arrive_live_and_the_stream_ends_after_complete(web, sandbox):
    lookup = _queued_lookup(web, sandbox, seed=102)
    stream = Stream(web.web_url + lookup["links"]["events"])
    assert stream.next_event().type == "snapshot"
    publisher = _publisher(web)
    source_id = publisher.publish(lookup["id"], "source", {"source": "brasilapi", "state": "ok"})
    first = stream.next_event()
    assert (first.type, first.id, first.json["source"]) == ("source", source_id, "brasilapi")
    publisher.publish(lookup["id"], "partial", {"unsettled": ["receitaws"]})
    assert stream.next_event().type == "partial"  # partial does not end the stream
    late = publisher.publish(lookup["id"], "source", {"source": "receitaws", "state": "ok"})
    complete = publisher.publish(lookup["id"], "complete", {"status": "complete"})
    assert [(e.type, e.id) for e in stream.until("complete")] == [("source", late), ("complete", complete)]
    assert stream.ended.wait(5), "the stream did not end after complete"


@pytest.mark.parametrize("how", ["header", "query"])
def test_reconnecting_with_last_event_id_replays_exactly_the_missed_events(web, sandbox, how):
    lookup = _queued_lookup(web, sandbox, seed=103 if how == "header" else 104)
    publisher = _publisher(web)
    ids = [publisher.publish(lookup["id"], "source", {"n": n}) for n in range(6)]
    url = web.web_url + lookup["links"]["events"]
    if how == "header":
        stream = Stream(url, last_event_id=ids[2])
    else:
        stream = Stream(f"{url}?last_event_id={ids[2]}")
    try:
        assert stream.next_event().type == "snapshot"
        replayed = [stream.next_event() for _ in range(3)]
        assert [e.id for e in replayed] == ids[3:]
        live = publisher.publish(lookup["id"], "error", {"message": "gave up"})
        assert stream.next_event().id == live
        assert stream.ended.wait(5)
        assert stream.records.empty()  # nothing twice
    finally:
        stream.close()


def _publish_burst(publisher, lookup_id, published):
    for n in range(20):
        published.append(publisher.publish(lookup_id, "source", {"n": n}))
    published.append(publisher.publish(lookup_id, "complete", {"n": 20}))


def test_events_published_while_the_browser_connects_are_all_delivered(web, sandbox):
    """flask-sse 1.0.0 loses events published before its subscription is live; the log does not."""
    for trial in range(10):
        lookup = _queued_lookup(web, sandbox, seed=200 + trial)
        publisher = _publisher(web)
        published = []

        thread = threading.Thread(target=_publish_burst, args=(publisher, lookup["id"], published))
        thread.start()
        records = read_all(web.web_url + lookup["links"]["events"])
        thread.join()
        received = [r.id for r in records if isinstance(r, Event) and r.type != "snapshot"]
        assert received == published, f"trial {trial}: lost or repeated events"


def test_unknown_lookups_are_404_and_bad_event_ids_400(web):
    response = web.get("/api/lookups/no-such-lookup/events")
    assert response.status_code == 404 and response.json()["error"] == "not_found"
    assert web.get("/api/lookups/" + "x" * 200 + "/events").status_code == 404
    lookup = web.post_lookup("11.222.333/0001-81", refresh=True).json()
    response = web.get(lookup["links"]["events"], headers={"Last-Event-ID": "<script>"})
    assert response.status_code == 400 and response.json()["field"] == "last_event_id"
    assert "<script>" not in response.text


def _web_worker(stack) -> psutil.Process:
    master = psutil.Process(stack.processes["web"][0].pid)
    return wait_for(lambda: (master.children() or [None])[0], message="the gunicorn worker")


def _redis_connections(process: psutil.Process, redis_port: int) -> int:
    return sum(
        1
        for c in process.net_connections(kind="tcp")
        if c.raddr and c.raddr.port == redis_port and c.status == psutil.CONN_ESTABLISHED
    )


def test_200_streams_on_one_worker_all_get_their_events_over_a_few_redis_connections(web, sandbox, redis_url):
    redis_port = int(redis_url.rsplit(":", 1)[1].split("/")[0])
    identifiers = sandbox.identifiers("cnpj", 200, seed=300)
    lookups = [web.post_lookup(value, refresh=True).json() for value in identifiers]
    streams = [Stream(web.web_url + lookup["links"]["events"]) for lookup in lookups]
    try:
        for stream in streams:
            assert stream.next_event().type == "snapshot"
        status = wait_for(lambda: web.get("/api/status").json()["event_streams"], message="200 open streams")
        assert status["open_streams"] == 200 and status["subscribed"]
        worker = _web_worker(web)
        assert _redis_connections(worker, redis_port) <= 10
        publisher = _publisher(web)
        for lookup in lookups:
            publisher.publish(lookup["id"], "source", {"lookup": lookup["id"]})
            publisher.publish(lookup["id"], "complete", {"lookup": lookup["id"]})
        for lookup, stream in zip(lookups, streams, strict=True):
            received = stream.until("complete")
            assert [e.type for e in received] == ["source", "complete"]
            assert {e.json["lookup"] for e in received} == {lookup["id"]}
    finally:
        for stream in streams:
            stream.close()
    wait_for(
        lambda: web.get("/api/status").json()["event_streams"]["open_streams"] == 0,
        message="closed streams to be released",
    )


def test_a_closed_stream_is_released_by_the_next_heartbeat(web, sandbox):
    lookup = _queued_lookup(web, sandbox, seed=105)
    stream = Stream(web.web_url + lookup["links"]["events"])
    assert stream.next_event().type == "snapshot"
    wait_for(
        lambda: web.get("/api/status").json()["event_streams"]["open_streams"] >= 1, message="stream open"
    )
    stream.close()
    wait_for(
        lambda: web.get("/api/status").json()["event_streams"]["open_streams"] == 0,
        message="the abandoned stream to be released",
    )


# -- over real HTTP with a Celery worker: real lookups -------------------------------------------


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    from stack import started

    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("stack"), **FAST_LIMITS) as stack:
        yield stack


def test_a_real_lookup_streams_every_source_then_complete(stack, sandbox):
    created = stack.post_lookup(sandbox.identifiers("cnpj", 1, seed=400)[0]).json()
    records = read_all(stack.web_url + created["links"]["events"])
    events = [r for r in records if isinstance(r, Event)]
    assert events[0].type == "snapshot" and events[0].id is None
    assert events[-1].type == "complete" and events[-1].json["status"] == "complete"
    logged = events[1:]
    assert all(e.id for e in logged) and len({e.id for e in logged}) == len(logged)
    sources = {e.json["source"]: e.json for e in logged if e.type == "source" and e.json["state"] == "ok"}
    assert set(sources) == set(created["sources"])
    for data in sources.values():
        assert set(data) >= {"source", "state", "data", "cached", "stale", "elapsed_ms", "error", "timestamp"}
    # Workers publish progress concurrently, so the log may hold it out of order; the most is all.
    progress = [e.json for e in logged if e.type == "progress"]
    assert max(p["done"] for p in progress) == len(created["sources"])
    assert {p["total"] for p in progress} == {len(created["sources"])}
    assert events[-1].json["progress"] == {"done": len(created["sources"]), "total": len(created["sources"])}
    assert events[-1].json["checks"], "complete carries the cross-checks"


def test_a_subscriber_after_the_end_gets_snapshot_and_complete(stack, sandbox):
    created = stack.post_lookup(sandbox.identifiers("cnpj", 1, seed=401)[0]).json()
    stack.wait_status(created["id"])
    records = [r for r in read_all(stack.web_url + created["links"]["events"]) if isinstance(r, Event)]
    assert records[0].type == "snapshot" and records[0].json["status"] == "complete"
    assert records[-1].type == "complete"
    # Reconnecting after the last event still ends the stream with `complete`.
    again = [
        r
        for r in read_all(stack.web_url + created["links"]["events"], last_event_id=records[-1].id)
        if isinstance(r, Event)
    ]
    assert [e.type for e in again] == ["snapshot", "complete"]


def test_a_cached_lookup_streams_snapshot_and_complete(stack, sandbox):
    identifier = sandbox.identifiers("cnpj", 1, seed=402)[0]
    stack.wait_status(stack.post_lookup(identifier).json()["id"])
    cached = stack.post_lookup(identifier)
    assert cached.status_code == 200
    started = time.monotonic()
    records = [r for r in read_all(stack.web_url + cached.json()["links"]["events"]) if isinstance(r, Event)]
    assert [e.type for e in records] == ["snapshot", "complete"]
    assert records[1].json["cached"] is True
    assert time.monotonic() - started < 5
