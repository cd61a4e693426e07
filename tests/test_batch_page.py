"""The bulk batch page in real headless Chromium, against gunicorn, a Celery worker and the sandbox."""

from __future__ import annotations

import csv
import io
import re
from pathlib import Path

import pytest
import requests
from playwright.sync_api import expect
from test_batches import BATCH_ENV, fast_upstreams  # noqa: F401 - the autouse fixture applies here too

BATCH_URL = re.compile(r"/batches/([\w-]+)$")


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    from stack import started

    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("batch-page"), **BATCH_ENV) as stack:
        yield stack


def write_csv(folder: Path, name: str, lines: list[str]) -> Path:
    """A spreadsheet's export: a byte-order mark, `;` separators, Windows line endings."""
    path = folder / name
    path.write_bytes(("\ufeff" + "\r\n".join(lines) + "\r\n").encode("utf-8"))
    return path


def batch_id_of(page) -> str:
    """The batch's id from the page's address, once it has become /batches/<id>."""
    page.wait_for_url(BATCH_URL)
    return BATCH_URL.search(page.url).group(1)


def wait_finished(page, status: str, timeout: float = 60_000) -> None:
    page.wait_for_selector(f'#batch-status[data-status="{status}"]', timeout=timeout)
    page.wait_for_selector('#stream-status[data-state="closed"]')


def counts(page) -> dict[str, int]:
    """State -> count, as the page shows them (pt-BR digit groups removed)."""
    shown = page.eval_on_selector_all(
        "#batch-counts .state-count",
        "items => Object.fromEntries(items.map(i => [i.dataset.state, i.querySelector('.count-value').textContent]))",
    )
    return {state: int(re.sub(r"\D", "", text)) for state, text in shown.items()}


def invalid_rows(page) -> dict[int, str]:
    """Line -> reason of the invalid lines listed on the page."""
    rows = page.eval_on_selector_all(
        "#invalid-table tbody tr", "rows => rows.map(r => [r.dataset.line, r.lastElementChild.textContent])"
    )
    return {int(line): reason for line, reason in rows}


def settled_view(page) -> dict:
    """What a person reads once the batch is over."""
    return {
        "status": page.inner_text("#batch-status"),
        "progress": page.inner_text("#batch-progress-text"),
        "value": (
            page.get_attribute("#batch-progress", "value"),
            page.get_attribute("#batch-progress", "max"),
        ),
        "counts": counts(page),
        "figures": page.inner_text(".batch-figures"),
        "invalid": invalid_rows(page),
        "invalid_count": page.inner_text("#invalid-count"),
        "links": (page.get_attribute("#download-csv", "href"), page.get_attribute("#download-jsonl", "href")),
    }


def test_an_uploaded_csv_lists_its_bad_lines_runs_to_complete_and_downloads_one_row_a_line(
    stack, sandbox, page, tmp_path
):
    ceps = sandbox.identifiers("cep", 12, seed=201)
    cpfs = sandbox.identifiers("cpf", 6, seed=202)
    lines = [
        "identifier;type",  # line 1: a header
        f"{sandbox.known('cnpj', seed=203)};cnpj",
        *(f"{cep};cep" for cep in ceps),  # lines 3-14
        *(f"{cpf};" for cpf in cpfs),  # lines 15-20, type detected
        "11.222.333/0001-82;cnpj",  # 21: check digits do not match
        "not-an-identifier;",  # 22: no type fits
        f"{ceps[0]};cep;extra",  # 23: three columns
        f"{ceps[1]};",  # 24: a repeat of line 4
        "",  # 25: blank, skipped
        "01310100;cpf",  # 26: a CEP said to be a CPF
    ]
    page.goto(stack.web_url + "/batches")
    assert page.get_attribute("html", "lang") == "pt-BR"
    page.set_input_files("#batch-file", str(write_csv(tmp_path, "clientes.csv", lines)))
    batch_id = batch_id_of(page)

    page.wait_for_selector("#invalid-table tbody tr")
    reasons = invalid_rows(page)
    assert sorted(reasons) == [21, 22, 23, 26]
    assert "dígitos verificadores não conferem" in reasons[21]  # the API's reasons, in the page's language
    assert "3 colunas" in reasons[23]
    assert "CPF inválido" in reasons[26]
    assert page.inner_text("#invalid-count") == "(4)"
    assert "clientes.csv" in page.inner_text("#batch-title")

    wait_finished(page, "complete")
    status = stack.get(f"/api/batches/{batch_id}").json()
    assert status["status"] == "complete" and status["done"] == status["total"] == 19
    assert "100%" in page.inner_text("#batch-progress-text")
    assert (
        page.get_attribute("#batch-progress", "value") == page.get_attribute("#batch-progress", "max") == "19"
    )
    shown = counts(page)
    assert shown == status["counts"]
    assert shown["pending"] == shown["running"] == shown["cancelled"] == 0
    assert sum(shown[state] for state in ("found", "not_found", "partial", "failed")) == 19
    assert page.inner_text("#batch-lines") == "24" and page.inner_text("#batch-duplicates") == "1"
    assert page.inner_text("#batch-invalid") == "4"
    assert page.inner_text("#batch-eta") == "Encerrado"
    assert page.is_hidden("#cancel-batch")  # nothing left to cancel

    href = page.get_attribute("#download-csv", "href")
    assert href == f"/api/batches/{batch_id}/results?format=csv"
    results = requests.get(stack.web_url + href, timeout=10)
    assert results.status_code == 200 and results.headers["Content-Type"].startswith("text/csv")
    rows = list(csv.DictReader(io.StringIO(results.text)))
    assert [int(row["line"]) for row in rows] == [*range(2, 25), 26]  # one row per input line
    assert [int(row["line"]) for row in rows if row["state"] == "invalid"] == [21, 22, 23, 26]
    assert rows[22]["identifier"] == rows[2]["identifier"] == ceps[1]  # the repeat answers like line 4
    jsonl = requests.get(stack.web_url + page.get_attribute("#download-jsonl", "href"), timeout=10)
    assert jsonl.headers["Content-Type"].startswith("application/x-ndjson")
    assert len(jsonl.text.splitlines()) == 24
    assert page.problems == []


