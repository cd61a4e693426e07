"""The lookup and status pages in real headless Chromium, against gunicorn, a Celery worker and the sandbox."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

import psutil
import pytest
import requests
from conftest import FAST_LIMITS, wait_for

FINAL_STATES = ("ok", "not_found", "error", "stale", "circuit_open", "rate_limited")


@pytest.fixture(scope="module")
def stack(redis_url, sandbox_url, tmp_path_factory):
    from stack import started

    with started(redis_url, sandbox_url, tmp_path_factory.mktemp("page"), **FAST_LIMITS) as stack:
        yield stack


def submit(page, identifier: str) -> None:
    page.fill("#identifier", identifier)
    page.press("#identifier", "Enter")


def cards(page) -> dict[str, str]:
    """Source name -> state, for every card on the page."""
    return page.eval_on_selector_all(
        ".source-card", "cards => Object.fromEntries(cards.map(c => [c.dataset.source, c.dataset.state]))"
    )


def wait_complete(page, timeout: float = 20_000) -> None:
    page.wait_for_selector('#lookup-status[data-status="complete"]', timeout=timeout)


def settled_view(page) -> dict:
    """What a person reads once the lookup is over (timings left out: they differ run to run)."""
    return {
        "cards": cards(page),
        "card_count": page.locator(".source-card").count(),
        "result": page.inner_text("#result"),
        "checks": page.inner_text("#checks"),
        "progress": page.inner_text("#progress-text"),
    }


def test_a_cnpj_lookup_fills_the_cards_and_shows_the_result(stack, sandbox, page, screenshot):
    cnpj = sandbox.known("cnpj", seed=11)
    sandbox.control("receitaws", latency_ms=1200)  # one slow source: the others land first
    page.goto(stack.web_url + "/")
    assert page.get_attribute("html", "lang") == "pt-BR"
    submit(page, cnpj)
    page.wait_for_selector('.source-card[data-source="brasilapi"][data-state="ok"]')
    assert cards(page)["receitaws"] in ("pending", "running")
    assert page.locator('.source-card[data-source="receitaws"] .spinner').count() == 1
    screenshot(page, "lookup-in-progress")
    wait_complete(page)
    assert set(cards(page).values()) == {"ok"}
    assert page.locator(".source-card").count() == 3
    record = requests.get(f"{stack.web_url}/api/lookups/{page.url.rsplit('/', 1)[1]}", timeout=5).json()
    assert record["result"]["razao_social"] in page.inner_text("#result")
    assert "Razão social" in page.inner_text("#result")
    assert page.locator("#checks li").count() == len(record["checks"]) > 0
    assert "fontes concordam" in page.inner_text("#checks")  # details in the reader's language
    assert page.get_attribute("#progress", "value") == page.get_attribute("#progress", "max") == "3"
    assert re.search(r"/lookups/[\w-]+$", page.url)
    assert cnpj[:2] in page.inner_text("#recent")
    screenshot(page, "lookup-complete")
    assert page.problems == []


def test_a_cached_lookup_renders_at_once_with_cached_badges(stack, sandbox, page, screenshot):
    cep = sandbox.known("cep", seed=12)
    stack.wait_status(stack.post_lookup(cep).json()["id"])
    page.goto(stack.web_url + "/")
    streams = []
    page.on("request", lambda request: streams.append(request.url) if "/events" in request.url else None)
    submit(page, cep)
    wait_complete(page, timeout=5_000)
    assert set(cards(page).values()) == {"ok"}
    assert page.locator(".source-card .badge-cached").count() == len(cards(page))
    assert streams == []  # complete on arrival: no stream opened
    assert page.inner_text("#result").strip()
    screenshot(page, "lookup-cached")
    assert page.problems == []


def test_an_invalid_identifier_gets_an_inline_message_and_no_request(stack, page, screenshot):
    page.goto(stack.web_url + "/")
    posts = []
    page.on("request", lambda request: posts.append(request.url) if request.method == "POST" else None)
    page.fill("#identifier", "11.222.333/0001-82")
    assert page.get_attribute("#detected-type", "data-type") == "cnpj"
    page.wait_for_function("document.querySelector('#identifier-message').textContent.length > 0")
    assert "CNPJ" in page.inner_text("#identifier-message")
    page.press("#identifier", "Enter")
    assert posts == []
    assert page.get_attribute("#identifier", "aria-invalid") == "true"
    screenshot(page, "invalid-identifier")
    page.fill("#identifier", "01310-100")
    assert page.get_attribute("#detected-type", "data-type") == "cep"
    page.wait_for_function(
        "document.querySelector('#identifier-message').textContent.length === 0"
        " || document.querySelector('#identifier-message').dataset.state === 'ok'"
    )


def test_upstream_html_in_a_name_renders_as_text(stack, sandbox, page):
    hostile = '<img src=x onerror="window.__xss=1">'
    cnpj = sandbox.known("cnpj", seed=13)
    sandbox.control("brasilapi", override={"razao_social": hostile})
    sandbox.control("opencnpj", override={"razao_social": hostile})
    sandbox.control("receitaws", override={"nome": hostile})
    response = requests.get(stack.web_url + "/", timeout=5)
    assert "script-src 'self'" in response.headers["Content-Security-Policy"]
    page.goto(stack.web_url + "/")
    submit(page, cnpj)
    wait_complete(page)
    assert hostile in page.inner_text("#result")
    assert page.locator("#result img, #sources img").count() == 0
    assert page.evaluate("window.__xss") is None
    assert page.problems == []


def _web_worker(stack) -> psutil.Process:
    master = psutil.Process(stack.processes["web"][0].pid)
    return wait_for(lambda: (master.children() or [None])[0], message="a gunicorn worker")


def test_a_stream_cut_mid_lookup_recovers_and_ends_like_an_uninterrupted_one(stack, sandbox, page, browser):
    cnpj = sandbox.known("cnpj", seed=14)
    sandbox.control("receitaws", latency_ms=3000)
    page.goto(stack.web_url + "/")
    submit(page, cnpj)
    page.wait_for_selector('.source-card[data-source="brasilapi"][data-state="ok"]')
    worker = _web_worker(stack)
    worker.kill()  # the stream drops; gunicorn starts a new worker and the browser reconnects
    wait_for(lambda: _web_worker(stack).pid != worker.pid, message="a new gunicorn worker")
    page.wait_for_selector(
        '#stream-status[data-state="reconnecting"], #lookup-status[data-status="complete"]'
    )
    wait_complete(page, timeout=30_000)
    interrupted = settled_view(page)
    assert interrupted["card_count"] == 3 and set(interrupted["cards"].values()) == {"ok"}

    context = browser.new_context(locale="pt-BR")
    try:
        fresh = context.new_page()
        fresh.goto(page.url)
        wait_complete(fresh)
        assert settled_view(fresh) == interrupted
    finally:
        context.close()
    # The only complaint allowed is the browser's about the stream that was cut.
    assert all("ERR_INCOMPLETE_CHUNKED_ENCODING" in problem for problem in page.problems), page.problems


def test_a_shared_link_and_a_recent_entry_show_the_same_lookup(stack, sandbox, page):
    cep = sandbox.known("cep", seed=15)
    page.goto(stack.web_url + "/")
    submit(page, cep)
    wait_complete(page)
    shared = page.input_value("#share-link")
    assert re.search(r"/lookups/[\w-]+$", shared)
    view = settled_view(page)
    page.goto(shared)
    wait_complete(page)
    assert settled_view(page) == view
    page.goto(stack.web_url + "/")
    page.click("#recent li:first-child button, #recent li:first-child a")
    wait_complete(page)
    assert page.inner_text("#lookup-identifier").replace(".", "").replace("-", "") == cep


def test_a_cpf_is_answered_on_the_page_without_a_link_a_recent_entry_or_sources(stack, sandbox, page):
    page.goto(stack.web_url + "/")
    submit(page, "111.444.777-35")
    wait_complete(page)

    assert page.inner_text('#result [data-field="regiao_fiscal"]') == "7"
    assert page.inner_text('#result [data-field="ufs"]') == "ES, RJ"
    assert page.is_visible("#local-note")
    for hidden in ("#share", "#progress-row", "#sources-title"):
        assert not page.is_visible(hidden), hidden
    assert page.eval_on_selector("#checks", "list => list.children.length") == 1
    assert urlsplit(page.url).path == "/"
    # The person's number is kept nowhere in the browser either.
    assert "11144477735" not in page.evaluate("JSON.stringify(window.localStorage)")
    assert not page.problems, page.problems


def test_the_pages_speak_english_when_asked(stack, browser, screenshot):
    context = browser.new_context(locale="en-US")
    try:
        page = context.new_page()
        page.goto(stack.web_url + "/")
        assert page.get_attribute("html", "lang") == "en"
        assert "Look up" in page.inner_text("#submit")
        page.click("#lang-pt")
        assert page.get_attribute("html", "lang") == "pt-BR"
        page.goto(stack.web_url + "/")
        assert page.get_attribute("html", "lang") == "pt-BR"  # the switch sticks (cookie)
    finally:
        context.close()


def test_the_status_page_shows_an_open_breaker_after_an_outage(make_stack, sandbox, page, screenshot):
    stack = make_stack(
        **FAST_LIMITS,
        BREAKER_FAIL_MAX_OPENCNPJ="2",
        RETRY_MAX="1",
        RETRY_BACKOFF_BASE="0.05",
        HEALTH_CHECK_INTERVAL="3600",
    )
    stack.start_worker()
    stack.start_web()
    page.goto(stack.web_url + "/status")
    page.wait_for_selector('[data-breaker="opencnpj"][data-state="closed"]')
    sandbox.control("opencnpj", outage=True)
    for seed in range(3):
        stack.post_lookup(sandbox.known("cnpj", seed=30 + seed))
    page.wait_for_selector('[data-breaker="opencnpj"][data-state="open"]', timeout=20_000)
    assert page.locator('[data-breaker="brasilapi"][data-state="closed"]').count() == 1
    page.wait_for_selector('[data-breaker-band="opencnpj"][data-state="open"]')  # the charts' next poll
    screenshot(page, "status-breaker-open")
    assert page.problems == []


def _chart_points(page, name: str) -> int:
    return int(page.get_attribute(f'.chart[data-chart="{name}"]', "data-points") or 0)


def test_the_status_page_charts_lookups_latency_cache_queues_waits_and_breakers(
    make_stack, sandbox, page, screenshot
):
    # ViaCEP at 30 calls a minute (one every 2 s): lookups sent together wait for its tokens.
    stack = make_stack(**{**FAST_LIMITS, "RATE_LIMIT_VIACEP": "30"}, HEALTH_CHECK_INTERVAL="3600")
    stack.start_worker()
    stack.start_web()
    opened = requests.post(
        f"{stack.web_url}/api/admin/breakers/opencnpj/open",
        headers={"Authorization": "Bearer test-admin-token"},
        timeout=5,
    )
    assert opened.status_code == 200
    ceps = [sandbox.known("cep", seed=40 + n) for n in range(4)]
    for lookup_id in [stack.post_lookup(cep).json()["id"] for cep in ceps]:
        stack.wait_status(lookup_id)

    page.goto(stack.web_url + "/status")
    page.wait_for_selector('.chart[data-chart="lookups_per_second"] polyline')
    points = page.get_attribute('.chart[data-chart="lookups_per_second"] polyline', "points")
    assert len(points.split()) >= 2
    page.wait_for_selector('[data-breaker-band="opencnpj"] .band[data-state="open"]')
    assert page.locator('[data-breaker-band="brasilapi"] .band[data-state="closed"]').count() >= 1
    assert page.get_attribute('[data-breaker-band="opencnpj"]', "data-state") == "open"
    assert _chart_points(page, "p95_ms") >= 1  # the finished lookups' latency
    assert page.locator('.chart[data-chart="rate_limit_waits"] .chart-bar').count() >= 1

    # Only hits from now on: the hit rate of a 10 s bucket is the change of the cluster's totals since
    # the sample before it (the worker samples every 5 s), so keep reading until a bucket holds hits
    # alone (the misses of the first lookups may be flushed into the next one) and the page shows 100%.
    def all_hits_shown() -> bool:
        assert all(stack.post_lookup(cep).status_code == 200 for cep in ceps)
        return page.locator('.chart[data-chart="cache_hit_rate"][data-latest="1"]').count() == 1

    wait_for(all_hits_shown, timeout=45, interval=1.0, message="a 100% cache hit rate on the chart")
    assert _chart_points(page, "queue_depth") >= 2  # two buckets sampled by the page's own reads
    label = page.get_attribute('.chart[data-chart="cache_hit_rate"] svg', "aria-label")
    assert page.get_attribute('.chart[data-chart="cache_hit_rate"] svg', "role") == "img"
    assert label.startswith("Taxa de acerto do cache: agora 100") and "%" in label  # pt-BR, with the value
    breakers = page.get_attribute('.chart[data-chart="breakers"] svg', "aria-label")
    assert "OpenCNPJ Aberto" in breakers and "BrasilAPI Fechado" in breakers
    page.select_option("#charts-minutes", "5")  # a shorter window: the fresh stack's points spread out
    page.wait_for_selector('#charts[data-minutes="5"]')
    assert page.locator('[data-breaker-band="opencnpj"] .band[data-state="open"]').count() == 1
    screenshot(page, "status")
    assert page.problems == []
