"""`flask batch` (enrich/cli/batch.py) end to end: the real `flask` command in a subprocess, a real Celery
worker, the sandbox upstream over HTTP, Redis.
"""

from __future__ import annotations

import csv
import io
import os
import re
import signal
import subprocess
from pathlib import Path

import orjson
import pytest
import test_batches
from conftest import wait_for
from test_batches import fast_upstreams  # noqa: F401 - the autouse fixture applies here too

from devstack.embedded_redis import free_port
from enrich.batches import input as batch_input
from enrich.batches import rows as batch_rows
from enrich.services import services

ROOT = Path(__file__).resolve().parent.parent
FLASK = Path(os.environ.get("VIRTUAL_ENV", ROOT / ".venv")) / "bin" / "flask"

# tests/test_batches.py's settings, with a row limit small enough to test cheaply.
BATCH_ENV = {**test_batches.BATCH_ENV, "BATCH_MAX_ROWS": "2000"}


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    """One worker on a key prefix of the module's own (the CLI needs no web process)."""
    from stack import Stack

    stack = Stack(redis_url, sandbox_url, tmp_path_factory.mktemp("cli-batch"), **BATCH_ENV)
    try:
        stack.start_worker()
        yield stack
    finally:
        stack.stop()


def flask(
    env: dict, *args: str, stdin: bytes | None = None, timeout: float = 120
) -> subprocess.CompletedProcess:
    """`flask --app app ARGS` as a person runs it, with the deployment's environment."""
    return subprocess.run(
        [str(FLASK), "--app", "app", *args],
        cwd=ROOT,
        env=env,
        input=stdin,
        capture_output=True,
        timeout=timeout,
    )


def store(stack):
    return services(stack.app).batches


def batch_ids(stack) -> set[str]:
    return {raw.decode() for raw in services(stack.app).redis.zrange(store(stack).index_key, 0, -1)}


def status_of(stack, batch_id: str) -> dict | None:
    with stack.app.app_context():
        return store(stack).status(batch_id)


def created_in_process(stack, identifiers: list) -> dict:
    with stack.app.app_context():
        runner = services(stack.app).batch_runner  # the create path: the store's create, then a step
        return runner.create(batch_input.parse_json(identifiers, 2000), "in-process")


def test_run_of_a_spreadsheet_csv_writes_one_row_per_input_line(stack, sandbox, tmp_path):
    company, nobody = sandbox.known("cnpj", seed=201), sandbox.unknown("cnpj", seed=202)
    cep = sandbox.known("cep", seed=203)
    masked = f"{company[:2]}.{company[2:5]}.{company[5:8]}/{company[8:12]}-{company[12:]}"
    rows = ["identifier;type", f"{company};cnpj", f"{cep};", "not-an-identifier;", f"{nobody};", f"{masked};"]
    path = tmp_path / "clientes.csv"
    path.write_bytes(("\ufeff" + "\r\n".join(rows) + "\r\n").encode())
    before = batch_ids(stack)

    result = flask(stack.env, "batch", "run", str(path))

    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    (batch_id,) = batch_ids(stack) - before
    results = list(csv.DictReader(io.StringIO(result.stdout.decode())))
    assert [int(row["line"]) for row in results] == [2, 3, 4, 5, 6]
    assert [row["state"] for row in results] == ["found", "found", "invalid", "not_found", "found"]
    assert results[0]["razao_social"] and results[1]["municipio"]
    assert results[4]["identifier"] == results[0]["identifier"] == company  # the duplicate answers alike
    assert results[2]["input"] == "not-an-identifier" and results[2]["error"]
    assert f"line 4: not-an-identifier: {results[2]['error']}\n" in stderr
    assert f"batch {batch_id}: 3 items" in stderr  # the progress bar's label (no terminal here)
    summary = (
        r"complete: 5 lines, 3 items \(0 cached, 1 duplicate lines, 1 invalid lines\): 2 found, 1 not_found"
    )
    assert re.search(rf"\n{summary} in (< 1|\d+) s \(batch {re.escape(batch_id)}\)\n$", stderr), stderr
    # The very bytes GET /api/batches/<id>/results serves, and the file's name names the batch.
    with stack.app.app_context():
        served = "".join(batch_rows.csv_lines(store(stack).rows(batch_id))).encode()
    assert result.stdout == served
    assert status_of(stack, batch_id)["name"] == "clientes.csv"


