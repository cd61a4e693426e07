"""The `flask` command line (enrich/cli/: commands, admin, watch) through Flask's CliRunner.

Each command runs against the session Redis and is checked by its effect there; `lookup` runs
end to end against a real Celery worker and the sandbox upstream.
"""

from __future__ import annotations

import json
import time

import pytest
from conftest import FAST_LIMITS

from app import close_app, create_app
from devstack.embedded_redis import free_port
from enrich import maintenance
from enrich.feature_flags import FeatureFlags
from enrich.services import services
from enrich.settings import Settings
from enrich.task_messages import FETCH_TASK, FINALIZE_TASK, celery_priority, send_task

CNPJ = "11222333000181"
CNPJ_MASKED = "11.222.333/0001-81"
CEP = "01310100"


@pytest.fixture
def run(app):
    """Invoke a `flask` command line on the app: run("cache", "stats") -> click's Result."""
    runner = app.test_cli_runner()
    return lambda *args: runner.invoke(args=list(args))


def cache_keys(redis_client, settings, kind: str = "*") -> list[bytes]:
    return list(redis_client.scan_iter(match=f"{settings.key_prefix}:cache:v*:g*:{kind}:*"))


def queued(app) -> dict[str, int]:
    with app.app_context():
        return maintenance.queue_depths(services())


def beat(app, hostname: str = "w1@test") -> None:
    """A worker heartbeat, as a live worker writes it."""
    maintenance.record_worker_heartbeat(services(app), hostname)


# -- cache ----------------------------------------------------------------------------------------


def test_cache_invalidate_deletes_one_identifiers_entries_only(app, run, settings, redis_client):
    cache = services(app).cache
    cache.set("cnpj", "brasilapi", CNPJ, {"cnpj": CNPJ}, found=True)
    cache.set("cnpj", "receitaws", CNPJ, {"cnpj": CNPJ}, found=True)
    cache.set("cnpj", "brasilapi", "11444777000161", {"cnpj": "11444777000161"}, found=True)
    assert len(cache_keys(redis_client, settings)) == 3

    result = run("cache", "invalidate", "--type", "cnpj", "--identifier", CNPJ_MASKED)

    assert result.exit_code == 0, result.output
    assert f"deleted 2 cache entries of cnpj {CNPJ}" in result.output
    remaining = cache_keys(redis_client, settings)
    assert len(remaining) == 1 and remaining[0].endswith(b":11444777000161")


def test_cache_invalidate_of_a_type_leaves_the_other_types(app, run, settings, redis_client):
    cache = services(app).cache
    cache.set("cnpj", "brasilapi", CNPJ, {"cnpj": CNPJ}, found=True)
    cache.set("cep", "viacep", CEP, {"cep": CEP}, found=True)

    result = run("cache", "invalidate", "--type", "cnpj", "--json")

    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout) == {"deleted": 1}
    assert cache_keys(redis_client, settings, "cnpj") == []
    assert len(cache_keys(redis_client, settings, "cep")) == 1


def test_cache_invalidate_all_and_bump_generation_each_raise_the_generation(app, run):
    cache = services(app).cache
    cache.set("cep", "viacep", CEP, {"cep": CEP}, found=True)
    assert cache.generation() == 0

    everything = run("cache", "invalidate", "--all", "--json")
    assert everything.exit_code == 0, everything.output
    assert json.loads(everything.stdout) == {"generation": 1}
    bumped = run("cache", "bump-generation")
    assert bumped.exit_code == 0, bumped.output
    assert "cache generation is now 2" in bumped.output

    assert cache.generation() == 2
    assert cache.get("cep", "viacep", CEP) is None


