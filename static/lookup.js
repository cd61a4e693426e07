// Lookup page: live validation, submit, then follow the lookup's event stream (SSE) to its end.
// Every value from the API or an upstream goes into the page as text (textContent / text nodes), never as HTML.
(function () {
  "use strict";
  const { t, announce, formatTime, formatDuration } = window.I18n;
  const Identifiers = window.Identifiers;

  const SOURCE_NAMES = { brasilapi: "BrasilAPI", receitaws: "ReceitaWS", opencnpj: "OpenCNPJ", viacep: "ViaCEP" };
  const FINAL_STATES = new Set(["ok", "not_found", "error", "stale", "circuit_open"]);
  const RECENT_KEY = "enrichment-lookup.recent";
  const RECENT_MAX = 10;
  const RELOAD_DELAY_MS = 3000;

  const byId = (id) => document.getElementById(id);
  const app = byId("lookup-app");
  const form = byId("lookup-form");
  const input = byId("identifier");
  const fieldMessage = byId("identifier-message");
  const detectedType = byId("detected-type");
  const submitButton = byId("submit");
  const panel = byId("lookup");
  const lookupType = byId("lookup-type");
  const lookupIdentifier = byId("lookup-identifier");
  const lookupStatus = byId("lookup-status");
  const streamStatus = byId("stream-status");
  const shareLink = byId("share-link");
  const copyButton = byId("copy-link");
  const progress = byId("progress");
  const progressText = byId("progress-text");
  const lookupMessage = byId("lookup-message");
  const pendingNote = byId("pending-note");
  // A CPF is answered from the number alone (no id, no sources, nothing kept): these do not apply.
  const perLookupParts = [byId("share"), byId("progress-row"), byId("sources-title"), byId("sources")];
  const localNote = byId("local-note");
  const sourcesBox = byId("sources");
  const recentList = byId("recent");
  const recentEmpty = byId("recent-empty");

  // The lookup on screen; `generation` changes whenever another one replaces it, so late answers are dropped.
  let generation = 0;
  let view = null;
  let events = null;
  let reloadTimer = null;

  const { h, isBlank, renderResult, renderChecks } = window.LookupResult;
  const sourceName = (name) => SOURCE_NAMES[name] || name;
  const isSettled = (source) => FINAL_STATES.has(source.state) ||
    (source.state === "rate_limited" && (source.scheduled_at === null || source.scheduled_at === undefined));

  // -- the identifier field ----------------------------------------------------------------------------

  function showFieldMessage(text, state) {
    fieldMessage.textContent = text;
    fieldMessage.dataset.state = state;
    input.setAttribute("aria-invalid", state === "error" ? "true" : "false");
  }

  function checkInput() {
    const raw = input.value;
    const type = Identifiers.detectType(raw);
    detectedType.dataset.type = type || "";
    detectedType.textContent = type ? t("detected", { type: t("type_" + type) }) : t("type_unknown");
    if (!raw.trim()) {
      showFieldMessage("", "");
      return;
    }
    try {
      const parsed = Identifiers.parse(raw);
      showFieldMessage(t("valid", { type: t("type_" + parsed.type) }), "ok");
    } catch (error) {
      if (!(error instanceof Identifiers.InvalidIdentifier)) throw error;
      const compact = safeCompact(raw);
      const stillTyping = compact !== null && compact.length < Identifiers.LENGTH.cnpj &&
        ["undetectable", "cnpj_length", "cpf_length", "cep_length"].includes(error.key);
      if (stillTyping && type) {
        const length = Identifiers.LENGTH[type];
        showFieldMessage(t("incomplete", { type: t("type_" + type), count: compact.length, length }), "typing");
      } else if (stillTyping) {
        showFieldMessage("", "typing");
      } else {
        showFieldMessage(t(error.key, error.params), "error");
      }
    }
  }

  function safeCompact(raw) {
    try {
      return Identifiers.compact(raw);
    } catch (error) {
      return null;
    }
  }

  input.addEventListener("input", checkInput);

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    try {
      Identifiers.parse(input.value);
    } catch (error) {
      if (!(error instanceof Identifiers.InvalidIdentifier)) throw error;
      showFieldMessage(t(error.key, error.params), "error");
      input.focus();
      return;
    }
    startLookup(input.value);
  });

  // -- starting and loading lookups --------------------------------------------------------------------

  function stopFollowing() {
    generation += 1;
    if (events) events.close();
    events = null;
    window.clearTimeout(reloadTimer);
    return generation;
  }

  async function startLookup(raw) {
    const token = stopFollowing();
    submitButton.disabled = true;
    form.setAttribute("aria-busy", "true");
    showFieldMessage(t("looking_up"), "busy");
    let response;
    let body = null;
    try {
      response = await fetch("/api/lookups", {
        method: "POST",
        headers: { "Content-Type": "application/json", Accept: "application/json" },
        body: JSON.stringify({ identifier: raw }),
      });
      body = await response.json().catch(() => null);
    } catch (error) {
      if (token === generation) showFieldMessage(t("network_error"), "error");
      return;
    } finally {
      submitButton.disabled = false;
      form.removeAttribute("aria-busy");
    }
    if (token !== generation) return;
    const answeredHere = response.ok && body && body.id === null && body.status === "complete";
    if (!response.ok || !body || !(body.id || answeredHere)) {
      const text = body && typeof body.message === "string" ? body.message : t("request_failed", { status: response.status });
      showFieldMessage(text, "error");
      input.focus();
      return;
    }
    showFieldMessage("", "");
    if (answeredHere) {
      // A CPF: nothing to link to, and it is a person's number, so it stays out of this browser's
      // list of recent lookups (and out of the address bar).
      if (window.location.pathname !== "/") window.history.pushState({}, "", "/");
      follow(body, token);
      return;
    }
    const path = "/lookups/" + encodeURIComponent(body.id);
    if (window.location.pathname !== path) window.history.pushState({ lookupId: body.id }, "", path);
    rememberRecent(body);
    follow(body, token);
  }

  async function loadLookup(lookupId) {
    const token = stopFollowing();
    let response;
    try {
      response = await fetch("/api/lookups/" + encodeURIComponent(lookupId), { headers: { Accept: "application/json" } });
    } catch (error) {
      if (token === generation) retryLater(lookupId, token);
      return;
    }
    if (token !== generation) return;
    if (response.status === 404) {
      showLookupError(t("lookup_expired"));
      setStream("closed");
      return;
    }
    if (!response.ok) {
      showLookupError(t("load_failed", { status: response.status }));
      retryLater(lookupId, token);
      return;
    }
    follow(await response.json(), token);
  }

  function retryLater(lookupId, token) {
    setStream("lost");
    window.clearTimeout(reloadTimer);
    reloadTimer = window.setTimeout(() => { if (token === generation) loadLookup(lookupId); }, RELOAD_DELAY_MS);
  }

  // Render the lookup at once; stream its events unless it is already complete (a 200 from the cache).
  function follow(lookup, token) {
    view = null;
    sourcesBox.replaceChildren();
    lookupMessage.hidden = true;
    renderLookup(lookup);
    if (lookup.status === "complete") {
      setStream(lookup.cached ? "cached" : lookup.id ? "closed" : "idle");
      return;
    }
    openStream(lookup.links.events, lookup.id, token);
  }

  // -- the event stream --------------------------------------------------------------------------------

  function openStream(url, lookupId, token) {
    const { stream, on } = window.Dom.eventStream(url, () => token === generation, setStream);
    events = stream;
    on("snapshot", (lookup) => {
      renderLookup(lookup);
      if (lookup.status === "complete") finish(stream, lookup);
    });
    on("source", applySource);
    on("progress", applyProgress);
    on("partial", (lookup) => {
      renderLookup(lookup);
      announce(t("status_partial"));
    });
    on("complete", (lookup) => {
      renderLookup(lookup);
      finish(stream, lookup);
    });
    stream.addEventListener("error", (event) => {
      if (token !== generation) return;
      if (event instanceof MessageEvent && typeof event.data === "string" && event.data) {
        // The service's own `error` event: the lookup failed.
        let text = "";
        try {
          text = JSON.parse(event.data).message || "";
        } catch (error) {
          text = event.data;
        }
        stream.close();
        showLookupError(t("stream_error", { message: text }));
        setStream("closed");
        return;
      }
      // A dropped connection: the browser reconnects with Last-Event-ID and the server replays what was missed.
      if (stream.readyState === EventSource.CONNECTING) setStream("reconnecting");
      else if (stream.readyState === EventSource.CLOSED) retryLater(lookupId, token);
    });
  }

  function finish(stream, lookup) {
    stream.close();
    if (events === stream) events = null;
    setStream("closed");
    announce(t("lookup_complete") + ": " + t("progress", lookup.progress));
  }

  function setStream(state) {
    streamStatus.dataset.state = state;
    const key = state === "cached" ? "from_cache" : state === "idle" ? null : "stream_" + state;
    streamStatus.textContent = key ? t(key) : "";
  }

  // A `source` event: that source's card only.  A replayed event older than what is shown never moves a
  // settled source back to a working state (the record never does either), so replays are harmless.
  function applySource(source) {
    if (!view || !source || !source.source) return;
    const previous = view.sources[source.source];
    if (previous && isSettled(previous) && !isSettled(source)) return;
    view.sources[source.source] = source;
    renderSource(source);
    renderPendingNote();
  }

  function applyProgress(counts) {
    if (!view) return;
    const done = counts.total === view.progress.total ? Math.max(counts.done, view.progress.done) : counts.done;
    view.progress = { done, total: counts.total };
    renderProgress();
  }

  // -- rendering a lookup (idempotent: the same lookup renders the same page, however often) -----------

  function renderLookup(lookup) {
    if (!lookup || !lookup.sources) return;
    view = {
      id: lookup.id,
      type: lookup.type,
      status: lookup.status,
      sources: { ...lookup.sources },
      progress: { ...lookup.progress },
    };
    panel.hidden = false;
    lookupType.textContent = t("type_" + lookup.type);
    lookupType.dataset.type = lookup.type;
    lookupIdentifier.textContent = Identifiers.masked(lookup.type, lookup.identifier);
    lookupStatus.dataset.status = lookup.status;
    lookupStatus.textContent = t("status_" + lookup.status);
    for (const part of perLookupParts) part.hidden = !lookup.id;
    localNote.hidden = Boolean(lookup.id);
    shareLink.value = lookup.id ? new URL("/lookups/" + encodeURIComponent(lookup.id), window.location.origin).href : "";
    renderProgress();
    const names = Object.keys(lookup.sources);
    for (const card of sourcesBox.querySelectorAll(".source-card")) {
      if (!names.includes(card.dataset.source)) card.remove();
    }
    for (const name of names) {
      renderSource(lookup.sources[name]);
      sourcesBox.append(cardFor(name)); // keeps the API's order; moving a node never duplicates it
    }
    renderPendingNote();
    renderResult(lookup);
    renderChecks(lookup);
  }

  function renderProgress() {
    const { done, total } = view.progress;
    progress.max = Math.max(total, 1);
    progress.value = done;
    progress.setAttribute("aria-valuetext", t("progress", { done, total }));
    progressText.textContent = t("progress", { done, total });
  }

  function renderPendingNote() {
    const waiting = Object.values(view.sources).filter((source) => !isSettled(source));
    if (view.status !== "partial" || waiting.length === 0) {
      pendingNote.hidden = true;
      pendingNote.textContent = "";
      return;
    }
    const names = waiting.map((source) => source.scheduled_at
      ? t("pending_runs_at", { source: sourceName(source.source), time: formatTime(source.scheduled_at) })
      : sourceName(source.source));
    pendingNote.textContent = t("still_pending", { sources: names.join(", ") });
    pendingNote.hidden = false;
  }

  function showLookupError(text) {
    panel.hidden = false;
    lookupMessage.textContent = text;
    lookupMessage.hidden = false;
  }

  // -- source cards, keyed by source name --------------------------------------------------------------

  function cardFor(name) {
    for (const card of sourcesBox.querySelectorAll(".source-card")) {
      if (card.dataset.source === name) return card;
    }
    const titleId = "source-title-" + name.replace(/[^a-z0-9_-]/gi, "");
    const card = h("article", { class: "source-card", "data-source": name, "data-state": "pending", "aria-labelledby": titleId },
      h("header", { class: "source-head" },
        h("h4", { id: titleId }, sourceName(name)),
        h("span", { class: "source-state" }, h("span", { class: "spinner", "aria-hidden": "true" }), h("span", { class: "state-label" }))),
      h("div", { class: "badges" }),
      h("p", { class: "elapsed" }),
      h("p", { class: "source-error" }),
      h("details", { class: "source-data", hidden: true }, h("summary", {}, t("source_data")), h("pre", {})));
    sourcesBox.append(card);
    return card;
  }

  function stateLabel(source) {
    if (source.state === "retrying") return t("state_retrying", { attempts: source.attempts || 1 });
    return t("state_" + source.state);
  }

  function badge(kind, text, title) {
    return h("span", { class: "badge badge-" + kind, "data-badge": kind, title: title || null }, text);
  }

  function renderSource(source) {
    const card = cardFor(source.source);
    card.dataset.state = source.state;
    card.setAttribute("aria-busy", isSettled(source) ? "false" : "true");
    card.querySelector(".state-label").textContent = stateLabel(source);

    const badges = [];
    if (source.cached) badges.push(badge("cached", t("badge_cached")));
    if (source.stale || source.state === "stale") badges.push(badge("stale", t("badge_stale")));
    if (source.state === "rate_limited") {
      badges.push(source.scheduled_at
        ? badge("rate-limited", t("badge_runs_at", { time: formatTime(source.scheduled_at) }))
        : badge("rate-limited", t("badge_rate_limited")));
    }
    if (source.state === "circuit_open") badges.push(badge("circuit-open", t("badge_circuit_open")));
    if (source.state === "not_found") badges.push(badge("not-found", t("badge_not_found")));
    if (source.state === "error") badges.push(badge("error", t("badge_error")));
    card.querySelector(".badges").replaceChildren(...badges);

    const elapsed = card.querySelector(".elapsed");
    elapsed.textContent = typeof source.elapsed_ms === "number" ? t("elapsed", { time: formatDuration(source.elapsed_ms) }) : "";
    const error = card.querySelector(".source-error");
    error.textContent = source.error && source.state !== "ok" ? source.error : "";

    const details = card.querySelector(".source-data");
    details.hidden = !source.data;
    details.querySelector("pre").textContent = source.data ? JSON.stringify(source.data, null, 2) : "";
  }

  // -- share link --------------------------------------------------------------------------------------

  copyButton.addEventListener("click", async () => {
    try {
      await navigator.clipboard.writeText(shareLink.value);
      copyButton.dataset.copied = "true";
      announce(t("link_copied"));
      window.setTimeout(() => { delete copyButton.dataset.copied; }, 2000);
    } catch (error) {
      shareLink.focus();
      shareLink.select();
      announce(t("copy_failed"));
    }
  });

  // -- recent lookups of this browser ------------------------------------------------------------------

  function readRecent() {
    try {
      const items = JSON.parse(window.localStorage.getItem(RECENT_KEY) || "[]");
      return Array.isArray(items) ? items.filter((item) => item && typeof item.identifier === "string") : [];
    } catch (error) {
      return [];
    }
  }

  function rememberRecent(lookup) {
    const entry = { identifier: lookup.identifier, type: lookup.type, id: lookup.id, time: Date.now() / 1000 };
    const items = [entry, ...readRecent().filter((item) => !(item.identifier === entry.identifier && item.type === entry.type))];
    try {
      window.localStorage.setItem(RECENT_KEY, JSON.stringify(items.slice(0, RECENT_MAX)));
    } catch (error) {
      // Storage full or disabled: the list is a convenience, the lookup goes on.
    }
    renderRecent();
  }

  function renderRecent() {
    const items = readRecent().slice(0, RECENT_MAX);
    recentEmpty.hidden = items.length > 0;
    recentList.replaceChildren(...items.map((item) => {
      const shown = Identifiers.masked(item.type, item.identifier);
      const button = h("button", { type: "button", class: "recent-item", "data-identifier": item.identifier,
        "data-lookup-id": item.id, "aria-label": t("look_up_again", { identifier: shown }) },
        h("span", { class: "type-chip", "data-type": item.type }, t("type_" + item.type)),
        h("span", { class: "recent-identifier" }, shown),
        h("span", { class: "recent-time" }, typeof item.time === "number" ? formatTime(item.time) : ""));
      button.addEventListener("click", () => {
        input.value = shown;
        checkInput();
        startLookup(item.identifier);
      });
      return h("li", {}, button);
    }));
  }

  // -- history -----------------------------------------------------------------------------------------

  function lookupIdFromPath(pathname) {
    const match = /^\/lookups\/([^/]+)$/.exec(pathname);
    return match ? decodeURIComponent(match[1]) : null;
  }

  window.addEventListener("popstate", () => {
    const lookupId = lookupIdFromPath(window.location.pathname);
    if (lookupId) {
      loadLookup(lookupId);
    } else {
      stopFollowing();
      view = null;
      panel.hidden = true;
      setStream("idle");
    }
  });

  renderRecent();
  checkInput();
  if (app.dataset.lookupId) loadLookup(app.dataset.lookupId);
})();