def test_run_of_a_json_list_on_stdin_writes_jsonl_to_the_output_file(stack, sandbox, tmp_path):
    ceps = sandbox.identifiers("cep", 30, seed=211)
    output = tmp_path / "out" / "results.jsonl"
    output.parent.mkdir()
    items = [*ceps, {"identifier": ceps[0], "type": "cep"}, 42]

    result = flask(
        stack.env,
        *("batch", "run", "-", "--name", "nightly", "--format", "jsonl", "--output", str(output)),
        stdin=orjson.dumps(items),
    )

    stderr = result.stderr.decode()
    assert result.returncode == 0, stderr
    assert result.stdout == b""  # the results went to the file
    rows = [orjson.loads(line) for line in output.read_bytes().splitlines()]
    assert [row["line"] for row in rows] == list(range(1, 33))
    assert {row["state"] for row in rows[:31]} <= {"found", "not_found"} and rows[31]["state"] == "invalid"
    assert rows[30]["identifier"] == rows[0]["identifier"] and rows[30]["state"] == rows[0]["state"]
    assert set(rows[0]) == {
        "line",
        "input",
        "type",
        "identifier",
        "state",
        "fields",
        "sources",
        "error",
        "lookup_id",
    }
    assert "line 32: 42: each item must be a string or {identifier, type}\n" in stderr
    assert "complete: 32 lines, 30 items" in stderr
    batch_id = stderr.rsplit("(batch ", 1)[1].rstrip().rstrip(")")
    assert status_of(stack, batch_id)["name"] == "nightly"


def test_run_and_results_write_a_defused_csv_and_a_raw_jsonl(stack, sandbox):
    cnpj = test_batches.hostile_company(sandbox, seed=251)

    run = flask(stack.env, "batch", "run", "-", stdin=orjson.dumps([cnpj, test_batches.HYPERLINK_LEAK]))

    stderr = run.stderr.decode()
    assert run.returncode == 0, stderr
    batch_id = stderr.rsplit("(batch ", 1)[1].rstrip().rstrip(")")
    as_csv = flask(stack.env, "batch", "results", batch_id)
    as_jsonl = flask(stack.env, "batch", "results", batch_id, "--format", "jsonl")
    assert as_csv.returncode == as_jsonl.returncode == 0
    assert as_csv.stdout == run.stdout  # `run` wrote the very same CSV
    test_batches.assert_defused_results(run.stdout.decode(), as_jsonl.stdout.decode())


def test_run_prints_the_cancel_token_that_the_api_asks_for(stack, sandbox):
    ceps = sandbox.identifiers("cep", 3, seed=261)

    run = flask(stack.env, "batch", "run", "-", stdin=orjson.dumps(ceps))

    stderr = run.stderr.decode()
    assert run.returncode == 0, stderr
    match = re.search(
        r"^batch (\S+): cancel token (\S+) \(DELETE /api/batches/\1 with the header X-Cancel-Token\)$",
        stderr,
        re.M,
    )
    assert match, stderr
    batch_id, token = match.groups()
    assert token not in run.stdout.decode()  # the results never carry it
    client = stack.app.test_client()
    url = f"/api/batches/{batch_id}"
    assert client.delete(url, headers={"X-Cancel-Token": token + "x"}).status_code == 403
    # The right token gets past the check: the batch is complete, so nothing is left to cancel.
    accepted = client.delete(url, headers={"X-Cancel-Token": token})
    assert accepted.status_code == 409 and accepted.get_json()["error"] == "conflict"