@pytest.mark.parametrize(
    "args",
    [
        pytest.param([], id="nothing"),
        pytest.param(["--all", "--type", "cnpj"], id="all-and-type"),
        pytest.param(["--identifier", CNPJ], id="identifier-without-type"),
        pytest.param(["--type", "cnpj", "--identifier", "123"], id="bad-identifier"),
        pytest.param(["--type", "rg"], id="unknown-type"),
    ],
)
def test_cache_invalidate_refuses_bad_arguments_as_usage_errors(app, run, args):
    services(app).cache.set("cnpj", "brasilapi", CNPJ, {"cnpj": CNPJ}, found=True)

    result = run("cache", "invalidate", *args)

    assert result.exit_code == 2, result.output
    assert "Error:" in result.output and "Traceback" not in result.output
    assert services(app).cache.generation() == 0
    assert services(app).cache.get("cnpj", "brasilapi", CNPJ) is not None


def test_cache_stats_reports_keys_and_hits(app, run):
    cache = services(app).cache
    cache.set("cep", "viacep", CEP, {"cep": CEP}, found=True)
    cache.get_many("cep", ["viacep"], CEP)

    body = json.loads(run("cache", "stats", "--json").stdout)
    human = run("cache", "stats")

    assert body["keys"] == 1 and body["hits"] >= 1 and body["generation"] == 0
    assert human.exit_code == 0 and "generation 0" in human.output and "1 keys" in human.output


# -- breakers -------------------------------------------------------------------------------------


def test_breakers_open_then_reset_change_the_shared_state(app, run):
    breakers = services(app).breakers

    opened = run("breakers", "open", "receitaws")
    assert opened.exit_code == 0, opened.output
    assert breakers.status("receitaws").state == "open"
    listed = run("breakers", "list")
    assert listed.exit_code == 0
    lines = {line.split()[0]: line.split()[1] for line in listed.output.splitlines()}
    assert lines == {"brasilapi": "closed", "receitaws": "open", "opencnpj": "closed", "viacep": "closed"}

    reset = run("breakers", "reset", "receitaws", "--json")
    assert reset.exit_code == 0, reset.output
    assert json.loads(reset.stdout)["state"] == "closed"
    assert breakers.status("receitaws").state == "closed"
    assert json.loads(run("breakers", "list", "--json").stdout)["receitaws"]["state"] == "closed"


@pytest.mark.parametrize("action", ["open", "reset"])
def test_breakers_of_an_unknown_source_is_a_usage_error(app, run, action):
    result = run("breakers", action, "nosuchsource")

    assert result.exit_code == 2, result.output
    assert "no source named 'nosuchsource'" in result.output
    assert {s.state for s in services(app).breakers.status_all().values()} == {"closed"}


# -- dead letters ---------------------------------------------------------------------------------


def test_dead_letters_list_shows_the_entries(app, run):
    letters = services(app).dead_letters
    first = letters.add("lookup-1", "receitaws", "cnpj", CNPJ, 5, "HTTP 503", 5)
    second = letters.add("lookup-2", "viacep", "cep", CEP, 5, "timed out", 5)

    human = run("dead-letters", "list")
    limited = json.loads(run("dead-letters", "list", "--limit", "1", "--json").stdout)

    assert human.exit_code == 0, human.output
    assert "2 dead letters" in human.output and first in human.output and second in human.output
    assert limited["count"] == 2 and [item["id"] for item in limited["items"]] == [second]


def test_dead_letters_requeue_puts_a_task_on_the_broker_and_marks_the_letter(app, run):
    letters = services(app).dead_letters
    entry_id = letters.add("lookup-1", "receitaws", "cnpj", CNPJ, 9, "HTTP 503", 5)
    before = queued(app)

    result = run("dead-letters", "requeue", entry_id, "--json")

    assert result.exit_code == 0, result.output
    body = json.loads(result.stdout)
    after = queued(app)
    assert after["9"] == before["9"] + 1 and sum(after.values()) == sum(before.values()) + 1
    assert letters.count() == 0
    assert letters.get(entry_id)["requeue_count"] == 1 and letters.get(entry_id)["requeued_at"]
    assert services(app).lookups.task(body["task_id"]) == {
        "name": FETCH_TASK,
        "lookup_id": "lookup-1",
        "source": "receitaws",
    }


