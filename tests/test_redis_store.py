"""redis_store.py: every key the service writes expires, but the few named in WITHOUT_TTL."""

from __future__ import annotations

import fnmatch

import requests
from conftest import FAST_LIMITS, wait_for

from enrich import redis_store
from enrich.services import services


def _keys_without_ttl(client, prefix: str) -> list[str]:
    keys = [key.decode() for key in client.scan_iter(match=f"{prefix}:*", count=1000)]
    with client.pipeline(transaction=False) as pipe:
        for key in keys:
            pipe.ttl(key)
        ttls = pipe.execute()
    return sorted(key for key, ttl in zip(keys, ttls, strict=True) if ttl == -1)


def test_every_key_expires_but_the_named_few_after_lookups_a_batch_a_fault_and_cleanup(make_stack, sandbox):
    from enrich import maintenance

    stack = make_stack(**FAST_LIMITS, RETRY_MAX="0", BATCH_POLL_INTERVAL="0.05")
    stack.start_worker()
    stack.start_web()
    # Lookups: a company (with its CEP's cross-check), a CEP, a CPF, one answered from the cache.
    company = stack.post_lookup(sandbox.known("cnpj", seed=1501)).json()
    stack.wait_status(company["id"])
    stack.wait_status(stack.post_lookup(sandbox.known("cep", seed=1502)).json()["id"])
    assert stack.post_lookup("111.444.777-35").status_code == 200
    assert stack.post_lookup(company["identifier"]).status_code == 200
    # A fault: an upstream down gives up at once (RETRY_MAX=0) into the dead letters.
    sandbox.control("viacep", outage=True)
    sandbox.control("brasilapi", outage=True)
    stack.wait_status(stack.post_lookup(sandbox.known("cep", seed=1503)).json()["id"])
    sandbox.reset()
    # A batch, with a cached row, a new one and an invalid one; then one cancelled.
    rows = [company["identifier"], sandbox.known("cep", seed=1504), "not-an-identifier"]
    fresh = [sandbox.known("cep", seed=1505)]  # nothing cached: its items hash is made by the settle script
    for identifiers in (rows, fresh):
        batch = requests.post(
            f"{stack.web_url}/api/batches", json={"identifiers": identifiers}, timeout=10
        ).json()
        wait_for(
            lambda b=batch: stack.get(f"/api/batches/{b['id']}").json()["finished_at"], 30, 0.1, "a batch"
        )
    with stack.app.app_context():
        maintenance.cleanup(services())
        maintenance.health_check(services())

    prefix = stack.settings.key_prefix
    named = [f"{prefix}:{pattern}" for pattern in redis_store.WITHOUT_TTL]
    stray = [key for key in _keys_without_ttl(services(stack.app).redis, prefix)
             if not any(fnmatch.fnmatchcase(key, pattern) for pattern in named)]  # fmt: skip
    assert stray == [], "\n".join(stray)