def test_a_long_batch_is_cancelled_from_the_page_that_started_it_alone(
    stack, sandbox, page, browser, tmp_path, screenshot
):
    for name in ("viacep", "brasilapi"):  # the CEP sources: about two items a second per worker thread
        sandbox.control(name, latency_ms=400)
    ceps = sandbox.identifiers("cep", 600, seed=211)
    lines = ["identifier;type", *(f"{cep};cep" for cep in ceps[:300]), "123;", "01310100;cpf"]
    lines += [f"{cep};" for cep in ceps[300:]]
    page.goto(stack.web_url + "/batches")
    page.set_input_files("#batch-file", str(write_csv(tmp_path, "ceps-sp.csv", lines)))
    batch_id = batch_id_of(page)
    page.wait_for_selector('#batch-status[data-status="running"]')
    page.wait_for_selector('#stream-status[data-state="live"]')
    assert page.is_visible("#cancel-batch")

    # While it runs: progress, a measured throughput and a time left in words.
    expect(page.locator("#batch-throughput")).to_have_text(re.compile(r"\d"), timeout=60_000)
    expect(page.locator("#batch-eta")).to_have_text(
        re.compile(r"^(cerca de \d|alguns segundos)"), timeout=15_000
    )
    assert sorted(invalid_rows(page)) == [302, 303]
    running = counts(page)
    assert 0 < running["found"] + running["not_found"] < 600 and running["pending"] > 0
    screenshot(page, "batch")

    # The shared link in another browser: progress, no cancel button, and the API refuses a cancel.
    context = browser.new_context(locale="pt-BR")
    try:
        other = context.new_page()
        other.goto(page.url)
        other.wait_for_selector('#stream-status[data-state="live"]')
        expect(other.locator("#batch-progress-text")).to_have_text(re.compile(r"\d+ de 600"))
        assert other.is_hidden("#cancel-batch")
        refused = other.evaluate(
            "id => fetch('/api/batches/' + id, { method: 'DELETE' }).then(answer => answer.status)", batch_id
        )
        assert refused == 403
    finally:
        context.close()
    assert stack.get(f"/api/batches/{batch_id}").json()["status"] == "running"
    # The browser that started it keeps its token (localStorage) across a reload, never in the address.
    page.reload()
    page.wait_for_selector('#stream-status[data-state="live"]')
    expect(page.locator("#cancel-batch")).to_be_visible()
    assert batch_id in page.url and page.evaluate("window.location.search + window.location.hash") == ""

    page.once("dialog", lambda dialog: dialog.accept())  # "Cancel this batch?"
    page.click("#cancel-batch")
    wait_finished(page, "cancelled")
    status = stack.get(f"/api/batches/{batch_id}").json()
    assert status["status"] == "cancelled" and status["finished_at"] is not None
    assert counts(page) == status["counts"]
    assert (
        status["counts"]["cancelled"] > 0 and status["counts"]["pending"] == status["counts"]["running"] == 0
    )
    assert page.inner_text("#batch-status") == "Cancelado"
    assert page.is_hidden("#cancel-batch")
    assert page.problems == []


