"""Sealed ids of lookups answered from the cache (enrich/answer_ids.py) and the store's use of them."""

from __future__ import annotations

import base64
import dataclasses
import time

import pytest

from enrich import answer_ids, status_history
from enrich.answer_ids import AnswerIds, looks_like_answer_id
from enrich.lookups import Lookup, LookupStatus, LookupStore, SourceResult, SourceState, new_lookup_id

DIGEST = bytes(range(16))


def _answered(identifier: str = "01310100", created_at: float | None = None, priority: int = 5) -> Lookup:
    now = time.time() if created_at is None else created_at
    data = {"cep": identifier, "localidade": "São Paulo"}
    return Lookup(
        id=new_lookup_id(),
        type="cep",
        identifier=identifier,
        priority=priority,
        status=LookupStatus.COMPLETE,
        created_at=now,
        deadline_at=now + 15,
        sources={"viacep": SourceResult("viacep", SourceState.OK, data=data, cached=True, elapsed_ms=0.0)},
        result={"data": data, "checks": []},
        completed_at=now,
    )


def test_an_id_opens_to_what_it_sealed_and_is_url_safe_of_a_fixed_length(settings, redis_client):
    ids = AnswerIds(redis_client, settings)
    created = 1_764_000_000.123
    sealed = [ids.issue(DIGEST, created, 9) for _ in range(200)]
    assert len(set(sealed)) == 200  # a fresh nonce each: two askers never share an id
    for token in sealed:
        assert len(token) == answer_ids.ID_LENGTH and looks_like_answer_id(token)
        assert set(token) <= set("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
        ref = ids.open(token)
        assert ref == answer_ids.AnswerRef(digest=DIGEST, created_at=created, priority=9)
    assert not looks_like_answer_id(new_lookup_id())  # a record's id is never taken for one


def test_ids_of_the_same_answer_share_no_bytes_but_their_format(settings, redis_client):
    """Two ids naming one body look unrelated: what they name is encrypted, not only signed."""
    ids = AnswerIds(redis_client, settings)
    first, second = (base64.urlsafe_b64decode(ids.issue(DIGEST, 1.0, 5) + "==") for _ in range(2))
    assert first[:1] == second[:1] == answer_ids.VERSION
    assert DIGEST not in first and DIGEST not in second
    same = sum(a == b for a, b in zip(first[1:], second[1:], strict=True))
    assert same < 8  # ~0.2 of 51 bytes agree by chance; a shared plaintext or digest would be 16+


def test_an_altered_forged_or_foreign_id_does_not_open(settings, redis_client):
    ids = AnswerIds(redis_client, settings)
    token = ids.issue(DIGEST, 1.0, 5)
    flipped = token[:30] + ("B" if token[30] != "B" else "C") + token[31:]
    assert ids.open(flipped) is None
    assert ids.open("A" * answer_ids.ID_LENGTH) is None
    assert ids.open(token[:-1]) is None and ids.open(token + "A") is None
    assert ids.open("A" + "!" * (answer_ids.ID_LENGTH - 1)) is None  # not base64
    other_cluster = AnswerIds(
        redis_client, dataclasses.replace(settings, key_prefix=settings.key_prefix + "x")
    )
    try:
        assert other_cluster.open(token) is None  # another key: not ours
    finally:
        redis_client.delete(other_cluster.key_name)


def test_processes_share_the_key_and_agree_again_after_redis_lost_it(settings, redis_client):
    """Every process reads the one key (the first makes it); one that still holds a key Redis
    has lost reads the new one when an id does not open."""
    web_1, web_2 = AnswerIds(redis_client, settings), AnswerIds(redis_client, settings)
    assert web_2.open(web_1.issue(DIGEST, 1.0, 5)) is not None
    assert redis_client.ttl(web_1.key_name) == -1  # named in redis_store.WITHOUT_TTL
    redis_client.delete(web_1.key_name)  # a flushed Redis
    web_3 = AnswerIds(redis_client, settings)  # makes a new key
    fresh = web_3.issue(DIGEST, 2.0, 5)
    web_2._loaded_at = float("-inf")  # its last read is older than RELOAD_INTERVAL
    assert web_2.open(fresh).created_at == 2.0


def test_the_store_answers_without_a_round_trip_and_reads_back_the_same_bytes(settings, redis_client):
    store = LookupStore(redis_client, settings)
    versions = ("cep", "01310100", (("viacep", 1.0),))
    store.create_answered(_answered(), versions)  # writes the shared body once
    before = redis_client.info("commandstats")
    calls = sum(v["calls"] for k, v in before.items() if k.startswith("cmdstat_"))
    answers = [_answered(priority=p) for p in range(10)]
    encoded = [store.create_answered(lookup, versions) for lookup in answers]
    after = redis_client.info("commandstats")
    # INFO itself is the only command in between (the Tally's flush runs a second later).
    assert sum(v["calls"] for k, v in after.items() if k.startswith("cmdstat_")) - calls == 1
    for lookup, sent in zip(answers, encoded, strict=True):
        read = store.get(lookup.id)
        assert read.encoded == sent and read.priority == lookup.priority
        assert read.to_dict() == lookup.to_dict()


def test_an_answer_past_its_retention_or_without_its_body_reads_as_unknown(settings, redis_client):
    store = LookupStore(redis_client, dataclasses.replace(settings, lookup_retention=3600))
    old = _answered(created_at=time.time() - 3601)
    store.create_answered(old, None)
    assert store.get(old.id) is None and store.statuses([old.id]) == [None]
    recent = _answered(identifier="20040002")
    store.create_answered(recent, None)
    assert store.statuses([recent.id]) == [LookupStatus.COMPLETE]
    for key in redis_client.scan_iter(match=f"{settings.key_prefix}:answer:*"):
        redis_client.delete(key)
    assert store.get(recent.id) is None


def test_two_identifiers_with_the_same_sources_body_keep_their_own_identity(settings, redis_client):
    """Two CEPs that no source knows have equal sources, result and checks: their bodies must
    still differ, or one's id would read back as the other."""
    store = LookupStore(redis_client, settings)

    def unknown(cep: str) -> Lookup:
        lookup = _answered(identifier=cep)
        lookup.sources = {
            "viacep": SourceResult("viacep", SourceState.NOT_FOUND, cached=True, elapsed_ms=0.0)
        }
        lookup.result = {"data": None, "checks": []}
        return lookup

    first, second = unknown("01310100"), unknown("20040002")
    store.create_answered(first, None)
    store.create_answered(second, None)
    assert store.get(first.id).identifier == "01310100" and store.get(second.id).identifier == "20040002"


def test_the_previous_releases_stored_answers_are_still_read(settings, redis_client):
    store = LookupStore(redis_client, settings)
    lookup = _answered()
    lookup.created_at = lookup.completed_at = round(lookup.created_at, 3)
    answer = lookup.to_dict()
    head = {name: answer[name] for name in lookup.head()}
    inner = (
        b'"sources":{"viacep":' + _encode(answer["sources"]["viacep"]) + b'},"progress":{"done":1,"total":1}'
    )
    inner += b',"cached":true,"result":' + _encode(answer["result"]) + b',"checks":[],"tasks":{}'
    redis_client.set(store.answer_body_key("d1"), inner, ex=60)
    redis_client.set(store.answered_key(lookup.id), b"d1\n" + _encode(head), ex=60)
    assert store.get(lookup.id).to_dict() == answer
    assert store.statuses([lookup.id]) == [LookupStatus.COMPLETE]


def _encode(value) -> bytes:
    from enrich.json_encoding import encode_json

    return encode_json(value)


def test_answers_are_counted_in_the_status_history_within_about_a_second(settings, redis_client):
    store = LookupStore(redis_client, settings)
    for _ in range(5):
        store.create_answered(_answered(), ("cep", "01310100", (("viacep", 1.0),)))
    key = status_history.bucket_key(settings, status_history.bucket_start(time.time()))

    def counted() -> int:
        total = 0
        for bucket in redis_client.scan_iter(match=f"{settings.key_prefix}:history:*"):
            total += int(redis_client.hget(bucket, "answered") or 0)
        return total

    deadline = time.monotonic() + 10
    while counted() < 5 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert counted() == 5
    assert redis_client.ttl(key) > 0 or not redis_client.exists(key)


def test_a_tally_that_cannot_reach_redis_drops_its_counts_and_stays_usable(settings, redis_client):
    from devstack.embedded_redis import free_port
    from enrich import redis_store

    down = redis_store.connect(dataclasses.replace(settings, redis_url=f"redis://127.0.0.1:{free_port()}/0"))
    tally = status_history.Tally(down, settings)
    try:
        tally.add({"answered": 2})
        assert tally.flush() is False
        tally.redis = redis_client
        tally.add({"answered": 1}, now=1_000_000.0)
        assert tally.flush() is True
        assert redis_client.hget(status_history.bucket_key(settings, 1_000_000), "answered") == b"1"
    finally:
        down.close()


@pytest.mark.parametrize("bad", ["", "A", "A" * 200, "../../etc", "A" * (answer_ids.ID_LENGTH - 1) + "="])
def test_odd_ids_read_as_unknown(settings, redis_client, bad):
    assert LookupStore(redis_client, settings).get(bad) is None
