// Plain lookup page: submit, then poll the lookup until it completes.
(function () {
  "use strict";
  const form = document.getElementById("lookup-form");
  const input = document.getElementById("identifier");
  const message = document.getElementById("message");
  const sourcesBox = document.getElementById("sources");
  const resultBox = document.getElementById("result");

  function show(text, isError) {
    message.textContent = text;
    message.className = isError ? "error" : "";
  }

  function render(lookup) {
    sourcesBox.replaceChildren();
    for (const [name, source] of Object.entries(lookup.sources)) {
      const card = document.createElement("div");
      card.className = "card";
      const title = document.createElement("h2");
      title.textContent = name;
      const state = document.createElement("span");
      state.className = "state " + source.state;
      state.textContent = source.state + (source.cached ? " (cached)" : "") + (source.stale ? " (stale)" : "");
      card.append(title, state);
      if (source.error) {
        const error = document.createElement("p");
        error.textContent = source.error;
        card.append(error);
      }
      sourcesBox.append(card);
    }
    show(`Lookup ${lookup.status}: ${lookup.progress.done} of ${lookup.progress.total} sources`, false);
    if (lookup.result || lookup.checks.length) {
      resultBox.hidden = false;
      resultBox.textContent = JSON.stringify({ result: lookup.result, checks: lookup.checks }, null, 2);
    }
  }

  async function poll(url) {
    for (;;) {
      const response = await fetch(url);
      if (!response.ok) { show("The lookup could not be read (" + response.status + ")", true); return; }
      const lookup = await response.json();
      render(lookup);
      if (lookup.status === "complete") return;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }

  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    resultBox.hidden = true;
    sourcesBox.replaceChildren();
    show("Looking up…", false);
    const response = await fetch("/api/lookups", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ identifier: input.value }),
    });
    const body = await response.json();
    if (!response.ok) { show(body.message || "The lookup failed", true); return; }
    render(body);
    if (body.status !== "complete") poll(body.links.self);
  });
})();