def test_a_finished_batch_shows_again_on_reload_and_in_another_browser(stack, sandbox, page, browser):
    text = "\n".join([*sandbox.identifiers("cep", 5, seed=221), "nope"])
    page.goto(stack.web_url + "/batches")
    # Dropped onto the drop zone: the drag-and-drop events a browser sends, carrying the file.
    page.evaluate(
        """([name, text]) => {
            const transfer = new DataTransfer();
            transfer.items.add(new File([text], name, { type: "text/csv" }));
            const zone = document.getElementById("drop-zone");
            for (const type of ["dragenter", "dragover", "drop"]) {
                zone.dispatchEvent(new DragEvent(type, { dataTransfer: transfer, bubbles: true, cancelable: true }));
            }
        }""",
        ["dropped.csv", text],
    )
    batch_id = batch_id_of(page)
    wait_finished(page, "complete")
    finished = settled_view(page)
    assert list(finished["invalid"]) == [6] and finished["invalid_count"] == "(1)"

    page.reload()
    wait_finished(page, "complete", timeout=20_000)
    assert settled_view(page) == finished  # the invalid lines come back from this browser's storage
    assert page.url.endswith(f"/batches/{batch_id}")

    context = browser.new_context(locale="en-US")
    try:
        other = context.new_page()
        other.goto(page.url)
        assert other.get_attribute("html", "lang") == "en"
        wait_finished(other, "complete", timeout=20_000)
        assert other.inner_text("#batch-status") == "Complete"
        assert "100%" in other.inner_text("#batch-progress-text")
        assert counts(other) == finished["counts"]
        assert other.is_hidden("#invalid-table-wrap")  # its lines were posted elsewhere: the count only
        assert "Invalid lines: 1." in other.inner_text("#invalid-note")
    finally:
        context.close()
    assert page.problems == []


def test_the_batch_page_is_linked_from_the_lookup_page_and_works_from_the_keyboard(
    stack, sandbox, page, tmp_path
):
    # Intercepting file choosers is switched on by the first listener; on early, so the key press is caught.
    page.on("filechooser", lambda chooser: None)
    page.goto(stack.web_url + "/")
    page.click("nav.nav >> text=Consulta em lote")
    page.wait_for_url(stack.web_url + "/batches")
    assert page.get_attribute('nav.nav a[href="/batches"]', "aria-current") == "page"
    for _ in range(20):  # Tab through the page to the file picker
        page.keyboard.press("Tab")
        if page.evaluate("document.activeElement.id") == "batch-file":
            break
    assert page.evaluate("document.activeElement.id") == "batch-file"
    assert page.eval_on_selector(".file-button", "label => getComputedStyle(label).outlineStyle") == "solid"
    path = write_csv(tmp_path, "teclado.csv", [sandbox.identifiers("cpf", 1, seed=231)[0]])
    with page.expect_file_chooser() as chooser:
        page.keyboard.press("Space")
    chooser.value.set_files(str(path))
    batch_id_of(page)
    wait_finished(page, "complete")
    assert counts(page)["found"] + counts(page)["not_found"] == 1
    assert page.is_hidden("#invalid-rows")
    assert page.problems == []


def test_a_file_the_service_refuses_gets_a_message_and_starts_no_batch(stack, page, tmp_path):
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.goto(stack.web_url + "/batches")
    latin1 = tmp_path / "latin1.csv"
    latin1.write_bytes("identificador;razão\n".encode("latin-1"))
    page.set_input_files("#batch-file", str(latin1))
    expect(page.locator("#upload-message")).to_have_text("O arquivo não é texto UTF-8")
    assert page.get_attribute("#upload-message", "data-state") == "error"
    too_big = tmp_path / "big.csv"
    too_big.write_bytes(b"01310100\n" * 500_000)  # 4.5 MB, over BATCH_MAX_BYTES
    page.set_input_files("#batch-file", str(too_big))
    expect(page.locator("#upload-message")).to_contain_text("grande demais (4,3 MB)")
    assert len(posts) == 1  # the big one never left the browser
    assert page.url == stack.web_url + "/batches" and page.is_hidden("#batch")
    assert all("400" in problem for problem in page.problems), page.problems  # the refusal's console line


def test_an_unknown_batch_page_is_a_404(stack, page):
    response = page.goto(stack.web_url + "/batches/no-such-batch")
    assert response.status == 404
    assert "Lote não encontrado" in page.inner_text("#not-found")
    assert page.get_attribute("#not-found a", "href") == "/batches"
