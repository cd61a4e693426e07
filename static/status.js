// Operator status page: polls /api/status every 2 s and shows breakers, quotas, queues, workers and cache.
(function () {
  "use strict";
  const { t, formatTime, formatDateTime, formatNumber } = window.I18n;
  const POLL_INTERVAL_MS = 2000;
  const SOURCE_NAMES = { brasilapi: "BrasilAPI", receitaws: "ReceitaWS", opencnpj: "OpenCNPJ", viacep: "ViaCEP" };
  const byId = (id) => document.getElementById(id);
  const updated = byId("status-updated");

  const { h } = window.Dom;

  const sourceName = (name) => SOURCE_NAMES[name] || name;
  const tbody = (id) => byId(id).querySelector("tbody");

  function halfOpenText(breaker, now) {
    if (breaker.state !== "open" || typeof breaker.opened_at !== "number") return "—";
    const seconds = Math.ceil(breaker.opened_at + breaker.reset_timeout - now);
    return seconds > 0 ? t("half_open_in", { seconds }) : t("half_open_due");
  }

  function renderBreakers(status) {
    tbody("breakers").replaceChildren(...Object.entries(status.breakers || {}).map(([name, breaker]) =>
      h("tr", { class: "breaker", "data-source": name, "data-breaker": name, "data-state": breaker.state },
        h("th", { scope: "row" }, sourceName(name)),
        h("td", {}, h("span", { class: "breaker-state", "data-state": breaker.state }, t("breaker_" + breaker.state))),
        h("td", {}, `${breaker.failures} / ${breaker.fail_max}`),
        h("td", { class: "half-open" }, halfOpenText(breaker, status.time)))));
  }

  function renderRateLimits(status) {
    tbody("rate-limits").replaceChildren(...Object.entries(status.rate_limits || {}).map(([name, bucket]) =>
      h("tr", { "data-source": name },
        h("th", { scope: "row" }, sourceName(name)),
        h("td", {}, t("per_minute", { rate: formatNumber(bucket.rate_per_minute, { maximumFractionDigits: 2 }) })),
        h("td", { "data-empty": bucket.tokens < 1 ? "true" : "false" },
          t("tokens", { tokens: formatNumber(bucket.tokens, { maximumFractionDigits: 2 }), burst: bucket.burst })))));
  }

  function renderQueues(status) {
    const queues = status.queues || {};
    const rows = Object.entries(queues.by_priority || {})
      .sort((a, b) => Number(b[0]) - Number(a[0]))
      .map(([priority, depth]) => h("tr", { "data-priority": priority, "data-busy": depth > 0 ? "true" : "false" },
        h("th", { scope: "row" }, priority), h("td", {}, formatNumber(depth))));
    tbody("queues").replaceChildren(...rows);
    byId("tile-deferred").textContent = formatNumber(queues.deferred || 0);
  }

  function renderWorkers(status) {
    const workers = status.workers || [];
    byId("tile-workers").textContent = formatNumber(workers.length);
    byId("tile-workers").dataset.state = workers.length ? "ok" : "fail";
    byId("workers").replaceChildren(...(workers.length
      ? workers.map((name) => h("li", { "data-worker": name }, name))
      : [h("li", { class: "muted", "data-state": "fail" }, t("no_workers"))]));
  }

  function renderCache(status) {
    const cache = status.cache || {};
    const hitRate = typeof cache.hit_rate === "number"
      ? formatNumber(cache.hit_rate, { style: "percent", maximumFractionDigits: 1 }) : t("no_reads_yet");
    byId("tile-hit-rate").textContent = hitRate;
    const facts = [["hits", cache.hits], ["misses", cache.misses], ["stale", cache.stale], ["keys", cache.keys],
      ["generation", cache.generation], ["memory", cache.used_memory_human]];
    byId("cache").replaceChildren(...facts.filter(([, value]) => value !== undefined && value !== null)
      .flatMap(([name, value]) => [h("dt", {}, t("cache_" + name)),
        h("dd", { "data-field": name }, typeof value === "number" ? formatNumber(value) : value)]));
    byId("tile-dead-letters").textContent = formatNumber(status.dead_letters || 0);
    byId("tile-dead-letters").dataset.state = status.dead_letters ? "warn" : "ok";
  }

  function when(epochSeconds, now) {
    if (typeof epochSeconds !== "number") return t("never");
    return t("ago", { time: formatDateTime(epochSeconds), seconds: Math.max(0, Math.round(now - epochSeconds)) });
  }

  function renderMaintenance(status) {
    const health = status.health_check;
    const healthBox = byId("health-check");
    if (!health) {
      healthBox.textContent = t("never");
      healthBox.dataset.state = "";
    } else {
      const verdict = health.healthy ? t("healthy") : t("problems", { problems: (health.problems || []).join("; ") });
      healthBox.textContent = `${when(health.checked_at, status.time)} — ${verdict}`;
      healthBox.dataset.state = health.healthy ? "ok" : "fail";
    }
    const cleanup = status.cleanup;
    const removed = cleanup && cleanup.removed
      ? Object.entries(cleanup.removed).map(([name, count]) => `${name} ${count}`).join(", ") : "";
    byId("cleanup").textContent = cleanup
      ? `${when(cleanup.ran_at, status.time)}${removed ? " — " + t("removed", { items: removed }) : ""}` : t("never");
  }

  async function poll() {
    try {
      const response = await fetch("/api/status", { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const status = await response.json();
      renderBreakers(status);
      renderRateLimits(status);
      renderQueues(status);
      renderWorkers(status);
      renderCache(status);
      renderMaintenance(status);
      updated.dataset.state = "live";
      updated.textContent = t("updated_at", { time: formatTime(status.time || Date.now() / 1000) });
    } catch (error) {
      updated.dataset.state = "lost";
      updated.textContent = t("status_unreachable", { reason: error.message || String(error) });
    } finally {
      window.setTimeout(poll, POLL_INTERVAL_MS);
    }
  }

  poll();
})();
