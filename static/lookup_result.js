// A lookup's merged result and its cross-checks as DOM, for the lookup page (lookup.js drives it).
// Every value from the API or an upstream goes in as text (text nodes), never as HTML.
(function () {
  "use strict";
  const { t, formatNumber, formatDate } = window.I18n;
  const Identifiers = window.Identifiers;
  const resultBox = document.getElementById("result");
  const checksList = document.getElementById("checks");

  // -- DOM helpers -------------------------------------------------------------------------------------

  const { h } = window.Dom;

  const isBlank = (value) => value === null || value === undefined || value === "" ||
    (Array.isArray(value) && value.length === 0);
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

  window.LookupResult = { h, isBlank, renderResult, renderChecks };
})();
