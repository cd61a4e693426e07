// Bulk batch page: a CSV dropped on the drop zone (or picked) is posted to /api/batches, then the batch's event
// stream (SSE) drives its progress, counts, time left and throughput until it ends; `/batches/<id>` shows one batch.
// Every value from the API or the file goes into the page as text (textContent / text nodes), never as HTML.
(function () {
  "use strict";
  const { t, announce, formatNumber, formatTime, formatDateTime } = window.I18n;

  const INVALID_SHOWN = 20; // invalid lines listed on the page; the results file has every line
  const INVALID_KEY = "enrichment-lookup.batch-invalid";
  const INVALID_KEPT = 10; // batches whose invalid lines this browser remembers (for a reload)
  // The cancel token of each batch this browser started, under a key of its own per batch id: the id is the
  // link people share to watch a batch; only the browser holding the token shows the cancel button.
  const CANCEL_KEY_PREFIX = "enrichment-lookup.batch-cancel.";
  const CANCEL_KEPT = 20; // running batches whose cancel tokens this browser keeps (the newest)
  const RELOAD_DELAY_MS = 3000;
  const ANNOUNCE_EVERY_MS = 15000; // a screen reader hears the progress at most this often while it runs

  // The API's reasons (identifiers.py, batch_input.py, batch_api.py) in the page's language, matched on their
  // English text; a reason not listed here is shown as the API wrote it.
  const REASONS = [
    [/^identifier is too long \((\d+) characters\); at most (\d+) are accepted$/, "too_long", ["count", "max"]],
    [/^identifier is empty$/, "row_empty", []],
    [/^character (.+) at position (\d+) is not allowed/, "bad_character", ["character", "position"]],
    [/^identifier has no letters or digits$/, "no_letters_or_digits", []],
    [/^unknown identifier type (.+); use cnpj, cep or cpf$/, "row_unknown_type", ["type"]],
    [/^type must be (?:a string: )?cnpj, cep or cpf$/, "row_type_choice", []],
    [/^could not tell the identifier type/, "undetectable", []],
    [/^CNPJ must have 14 characters, got (\d+)$/, "cnpj_length", ["count"]],
    [/^CNPJ check digits \(the last two characters\) must be digits$/, "cnpj_check_not_digits", []],
    [/^CNPJ cannot have all characters equal$/, "cnpj_all_equal", []],
    [/^CNPJ check digits do not match$/, "cnpj_check_digits", []],
    [/^CPF cannot contain letters$/, "cpf_letters", []],
    [/^CPF cannot contain '\/': only a CNPJ's mask has one$/, "cpf_slash", []],
    [/^CPF must have 11 digits, got (\d+)$/, "cpf_length", ["count"]],
    [/^CPF cannot have all digits equal$/, "cpf_all_equal", []],
    [/^CPF check digits do not match$/, "cpf_check_digits", []],
    [/^CEP cannot contain letters$/, "cep_letters", []],
    [/^CEP cannot contain '\/': only a CNPJ's mask has one$/, "cep_slash", []],
    [/^CEP must have 8 digits, got (\d+)$/, "cep_length", ["count"]],
    [/^CEP 00000000 does not exist$/, "cep_zero", []],
    [/^expected identifier\[,type\], got (\d+) columns$/, "row_columns", ["count"]],
    [/^a batch holds at most ([\d,]+) rows$/, "too_many_rows", ["max"]],
    [/^the file is not UTF-8 text/, "not_utf8", []],
    [/^the batch holds no identifiers$/, "no_identifiers", []],
  ];

  const byId = (id) => document.getElementById(id);
  const app = byId("batch-app");
  const dropZone = byId("drop-zone");
  const fileInput = byId("batch-file");
  const uploadMessage = byId("upload-message");
  const panel = byId("batch");
  const nameBox = byId("batch-name");
  const statusChip = byId("batch-status");
  const startedBox = byId("batch-started");
  const streamStatus = byId("stream-status");
  const csvLink = byId("download-csv");
  const jsonlLink = byId("download-jsonl");
  const cancelButton = byId("cancel-batch");
  const progress = byId("batch-progress");
  const progressText = byId("batch-progress-text");
  const live = byId("batch-live");
  const batchMessage = byId("batch-message");
  const invalidBox = byId("invalid-rows");
  const invalidCount = byId("invalid-count");
  const invalidTable = byId("invalid-table-wrap");
  const invalidBody = byId("invalid-table").querySelector("tbody");
  const invalidNote = byId("invalid-note");

  // The batch on screen; `generation` changes whenever another one replaces it, so late answers are dropped.
  let generation = 0;
  let view = null;
  let events = null;
  let reloadTimer = null;
  let announcedAt = 0;
  let announcedEnd = null;
  let cancelToken = null; // the batch on screen's cancel token, when this browser started it

  const { h } = window.Dom;

  const number = (value) => formatNumber(value || 0);
  const isFinished = (batch) => batch.finished_at !== null && batch.finished_at !== undefined;

  function reasonText(reason) {
    const text = String(reason || "");
    for (const [pattern, key, names] of REASONS) {
      const match = pattern.exec(text);
      if (!match) continue;
      const params = Object.fromEntries(names.map((name, index) => [name, match[index + 1]]));
      if (key === "too_many_rows") params.max = number(Number(params.max.replace(/,/g, "")));
      return t(key, params);
    }
    return text;
  }

  function formatSize(bytes) {
    if (bytes < 1024 * 1024) return formatNumber(Math.ceil(bytes / 1024)) + " KB";
    return formatNumber(bytes / (1024 * 1024), { maximumFractionDigits: 1 }) + " MB";
  }

  // -- choosing and uploading the file -----------------------------------------------------------------

  function showUploadMessage(text, state) {
    uploadMessage.textContent = text;
    uploadMessage.dataset.state = state;
  }

  function setUploading(busy) {
    fileInput.disabled = busy;
    dropZone.dataset.state = busy ? "busy" : "idle";
    dropZone.setAttribute("aria-busy", busy ? "true" : "false");
  }

  function chooseFiles(files) {
    if (!files || files.length === 0 || fileInput.disabled) return;
    if (files.length > 1) {
      showUploadMessage(t("batch_one_file"), "error");
      return;
    }
    upload(files[0]);
  }

  async function upload(file) {
    const maxBytes = Number(app.dataset.maxBytes) || Infinity;
    if (file.size > maxBytes) {
      showUploadMessage(t("batch_too_big", { size: formatSize(file.size), max: app.dataset.maxSize }), "error");
      return;
    }
    const token = stopFollowing();
    setUploading(true);
    showUploadMessage(t("batch_uploading", { name: file.name }), "busy");
    const form = new FormData();
    form.append("file", file, file.name);
    let response;
    let body = null;
    try {
      response = await fetch("/api/batches", { method: "POST", body: form, headers: { Accept: "application/json" } });
      body = await response.json().catch(() => null);
    } catch (error) {
      if (token === generation) showUploadMessage(t("network_error"), "error");
      return;
    } finally {
      setUploading(false);
      fileInput.value = ""; // the same file can be chosen again
    }
    if (token !== generation) return;
    if (!response.ok || !body || !body.id) {
      let text = t("batch_upload_failed", { status: response.status });
      if (response.status === 413) {
        text = t("batch_too_big", { size: formatSize(file.size), max: app.dataset.maxSize });
      } else if (body && typeof body.message === "string") {
        text = reasonText(body.message);
      }
      showUploadMessage(text, "error");
      return;
    }
    showUploadMessage("", "");
    const { cancel_token: created, ...status } = body; // the token is kept apart, never rendered
    const invalid = Array.isArray(body.invalid) ? body.invalid : [];
    rememberInvalid(body.id, invalid);
    rememberCancelToken(body.id, created);
    const path = "/batches/" + encodeURIComponent(body.id);
    if (window.location.pathname !== path) window.history.replaceState({ batchId: body.id }, "", path);
    announce(t("batch_started", { total: number(body.total) }));
    // The status body holds the invalid lines' count; the token stays in memory should storage be off.
    follow({ ...status, invalid: invalid.length }, token, invalid, typeof created === "string" ? created : null);
  }

  fileInput.addEventListener("change", () => chooseFiles(fileInput.files));

  const hasFiles = (event) => Boolean(event.dataTransfer) && Array.from(event.dataTransfer.types || []).includes("Files");
  let dragDepth = 0; // dragenter/dragleave also fire for the zone's children
  dropZone.addEventListener("dragenter", (event) => {
    if (!hasFiles(event) || fileInput.disabled) return;
    event.preventDefault();
    dragDepth += 1;
    dropZone.dataset.state = "over";
  });
  dropZone.addEventListener("dragover", (event) => {
    if (!hasFiles(event) || fileInput.disabled) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "copy";
  });
  dropZone.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0 && dropZone.dataset.state === "over") dropZone.dataset.state = "idle";
  });
  dropZone.addEventListener("drop", (event) => {
    if (!hasFiles(event)) return;
    event.preventDefault();
    dragDepth = 0;
    if (dropZone.dataset.state === "over") dropZone.dataset.state = "idle";
    chooseFiles(event.dataTransfer.files);
  });
  // A file dropped beside the zone would make the browser open it, leaving the page and the batch on it.
  window.addEventListener("dragover", (event) => {
    if (!hasFiles(event) || dropZone.contains(event.target)) return;
    event.preventDefault();
    event.dataTransfer.dropEffect = "none";
  });
  window.addEventListener("drop", (event) => { if (hasFiles(event)) event.preventDefault(); });

  // -- the invalid lines of the batches posted from this browser (the status only has their count) -----

  function readInvalid() {
    try {
      const stored = JSON.parse(window.localStorage.getItem(INVALID_KEY) || "{}");
      return stored && typeof stored === "object" && !Array.isArray(stored) ? stored : {};
    } catch (error) {
      return {};
    }
  }

  function rememberInvalid(batchId, invalid) {
    if (!invalid.length) return;
    const rows = invalid.slice(0, INVALID_SHOWN).map((entry) =>
      ({ line: entry.line, value: String(entry.value).slice(0, 200), reason: entry.reason }));
    const kept = Object.entries(readInvalid())
      .filter(([id, entry]) => id !== batchId && entry && Array.isArray(entry.rows))
      .sort((a, b) => (b[1].time || 0) - (a[1].time || 0))
      .slice(0, INVALID_KEPT - 1);
    try {
      window.localStorage.setItem(INVALID_KEY, JSON.stringify(Object.fromEntries(
        [[batchId, { rows, time: Date.now() / 1000 }], ...kept])));
    } catch (error) {
      // Storage full or disabled: a reload then points at the results file instead of listing the lines.
    }
  }

  function storedInvalid(batchId) {
    const entry = readInvalid()[batchId];
    return entry && Array.isArray(entry.rows) ? entry.rows : null;
  }

  function renderInvalid(batch, rows) {
    const count = batch.invalid_lines || 0;
    invalidBox.hidden = count === 0;
    if (count === 0) return;
    invalidCount.textContent = "(" + number(count) + ")";
    const shown = (rows || []).slice(0, INVALID_SHOWN);
    invalidTable.hidden = shown.length === 0;
    invalidBody.replaceChildren(...shown.map((entry) =>
      h("tr", { "data-line": entry.line },
        h("th", { scope: "row" }, number(entry.line)),
        h("td", { class: "invalid-value" }, String(entry.value)),
        h("td", { class: "invalid-reason" }, reasonText(entry.reason)))));
    let note = "";
    if (shown.length === 0) note = t("invalid_elsewhere", { count: number(count) });
    else if (count > shown.length) note = t("invalid_more", { shown: number(shown.length), count: number(count) });
    invalidNote.textContent = note;
    invalidNote.hidden = !note;
  }

  // -- the cancel tokens of the batches started from this browser (the API shows them once) --------------

  function cancelKeys() {
    const keys = [];
    for (let index = 0; index < window.localStorage.length; index += 1) {
      const key = window.localStorage.key(index);
      if (key && key.startsWith(CANCEL_KEY_PREFIX)) keys.push(key);
    }
    return keys;
  }

  function readCancelEntry(key) {
    try {
      const entry = JSON.parse(window.localStorage.getItem(key) || "null");
      return entry && typeof entry.token === "string" ? entry : null;
    } catch (error) {
      return null;
    }
  }

  function rememberCancelToken(batchId, value) {
    if (typeof value !== "string" || !value) return;
    try {
      window.localStorage.setItem(CANCEL_KEY_PREFIX + batchId, JSON.stringify({ token: value, time: Date.now() / 1000 }));
      const older = cancelKeys()
        .map((key) => [key, (readCancelEntry(key) || {}).time || 0])
        .sort((a, b) => b[1] - a[1])
        .slice(CANCEL_KEPT);
      for (const [key] of older) window.localStorage.removeItem(key);
    } catch (error) {
      // Storage full or disabled: this page can still cancel the batch, a reload cannot.
    }
  }

  function storedCancelToken(batchId) {
    const entry = readCancelEntry(CANCEL_KEY_PREFIX + batchId);
    return entry ? entry.token : null;
  }

  function forgetCancelToken(batchId) {
    try {
      window.localStorage.removeItem(CANCEL_KEY_PREFIX + batchId);
    } catch (error) {
      // Storage disabled: nothing was kept.
    }
  }

  // -- loading and following a batch --------------------------------------------------------------------

  function stopFollowing() {
    generation += 1;
    if (events) events.close();
    events = null;
    window.clearTimeout(reloadTimer);
    return generation;
  }

  async function fetchStatus(batchId) {
    return fetch("/api/batches/" + encodeURIComponent(batchId), { headers: { Accept: "application/json" }, cache: "no-store" });
  }

  async function loadBatch(batchId) {
    const token = stopFollowing();
    let response;
    try {
      response = await fetchStatus(batchId);
    } catch (error) {
      if (token === generation) retryLater(batchId, token);
      return;
    }
    if (token !== generation) return;
    if (response.status === 404) {
      showBatchError(t("batch_expired"));
      setStream("closed");
      return;
    }
    if (!response.ok) {
      showBatchError(t("batch_load_failed", { status: response.status }));
      retryLater(batchId, token);
      return;
    }
    const batch = await response.json();
    if (token === generation) follow(batch, token, storedInvalid(batch.id), storedCancelToken(batch.id));
  }

  function retryLater(batchId, token) {
    setStream("lost");
    window.clearTimeout(reloadTimer);
    reloadTimer = window.setTimeout(() => { if (token === generation) loadBatch(batchId); }, RELOAD_DELAY_MS);
  }

  // Render the batch at once; follow its stream unless it has finished already.  `heldToken`: the batch's
  // cancel token when this browser started it (else null: no cancel button).
  function follow(batch, token, invalidRows, heldToken) {
    view = null;
    announcedAt = 0;
    announcedEnd = null;
    cancelToken = heldToken;
    batchMessage.hidden = true;
    renderInvalid(batch, invalidRows);
    render(batch);
    if (isFinished(batch)) {
      forgetCancelToken(batch.id); // nothing is left to cancel
      setStream("closed");
      return;
    }
    openStream(batch.links.events, batch.id, token);
  }

  function openStream(url, batchId, token) {
    const { stream, on } = window.Dom.eventStream(url, () => token === generation, setStream);
    events = stream;
    on("snapshot", (batch) => {
      render(batch);
      if (isFinished(batch)) finish(stream);
    });
    on("progress", render);
    on("complete", (batch) => {
      render(batch);
      finish(stream);
    });
    stream.addEventListener("error", () => {
      if (token !== generation) return;
      // A dropped connection: the browser reconnects with Last-Event-ID and the server replays what was missed.
      if (stream.readyState === EventSource.CONNECTING) setStream("reconnecting");
      else if (stream.readyState === EventSource.CLOSED) retryLater(batchId, token);
    });
  }

  function finish(stream) {
    stream.close(); // the server ends the stream after `complete`; without this the browser would reconnect
    if (events === stream) events = null;
    if (view) forgetCancelToken(view.id); // nothing is left to cancel
    setStream("closed");
  }

  function setStream(state) {
    streamStatus.dataset.state = state;
    streamStatus.textContent = state === "idle" ? "" : t("stream_" + state);
  }

  function showBatchError(text) {
    panel.hidden = false;
    batchMessage.textContent = text;
    batchMessage.hidden = false;
  }

  // -- rendering a batch (idempotent: the same status renders the same page, however often) -------------

  // running, complete, cancelled, or cancelling (cancelled while the identifiers in flight still finish).
  function stateOf(batch) {
    if (batch.status === "cancelled" && !isFinished(batch)) return "cancelling";
    return batch.status;
  }

  // An event older than what is shown (a replay after a reconnect) never moves the page backwards.
  function isOlder(batch) {
    if (!view || view.id !== batch.id) return false;
    if (isFinished(view)) return !isFinished(batch);
    if (view.status !== "running" && batch.status === "running") return true;
    return batch.status === view.status && batch.done < view.done;
  }

  function render(batch) {
    if (!batch || typeof batch.total !== "number" || !batch.counts || isOlder(batch)) return;
    view = batch;
    panel.hidden = false;
    const state = stateOf(batch);
    const finished = isFinished(batch);
    nameBox.textContent = batch.name || "";
    statusChip.dataset.status = state;
    statusChip.textContent = t("batch_status_" + state);
    startedBox.textContent = typeof batch.created_at === "number" ? t("batch_started_at", { time: startedAt(batch.created_at) }) : "";
    csvLink.href = batch.links.results + "?format=csv";
    jsonlLink.href = batch.links.results + "?format=jsonl";
    cancelButton.hidden = batch.status !== "running" || finished || !cancelToken;

    const total = batch.total;
    const done = Math.min(batch.done, total);
    const ratio = total > 0 ? done / total : finished ? 1 : 0;
    progress.max = Math.max(total, 1);
    progress.value = total > 0 ? done : ratio;
    // Rounded down: 100% only once every identifier has settled.
    const percent = formatNumber(Math.floor(ratio * 100) / 100, { style: "percent" });
    const text = t("batch_progress", { done: number(done), total: number(total), percent });
    progress.setAttribute("aria-valuetext", text);
    progressText.textContent = text;

    for (const item of document.querySelectorAll("#batch-counts .state-count")) {
      const value = batch.counts[item.dataset.state] || 0;
      item.querySelector(".count-value").textContent = number(value);
      item.dataset.zero = value === 0 ? "true" : "false";
    }
    byId("batch-lines").textContent = number(batch.lines);
    byId("batch-total").textContent = number(total);
    byId("batch-duplicates").textContent = number(batch.duplicates);
    byId("batch-cached").textContent = number(batch.cached);
    byId("batch-invalid").textContent = number(batch.invalid_lines);
    byId("batch-eta").textContent = etaText(batch, state);
    byId("batch-throughput").textContent = throughputText(batch);
    byId("batch-rate-limit").textContent = !finished && isRateLimited(batch)
      ? "(" + t("rate_limit_pace", { rate: rateText(batch.rate_limit_per_second) }) + ")" : "";
    announceProgress(batch, state, text);
  }

  // The time alone for a batch started today; its date too for an older one (a link kept for days).
  function startedAt(epochSeconds) {
    const today = new Date().toDateString() === new Date(epochSeconds * 1000).toDateString();
    return today ? formatTime(epochSeconds) : formatDateTime(epochSeconds);
  }

  // "about 2 min": rounded the way a person would say it, never to the second.
  function etaText(batch, state) {
    if (isFinished(batch)) return t("eta_finished");
    if (state === "cancelling") return t("eta_cancelling");
    const seconds = batch.eta_seconds;
    if (typeof seconds !== "number") return t("eta_estimating");
    if (seconds < 10) return t("eta_few_seconds");
    if (seconds < 60) return t("eta_seconds", { seconds: number(Math.max(10, Math.round(seconds / 5) * 5)) });
    const minutes = Math.round(seconds / 60);
    if (minutes < 60) return t("eta_minutes", { minutes: number(minutes) });
    const hours = Math.floor(minutes / 60);
    return t("eta_hours", { hours: number(hours), minutes: number(minutes - hours * 60) });
  }

  // The sources' quotas are worth a note only when they are what sets the pace (or nothing was measured yet).
  function isRateLimited(batch) {
    const limit = batch.rate_limit_per_second;
    if (typeof limit !== "number" || limit <= 0) return false;
    const measured = batch.throughput_per_second;
    return typeof measured !== "number" || limit <= measured * 1.25;
  }

  function rateText(perSecond) {
    if (perSecond >= 1) return t("per_second", { value: formatNumber(perSecond, { maximumFractionDigits: 1 }) });
    return t("per_minute", { rate: formatNumber(perSecond * 60, { maximumFractionDigits: 1 }) });
  }

  // The measured pace while it runs; once finished, the batch's average (identifiers looked up, not cached).
  function throughputText(batch) {
    if (typeof batch.throughput_per_second === "number") return rateText(batch.throughput_per_second);
    if (!isFinished(batch)) return t("throughput_measuring");
    const lookedUp = batch.done - (batch.counts.cancelled || 0) - (batch.cached || 0);
    const seconds = batch.finished_at - batch.created_at;
    return lookedUp > 0 && seconds > 0 ? rateText(lookedUp / seconds) : "–";
  }

  function announceProgress(batch, state, text) {
    const now = Date.now();
    if (isFinished(batch)) {
      if (announcedEnd === batch.id) return;
      announcedEnd = batch.id;
      live.textContent = t("batch_finished",
        { status: t("batch_status_" + state), done: number(Math.min(batch.done, batch.total)), total: number(batch.total) });
      return;
    }
    if (now - announcedAt < ANNOUNCE_EVERY_MS) return;
    announcedAt = now;
    live.textContent = text;
  }

  // -- cancel ------------------------------------------------------------------------------------------

  cancelButton.addEventListener("click", async () => {
    if (!view || !cancelToken || !window.confirm(t("batch_cancel_confirm"))) return;
    const token = generation;
    const batchId = view.id;
    cancelButton.disabled = true;
    let response;
    let body = null;
    try {
      response = await fetch("/api/batches/" + encodeURIComponent(batchId), {
        method: "DELETE",
        headers: { Accept: "application/json", "X-Cancel-Token": cancelToken },
      });
      body = await response.json().catch(() => null);
    } catch (error) {
      if (token === generation) showBatchError(t("network_error"));
      return;
    } finally {
      cancelButton.disabled = false;
    }
    if (token !== generation) return;
    if (response.ok && body) {
      render(body);
      announce(t("batch_status_cancelling"));
    } else if (response.status === 409) {
      // Finished meanwhile: show how it ended (its stream says so too, a moment later).
      const latest = await fetchStatus(batchId).then((answer) => (answer.ok ? answer.json() : null)).catch(() => null);
      if (token === generation && latest) render(latest);
    } else if (response.status === 404) {
      showBatchError(t("batch_expired"));
    } else if (response.status === 403) {
      // The token kept here is not the batch's (storage edited, or another service's): it never will be.
      forgetCancelToken(batchId);
      cancelToken = null;
      render(view);
      showBatchError(t("batch_cancel_forbidden"));
    } else {
      showBatchError(t("batch_cancel_failed", { status: response.status }));
    }
  });

  if (app.dataset.batchId) loadBatch(app.dataset.batchId);
})();