def test_dead_letters_requeue_of_an_unknown_id_fails(app, run):
    result = run("dead-letters", "requeue", "0123456789abcdef")

    assert result.exit_code == 1, result.output
    assert "no dead letter with id '0123456789abcdef'" in result.output
    assert sum(queued(app).values()) == 0


# -- queue and health -----------------------------------------------------------------------------


def test_queue_stats_reports_depths_deferred_calls_and_workers(app, run):
    beat(app, "w1@test")
    services(app).deferred.add(time.time() + 600, FETCH_TASK, ["x"], {"priority": 0})
    with app.app_context():
        send_task(services(), FINALIZE_TASK, ["lookup-1"], {"priority": celery_priority(3)})

    body = json.loads(run("queue", "stats", "--json").stdout)
    human = run("queue", "stats")

    assert body["by_priority"]["3"] == 1 and sum(body["by_priority"].values()) == 1
    assert body["deferred"] == 1 and body["workers"] == ["w1@test"]
    assert human.exit_code == 0
    assert "queued 1 by priority" in human.output and " 3:1 " in human.output
    assert "deferred 1" in human.output and "workers 1 live: w1@test" in human.output


def test_health_fails_without_a_live_worker(run):
    result = run("health")

    assert result.exit_code == 1, result.output
    assert "not ready: no live worker" in result.output


def test_health_is_ready_with_a_worker_and_strict_fails_on_an_open_breaker(app, run):
    beat(app)
    ready = run("health", "--json")
    assert ready.exit_code == 0, ready.output
    assert json.loads(ready.stdout)["ready"] is True

    services(app).breakers.force_open("receitaws")
    lenient = run("health")
    strict = run("health", "--strict", "--json")

    assert lenient.exit_code == 0, lenient.output
    assert "warning: breaker receitaws is open" in lenient.output and lenient.output.endswith("ready\n")
    assert strict.exit_code == 1
    assert json.loads(strict.stdout)["problems"] == ["breaker receitaws is open"]


# -- feature flags --------------------------------------------------------------------------------


def test_flags_set_is_seen_by_every_process_and_default_goes_back_to_the_setting(app, run, settings):
    elsewhere = FeatureFlags(services(app).redis, settings)  # another process's view
    listed = json.loads(run("flags", "list", "--json").stdout)
    assert {name: flag["enabled"] for name, flag in listed.items()} == {
        "rate_limiting": True,
        "circuit_breaker": True,
        "cache": True,
    }

    off = run("flags", "set", "cache", "off")
    assert off.exit_code == 0, off.output
    assert elsewhere.enabled("cache") is False
    human = run("flags", "list").output
    assert "cache" in human and "off  set at run time (default on)" in human

    back = run("flags", "set", "cache", "default", "--json")
    assert back.exit_code == 0, back.output
    assert json.loads(back.stdout)["source"] == "settings"
    assert FeatureFlags(services(app).redis, settings).all()["cache"] == {
        "enabled": True,
        "source": "settings",
        "default": True,
    }


@pytest.mark.parametrize("args", [["nosuchflag", "on"], ["cache", "maybe"], ["cache"]])
def test_flags_set_refuses_unknown_names_and_values(app, run, settings, args):
    result = run("flags", "set", *args)

    assert result.exit_code == 2, result.output
    assert all(flag["source"] == "settings" for flag in services(app).flags.all().values())


# -- lookup ---------------------------------------------------------------------------------------


def test_lookup_without_a_live_worker_fails_and_enqueues_nothing(app, run):
    result = run("lookup", CNPJ_MASKED)

    assert result.exit_code == 1, result.output
    assert "no live worker" in result.output
    assert sum(queued(app).values()) == 0


def test_lookup_of_an_invalid_identifier_is_a_usage_error(app, run):
    beat(app)
    result = run("lookup", "11.222.333/0001-00")

    assert result.exit_code == 2, result.output
    assert "Invalid value for 'IDENTIFIER'" in result.output
    assert sum(queued(app).values()) == 0