def test_timeout_leaves_the_batch_running_then_status_and_cancel_act_on_it(stack, sandbox, tmp_path):
    sandbox.control("viacep", latency_ms=500)
    sandbox.control("brasilapi", latency_ms=500)
    path = tmp_path / "ceps.csv"
    path.write_text("\n".join(sandbox.identifiers("cep", 300, seed=221)) + "\n")

    timed_out = flask(stack.env, "batch", "run", str(path), "--timeout", "1")

    stderr = timed_out.stderr.decode()
    assert timed_out.returncode == 1, stderr
    assert timed_out.stdout == b""  # no results until the batch is finished
    match = re.search(r"Error: timed out after 1 s with \d+/300 items done; batch (\S+) carries on", stderr)
    assert match, stderr
    batch_id = match[1]
    shown = flask(stack.env, "batch", "status", batch_id, "--json")
    assert shown.returncode == 0, shown.stderr
    running = orjson.loads(shown.stdout)
    assert running["status"] == "running" and running["finished_at"] is None and running["total"] == 300
    human = flask(stack.env, "batch", "status", batch_id).stdout.decode()
    assert human.startswith(f"batch {batch_id} (ceps.csv) running: ") and "ETA " in human

    cancelled = flask(stack.env, "batch", "cancel", batch_id)

    assert cancelled.returncode == 0, cancelled.stderr
    said = re.match(
        rf"cancelled batch {batch_id}: (\d+) items not started are cancelled", cancelled.stdout.decode()
    )
    assert said and int(said[1]) > 150, cancelled.stdout
    final = wait_for(
        lambda: (s := status_of(stack, batch_id))["finished_at"] and s, 30, 0.1, "the batch to end"
    )
    assert final["status"] == "cancelled" and final["counts"]["cancelled"] == int(said[1])
    again = flask(stack.env, "batch", "cancel", batch_id, "--json")
    assert again.returncode == 0 and orjson.loads(again.stdout)["status"] == "cancelled"
    results = flask(stack.env, "batch", "results", batch_id, "--format", "jsonl")
    states = [orjson.loads(line)["state"] for line in results.stdout.splitlines()]
    assert len(states) == 300 and states.count("cancelled") == final["counts"]["cancelled"]


