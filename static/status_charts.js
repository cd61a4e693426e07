// Status page charts: polls /api/status/history every 5 s and draws small inline SVG charts (no library).
// Every node is built with DOM APIs and styled from style.css: the page's CSP allows no inline style or script.
(function () {
  "use strict";
  const { t, formatTime, formatNumber, formatDuration } = window.I18n;
  const POLL_INTERVAL_MS = 5000;
  const SVG = "http://www.w3.org/2000/svg";
  const HEIGHT = 120;
  const MARGIN = { top: 8, right: 10, bottom: 18, left: 44 };
  const SOURCE_NAMES = { brasilapi: "BrasilAPI", receitaws: "ReceitaWS", opencnpj: "OpenCNPJ", viacep: "ViaCEP" };
  const panel = document.getElementById("charts");
  if (!panel) return;
  const updated = document.getElementById("charts-updated");
  const minutesSelect = document.getElementById("charts-minutes");
  let latest = null;
  let timer = null;
  let asked = 0; // the newest request: an older answer arriving late (the window changed) is dropped

  const integer = (value) => formatNumber(value, { maximumFractionDigits: 0 });
  // How each series is read: its value formatting and a fixed top of scale where one exists.
  const CHARTS = {
    lookups_per_second: { kind: "line", format: (v) => t("per_second", { value: formatNumber(v, { maximumFractionDigits: 2 }) }) },
    p95_ms: { kind: "line", min: 100, format: formatDuration },
    cache_hit_rate: { kind: "line", max: 1, format: (v) => formatNumber(v, { style: "percent", maximumFractionDigits: 1 }) },
    queue_depth: { kind: "line", counts: true, format: integer },
    rate_limit_waits: { kind: "bars", counts: true, format: integer },
  };

  function svg(tag, attributes, ...children) {
    const node = document.createElementNS(SVG, tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value !== null && value !== undefined) node.setAttribute(name, String(value));
    }
    for (const child of children) node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    return node;
  }

  function chartTitle(figure) {
    return figure.querySelector(".chart-title").textContent;
  }

  // A round top of scale (1, 2, 2.5, 5 x 10^n) at or above the largest value.
  function niceMax(value) {
    if (!(value > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(value)));
    for (const step of [1, 2, 2.5, 5, 10]) if (value <= step * power) return step * power;
    return 10 * power;
  }

  // The same for counts, so that the middle grid line is a whole number too (2, 4, 6, 10 x 10^n).
  function niceCount(value) {
    const power = Math.pow(10, Math.max(0, Math.floor(Math.log10(Math.max(1, value)))));
    for (const step of [2, 4, 6, 10]) if (value <= step * power) return step * power;
    return 20 * power;
  }

  function lastValue(values) {
    for (let i = values.length - 1; i >= 0; i -= 1) if (values[i] !== null && values[i] !== undefined) return values[i];
    return null;
  }

  // The frame every chart shares: the svg, its plot area and the time axis ("15 min ago" ... "now").
  function frame(figure, history, label) {
    const width = Math.max(200, Math.floor(figure.querySelector(".chart-plot").clientWidth || 300));
    const root = svg("svg", {
      class: "chart-svg", width, height: HEIGHT, viewBox: `0 0 ${width} ${HEIGHT}`, role: "img", "aria-label": label,
    }, svg("title", {}, label));
    const plot = { x: MARGIN.left, y: MARGIN.top, width: width - MARGIN.left - MARGIN.right, height: HEIGHT - MARGIN.top - MARGIN.bottom };
    const axisY = plot.y + plot.height + 13;
    root.append(
      svg("text", { class: "chart-axis", x: plot.x, y: axisY }, t("minutes_ago", { minutes: history.minutes })),
      svg("text", { class: "chart-axis", x: plot.x + plot.width, y: axisY, "text-anchor": "end" }, t("now")));
    return { root, plot };
  }

  function yAxis(root, plot, top, format) {
    for (const fraction of [0, 0.5, 1]) {
      const y = plot.y + plot.height * (1 - fraction);
      root.append(
        svg("line", { class: fraction === 0 ? "chart-baseline" : "chart-grid", x1: plot.x, x2: plot.x + plot.width, y1: y, y2: y }),
        svg("text", { class: "chart-axis", x: plot.x - 4, y: y + 4, "text-anchor": "end" }, format(top * fraction)));
    }
  }

  function drawSeries(figure, name, history) {
    const chart = CHARTS[name];
    const values = history[name] || [];
    const now = lastValue(values);
    const label = now === null
      ? t("chart_no_data", { chart: chartTitle(figure) })
      : t("chart_latest", { chart: chartTitle(figure), value: chart.format(now) });
    const { root, plot } = frame(figure, history, label);
    const numbers = values.filter((v) => typeof v === "number");
    const largest = Math.max(0, ...numbers);
    const top = chart.max || (chart.counts ? niceCount(largest) : niceMax(Math.max(largest, chart.min || 0)));
    yAxis(root, plot, top, chart.format);
    const step = plot.width / Math.max(1, values.length);
    const xAt = (i) => plot.x + step * (i + 0.5);
    const yAt = (v) => plot.y + plot.height * (1 - Math.min(v, top) / top);
    if (chart.kind === "bars") {
      values.forEach((value, i) => {
        if (!(value > 0)) return;
        const y = yAt(value);
        root.append(svg("rect", {
          class: "chart-bar", x: plot.x + step * i + step * 0.1, y, width: Math.max(1, step * 0.8), height: plot.y + plot.height - y,
        }));
      });
    } else {
      // One polyline per run of sampled buckets: a bucket without a sample is a gap, not a zero.
      let run = [];
      const flush = () => {
        if (run.length === 1) root.append(svg("circle", { class: "chart-point", cx: run[0][0], cy: run[0][1], r: 1.5 }));
        if (run.length > 1) {
          const points = run.map(([x, y]) => `${x.toFixed(1)},${y.toFixed(1)}`).join(" ");
          const base = (plot.y + plot.height).toFixed(1);
          root.append(
            svg("polygon", { class: "chart-area", points: `${run[0][0].toFixed(1)},${base} ${points} ${run[run.length - 1][0].toFixed(1)},${base}` }),
            svg("polyline", { class: "chart-line", points }));
        }
        run = [];
      };
      values.forEach((value, i) => {
        if (typeof value === "number") run.push([xAt(i), yAt(value)]);
        else flush();
      });
      flush();
      const last = values.length - 1 - [...values].reverse().findIndex((v) => typeof v === "number");
      if (now !== null) root.append(svg("circle", { class: "chart-dot", cx: xAt(last), cy: yAt(now), r: 3 }));
    }
    figure.dataset.points = String(numbers.length);
    figure.dataset.latest = now === null ? "" : String(now);
    figure.querySelector(".chart-latest").textContent = now === null ? "–" : chart.format(now);
    figure.querySelector(".chart-plot").replaceChildren(root);
  }

  function drawBreakers(figure, history) {
    const sources = Object.keys(history.breakers || {});
    const states = sources.map((source) => {
      const state = lastValue(history.breakers[source]);
      return t("breaker_now", { source: SOURCE_NAMES[source] || source, state: state ? t("breaker_" + state) : t("breaker_none") });
    });
    const label = t("chart_breakers", { chart: chartTitle(figure), states: states.join(", ") });
    const { root, plot } = frame(figure, history, label);
    const rowHeight = plot.height / Math.max(1, sources.length);
    sources.forEach((source, row) => {
      const values = history.breakers[source];
      const step = plot.width / Math.max(1, values.length);
      const y = plot.y + row * rowHeight;
      const band = svg("g", { class: "breaker-band", "data-breaker-band": source, "data-state": lastValue(values) || "none" });
      band.append(
        svg("rect", { class: "band-empty", x: plot.x, y: y + 2, width: plot.width, height: rowHeight - 4 }),
        svg("text", { class: "chart-axis", x: plot.x - 4, y: y + rowHeight / 2 + 4, "text-anchor": "end" },
          SOURCE_NAMES[source] || source));
      // Consecutive buckets in one state make one rect.
      for (let start = 0; start < values.length;) {
        let end = start + 1;
        while (end < values.length && values[end] === values[start]) end += 1;
        if (values[start]) {
          band.append(svg("rect", {
            class: "band", "data-state": values[start], x: plot.x + step * start, y: y + 2, width: step * (end - start), height: rowHeight - 4,
          }, svg("title", {}, `${SOURCE_NAMES[source] || source}: ${t("breaker_" + values[start])}`)));
        }
        start = end;
      }
      root.append(band);
    });
    figure.dataset.points = String(sources.reduce((sum, s) => sum + history.breakers[s].filter(Boolean).length, 0));
    figure.querySelector(".chart-plot").replaceChildren(root);
  }

  function draw(history) {
    for (const figure of panel.querySelectorAll(".chart[data-chart]")) {
      const name = figure.dataset.chart;
      if (name === "breakers") drawBreakers(figure, history);
      else drawSeries(figure, name, history);
    }
  }

  async function poll() {
    window.clearTimeout(timer);
    const request = ++asked;
    try {
      const url = "/api/status/history?minutes=" + encodeURIComponent(minutesSelect.value);
      const response = await fetch(url, { headers: { Accept: "application/json" }, cache: "no-store" });
      if (!response.ok) throw new Error("HTTP " + response.status);
      const history = await response.json();
      if (request !== asked) return;
      latest = history;
      draw(latest);
      panel.dataset.minutes = String(history.minutes);
      updated.dataset.state = "live";
      updated.textContent = t("charts_updated", { time: formatTime(latest.time || Date.now() / 1000) });
    } catch (error) {
      updated.dataset.state = "lost";
      updated.textContent = t("charts_unreachable", { reason: error.message || String(error) });
    } finally {
      if (request === asked) timer = window.setTimeout(poll, POLL_INTERVAL_MS);
    }
  }

  minutesSelect.addEventListener("change", poll);
  let resizing = null;
  window.addEventListener("resize", () => {
    window.clearTimeout(resizing);
    resizing = window.setTimeout(() => { if (latest) draw(latest); }, 150);
  });
  poll();
})();