def test_lookup_watches_the_sources_settle_then_answers_from_cache(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS)
    stack.start_worker()
    runner = stack.app.test_cli_runner()

    first = runner.invoke(args=["lookup", CNPJ_MASKED, "--timeout", "30"])

    assert first.exit_code == 0, first.output
    lines = first.output.splitlines()
    assert lines[0] == f"lookup cnpj {CNPJ}"  # the progress bar's label (no terminal here)
    settled = [line for line in lines if line.startswith("[")]
    assert [line[:5] for line in settled] == ["[1/3]", "[2/3]", "[3/3]"]
    assert {line.split()[1] for line in settled} == {"brasilapi", "receitaws", "opencnpj"}
    assert all(line.split()[2] == "ok" and "cached" not in line for line in settled)
    assert any(line.startswith(f"complete: cnpj {CNPJ} in ") for line in lines)
    assert any(line.split()[:2] == ["pass", "cep_valid:"] for line in lines)
    calls = sum(sandbox.served(name) for name in ("brasilapi", "receitaws", "opencnpj"))

    started = time.monotonic()
    again = runner.invoke(args=["lookup", CNPJ, "--json"])
    elapsed = time.monotonic() - started

    assert again.exit_code == 0, again.output
    body = json.loads(again.stdout)
    assert body["status"] == "complete" and body["cached"] is True
    assert {s["state"] for s in body["sources"].values()} == {"ok"}
    assert elapsed < 2, f"a cached lookup took {elapsed:.2f}s"
    assert sum(sandbox.served(name) for name in ("brasilapi", "receitaws", "opencnpj")) == calls


def test_lookup_that_outlasts_its_timeout_exits_1_naming_the_waiting_source(make_stack, sandbox):
    stack = make_stack(**FAST_LIMITS)
    stack.start_worker()
    for name in ("brasilapi", "viacep"):  # a CEP's sources
        sandbox.control(name, latency_ms=3000)
    cep = sandbox.identifiers("cep", 1, seed=41)[0]

    started = time.monotonic()
    result = stack.app.test_cli_runner().invoke(args=["lookup", cep, "--timeout", "0.5"])

    assert result.exit_code == 1, result.output
    assert "timed out after 0.5 s with 0/2 sources settled; still waiting for brasilapi (" in result.output
    assert "viacep (" in result.output
    assert time.monotonic() - started < 4


# -- Redis down -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def down_app():
    """An app whose Redis URL (with a password) points at a closed port."""
    url = f"redis://:hunter2@127.0.0.1:{free_port()}/0"
    app = create_app(Settings.from_env({}, redis_url=url, key_prefix="tdown"))
    yield app
    close_app(app)


@pytest.mark.parametrize(
    "args",
    [
        ["lookup", CNPJ],
        ["cache", "stats"],
        ["cache", "invalidate", "--type", "cnpj"],
        ["cache", "invalidate", "--all"],
        ["cache", "bump-generation"],
        ["breakers", "list"],
        ["breakers", "reset", "receitaws"],
        ["breakers", "open", "receitaws"],
        ["dead-letters", "list"],
        ["dead-letters", "requeue", "0123456789abcdef"],
        ["queue", "stats"],
        ["health"],
        ["flags", "list"],
        ["flags", "set", "cache", "off"],
    ],
    ids=" ".join,
)
def test_every_command_says_redis_is_unreachable_and_exits_1(down_app, args):
    port = services(down_app).settings.redis_url.rsplit(":", 1)[1].split("/")[0]

    result = down_app.test_cli_runner().invoke(args=args)

    assert result.exit_code == 1, result.output
    assert result.output == f"Error: Redis unreachable at redis://127.0.0.1:{port}/0\n"
    assert "hunter2" not in result.output


def test_health_json_reports_redis_unreachable(down_app):
    result = down_app.test_cli_runner().invoke(args=["health", "--json"])

    assert result.exit_code == 1
    body = json.loads(result.stdout)
    assert body["ready"] is False and body["redis"] is False
    assert body["problems"][0].startswith("Redis unreachable at redis://127.0.0.1:")
