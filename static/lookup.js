// Lookup page: live validation, submit, then follow the lookup's event stream (SSE) to its end.
// Every value from the API or an upstream goes into the page as text (textContent / text nodes), never as HTML.
(function () {
  "use strict";
  const { t, announce, formatTime, formatNumber, formatDuration, formatDate } = window.I18n;
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
  const sourcesBox = byId("sources");
  const resultBox = byId("result");
  const checksList = byId("checks");
  const recentList = byId("recent");
  const recentEmpty = byId("recent-empty");

  // The lookup on screen; `generation` changes whenever another one replaces it, so late answers are dropped.
  let generation = 0;
  let view = null;
  let events = null;
  let reloadTimer = null;

  // -- DOM helpers -------------------------------------------------------------------------------------

  // h("p", {class: "x", "data-state": "ok"}, "text", child): an element; strings become text nodes.
  function h(tag, attributes, ...children) {
    const node = document.createElement(tag);
    for (const [name, value] of Object.entries(attributes || {})) {
      if (value === null || value === undefined || value === false) continue;
      if (name === "class") node.className = value;
      else node.setAttribute(name, value === true ? "" : String(value));
    }
    for (const child of children.flat()) {
      if (child === null || child === undefined || child === false) continue;
      node.append(child instanceof Node ? child : document.createTextNode(String(child)));
    }
    return node;
  }

  const isBlank = (value) => value === null || value === undefined || value === "" ||
    (Array.isArray(value) && value.length === 0);
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
    if (!response.ok || !body || !body.id) {
      const text = body && typeof body.message === "string" ? body.message : t("request_failed", { status: response.status });
      showFieldMessage(text, "error");
      input.focus();
      return;
    }
    showFieldMessage("", "");
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
      setStream(lookup.cached ? "cached" : "closed");
      return;
    }
    openStream(lookup.links.events, lookup.id, token);
  }

  // -- the event stream --------------------------------------------------------------------------------

  function openStream(url, lookupId, token) {
    const stream = new EventSource(url);
    events = stream;
    setStream("connecting");
    const on = (type, apply) => stream.addEventListener(type, (event) => {
      if (token !== generation) return;
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      apply(data);
    });
    stream.addEventListener("open", () => { if (token === generation) setStream("live"); });
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
    shareLink.value = new URL("/lookups/" + encodeURIComponent(lookup.id), window.location.origin).href;
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

  // -- the merged result -------------------------------------------------------------------------------

  function fact(key, value) {
    if (isBlank(value)) return null;
    return [h("dt", {}, t("field_" + key)), h("dd", { "data-field": key }, value)];
  }

  function cnae(item) {
    if (!item) return null;
    const code = String(item.codigo || "");
    const shown = /^\d{7}$/.test(code) ? `${code.slice(0, 4)}-${code.slice(4, 5)}/${code.slice(5)}` : code;
    return [shown, item.descricao].filter((part) => !isBlank(part)).join(" — ");
  }

  function money(value) {
    return typeof value === "number" ? formatNumber(value, { style: "currency", currency: "BRL" }) : value;
  }

  function renderCompany(data) {
    const address = data.endereco || {};
    const cityState = [address.municipio, address.uf].filter((part) => !isBlank(part)).join("/");
    const situation = data.situacao_cadastral;
    const since = data.data_situacao_cadastral ? " (" + formatDate(data.data_situacao_cadastral) + ")" : "";
    const secondary = (data.cnaes_secundarios || []).map(cnae).filter((text) => !isBlank(text));
    const partners = data.socios || [];
    return [
      h("div", { class: "result-head" },
        h("p", { class: "company-name", "data-field": "razao_social" }, data.razao_social || "—"),
        isBlank(data.nome_fantasia) ? null : h("p", { class: "trade-name", "data-field": "nome_fantasia" }, data.nome_fantasia),
        isBlank(situation) ? null : h("span", { class: "situation", "data-situation": String(situation).toUpperCase() === "ATIVA" ? "active" : "inactive" }, situation + since)),
      h("dl", { class: "facts" },
        fact("razao_social", data.razao_social),
        fact("nome_fantasia", data.nome_fantasia),
        fact("cnpj", Identifiers.masked("cnpj", data.cnpj)),
        fact("situacao_cadastral", isBlank(situation) ? null : situation + since),
        fact("data_abertura", data.data_abertura ? formatDate(data.data_abertura) : null),
        fact("natureza_juridica", data.natureza_juridica),
        fact("porte", data.porte),
        fact("capital_social", money(data.capital_social)),
        fact("cnae_principal", cnae(data.cnae_principal)),
        secondary.length ? [h("dt", {}, t("field_cnaes_secundarios")),
          h("dd", { "data-field": "cnaes_secundarios" }, h("ul", { class: "plain-list" }, secondary.map((text) => h("li", {}, text))))] : null,
        fact("telefone", data.telefone),
        fact("email", data.email)),
      h("h4", { class: "subsection" }, t("field_endereco")),
      h("dl", { class: "facts", "data-field": "endereco" },
        fact("logradouro", address.logradouro),
        fact("numero", address.numero),
        fact("complemento", address.complemento),
        fact("bairro", address.bairro),
        fact("municipio_uf", cityState),
        fact("cep", Identifiers.masked("cep", address.cep))),
      h("h4", { class: "subsection" }, t("field_socios")),
      partners.length
        ? h("div", { class: "table-wrap" }, h("table", { class: "partners", "data-field": "socios" },
          h("thead", {}, h("tr", {}, h("th", { scope: "col" }, t("field_partner_name")), h("th", { scope: "col" }, t("field_partner_role")))),
          h("tbody", {}, partners.map((partner) => h("tr", {}, h("td", {}, partner.nome || ""), h("td", {}, partner.qualificacao || ""))))))
        : h("p", { class: "muted" }, t("no_partners")),
      renderOther(data, ["cnpj", "razao_social", "nome_fantasia", "situacao_cadastral", "data_situacao_cadastral",
        "data_abertura", "natureza_juridica", "porte", "capital_social", "cnae_principal", "cnaes_secundarios",
        "endereco", "telefone", "email", "socios"]),
    ];
  }

  function renderPlace(data) {
    const coordinates = typeof data.latitude === "number" && typeof data.longitude === "number"
      ? `${formatNumber(data.latitude, { maximumFractionDigits: 6 })}, ${formatNumber(data.longitude, { maximumFractionDigits: 6 })}` : null;
    return [
      h("div", { class: "result-head" },
        h("p", { class: "company-name", "data-field": "logradouro" }, data.logradouro || Identifiers.masked("cep", data.cep)),
        h("p", { class: "trade-name" }, [data.bairro, [data.municipio, data.uf].filter((part) => !isBlank(part)).join("/")]
          .filter((part) => !isBlank(part)).join(" · "))),
      h("dl", { class: "facts" },
        fact("cep", Identifiers.masked("cep", data.cep)),
        fact("logradouro", data.logradouro),
        fact("complemento", data.complemento),
        fact("bairro", data.bairro),
        fact("municipio", data.municipio),
        fact("uf", data.uf),
        fact("ibge", data.ibge),
        fact("ddd", data.ddd),
        fact("coordinates", coordinates)),
      renderOther(data, ["cep", "logradouro", "complemento", "bairro", "municipio", "uf", "ibge", "ddd", "latitude", "longitude"]),
    ];
  }

  function renderPerson(data) {
    const valid = typeof data.valido === "boolean" ? t(data.valido ? "yes" : "no") : data.valido;
    return [
      h("dl", { class: "facts" },
        fact("cpf", Identifiers.masked("cpf", data.cpf)),
        fact("valido", valid),
        fact("regiao_fiscal", data.regiao_fiscal),
        fact("ufs", Array.isArray(data.ufs) ? data.ufs.join(", ") : data.ufs)),
      renderOther(data, ["cpf", "valido", "regiao_fiscal", "ufs"]),
    ];
  }

  // Whatever else the result holds, shown as text under its own key.
  function renderOther(data, known) {
    const rows = Object.entries(data)
      .filter(([key, value]) => !known.includes(key) && !isBlank(value))
      .map(([key, value]) => [h("dt", {}, key), h("dd", { "data-field": key }, typeof value === "object" ? JSON.stringify(value) : String(value))]);
    return rows.length ? h("dl", { class: "facts extra" }, rows) : null;
  }

  function renderResult(lookup) {
    resultBox.dataset.type = lookup.type;
    const data = lookup.result;
    if (!data || typeof data !== "object") {
      const text = lookup.status === "complete" || lookup.status === "partial" ? t("no_result") : t("result_pending");
      resultBox.dataset.state = "empty";
      resultBox.replaceChildren(h("p", { class: "muted" }, text));
      return;
    }
    resultBox.dataset.state = "ready";
    const render = { cnpj: renderCompany, cep: renderPlace, cpf: renderPerson }[lookup.type] || ((value) => renderOther(value, []));
    resultBox.replaceChildren(...[render(data)].flat().filter(Boolean));
  }

  // -- cross-checks ------------------------------------------------------------------------------------

  function fieldLabel(path) {
    const parts = String(path).split(".");
    const labels = parts.map((part) => {
      const text = t("field_" + part);
      return text === "field_" + part ? part : text;
    });
    return labels.join(" · ");
  }

  function checkLabel(name) {
    if (name.startsWith("sources_agree:")) return t("check_sources_agree", { field: fieldLabel(name.slice(14)) });
    const key = "check_" + name;
    const text = t(key);
    return text === key ? name : text;
  }

  // The detail in the page's language when its code is known, else the API's English text.
  function checkDetail(check) {
    const key = "detail_" + String(check.code || "");
    const params = check.params && typeof check.params === "object" ? check.params : {};
    return check.code && t(key) !== key ? t(key, params) : String(check.detail || check.message || "");
  }

  function renderChecks(lookup) {
    const checks = lookup.checks || [];
    if (!checks.length) {
      const text = lookup.status === "complete" ? t("no_checks") : t("checks_pending");
      checksList.replaceChildren(h("li", { class: "check-empty muted" }, text));
      return;
    }
    checksList.replaceChildren(...checks.map((check) => {
      const status = ["pass", "fail", "unverified"].includes(check.status) ? check.status : "unverified";
      return h("li", { class: "check", "data-status": status, "data-name": check.name },
        h("span", { class: "check-icon", "aria-hidden": "true" }),
        h("span", { class: "check-status" }, t("check_" + status)),
        h("span", { class: "check-body" },
          h("strong", { class: "check-name" }, checkLabel(String(check.name || ""))),
          h("span", { class: "check-detail" }, checkDetail(check))));
    }));
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