def test_ctrl_c_cancels_the_batch_and_exits_130(stack, sandbox, tmp_path):
    sandbox.control("viacep", latency_ms=500)
    sandbox.control("brasilapi", latency_ms=500)
    path = tmp_path / "ceps.csv"
    path.write_text("\n".join(sandbox.identifiers("cep", 300, seed=231)) + "\n")
    before = batch_ids(stack)
    process = subprocess.Popen(
        [str(FLASK), "--app", "app", "batch", "run", str(path)],
        cwd=ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        (batch_id,) = wait_for(lambda: batch_ids(stack) - before, 30, 0.05, "the batch to be created")
        wait_for(lambda: status_of(stack, batch_id)["done"] >= 1, 30, 0.05, "an item done")
        process.send_signal(signal.SIGINT)
        stdout, stderr = process.communicate(timeout=30)
    finally:
        process.kill()

    assert process.returncode == 130, stderr.decode()
    assert f"cancelled batch {batch_id}: " in stderr.decode() and stdout == b""
    assert status_of(stack, batch_id)["status"] == "cancelled"


def test_run_of_a_batch_cancelled_elsewhere_writes_its_rows_and_exits_1(stack, sandbox, tmp_path):
    sandbox.control("viacep", latency_ms=500)
    sandbox.control("brasilapi", latency_ms=500)
    path = tmp_path / "ceps.csv"
    path.write_text("\n".join(sandbox.identifiers("cep", 200, seed=241)) + "\n")
    output = tmp_path / "results.csv"
    before = batch_ids(stack)
    process = subprocess.Popen(
        [str(FLASK), "--app", "app", "batch", "run", str(path), "--output", str(output)],
        cwd=ROOT,
        env=stack.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        (batch_id,) = wait_for(lambda: batch_ids(stack) - before, 30, 0.05, "the batch to be created")
        assert flask(stack.env, "batch", "cancel", batch_id).returncode == 0
        stdout, stderr = process.communicate(timeout=60)
    finally:
        process.kill()

    assert process.returncode == 1, stderr.decode()
    assert stderr.decode().endswith(f"Error: batch {batch_id} was cancelled\n")
    assert "\ncancelled: 200 lines, 200 items " in stderr.decode()
    rows = list(csv.DictReader(io.StringIO(output.read_text())))
    assert len(rows) == 200 and "cancelled" in {row["state"] for row in rows}


def test_output_in_a_missing_directory_is_refused_before_the_batch_starts(stack, tmp_path):
    path = tmp_path / "batch.csv"
    path.write_text("11222333000181\n")
    before = batch_ids(stack)

    result = flask(stack.env, "batch", "run", str(path), "--output", str(tmp_path / "nowhere" / "out.csv"))

    assert result.returncode == 2
    assert "Invalid value for '--output': cannot write in the directory of " in result.stderr.decode()
    assert batch_ids(stack) == before


def test_cancel_of_a_complete_batch_fails(stack):
    done = created_in_process(stack, ["123"])  # only an invalid row: complete at once
    assert done["status"] == "complete"

    result = flask(stack.env, "batch", "cancel", done["id"])

    assert result.returncode == 1
    assert (
        result.stderr.decode()
        == f"Error: batch {done['id']} is already complete; nothing is left to cancel\n"
    )


@pytest.mark.parametrize("command", ["status", "cancel", "results"])
def test_an_unknown_batch_id_exits_1(stack, command):
    result = flask(stack.env, "batch", command, "nosuchbatch")

    assert result.returncode == 1
    assert result.stderr.decode() == "Error: no batch with id 'nosuchbatch' (unknown or expired)\n"
    assert result.stdout == b""


@pytest.mark.parametrize(
    ("content", "message"),
    [
        pytest.param(b"", "the file holds no identifiers", id="empty"),
        pytest.param(b"\xff\xfe1\n", "the file is not UTF-8 text", id="not-utf8"),
        pytest.param(b"11222333000181\n" * 2001, "a batch holds at most 2,000 rows", id="too-many-rows"),
        pytest.param(b'[{"identifier": ', "the file is not JSON", id="broken-json"),
    ],
)
def test_a_file_the_api_would_refuse_is_a_usage_error(stack, tmp_path, content, message):
    path = tmp_path / "batch.csv"
    path.write_bytes(content)
    before = batch_ids(stack)

    result = flask(stack.env, "batch", "run", str(path))

    assert result.returncode == 2, result.stderr
    assert "Invalid value for 'FILE': " + message in result.stderr.decode()
    assert batch_ids(stack) == before


def test_run_without_a_live_worker_fails_and_creates_nothing(app, tmp_path):
    path = tmp_path / "batch.csv"
    path.write_text("11222333000181\n")

    result = app.test_cli_runner().invoke(args=["batch", "run", str(path)])

    assert result.exit_code == 1, result.output
    assert "no live worker to run the batch" in result.stderr
    assert services(app).redis.zcard(services(app).batches.index_key) == 0


@pytest.mark.parametrize(
    "args",
    [["run", "FILE"], ["status", "x"], ["cancel", "x"], ["results", "x"]],
    ids=" ".join,
)
def test_with_redis_down_each_command_says_so_in_one_line_and_exits_1(tmp_path, args):
    path = tmp_path / "batch.csv"
    path.write_text("11222333000181\n")
    port = free_port()
    env = {**os.environ, "REDIS_URL": f"redis://:hunter2@127.0.0.1:{port}/0", "KEY_PREFIX": "tdown"}

    result = flask(env, "batch", *(str(path) if arg == "FILE" else arg for arg in args), timeout=30)

    assert result.returncode == 1
    assert result.stderr.decode() == f"Error: Redis unreachable at redis://127.0.0.1:{port}/0\n"
    assert result.stdout == b""
