// The page scripts' texts in the page's language (the #i18n JSON data block) and locale-aware formatting.
(function () {
  "use strict";
  let strings = {};
  try {
    strings = JSON.parse(document.getElementById("i18n").textContent);
  } catch (error) {
    strings = {};
  }
  const lang = document.documentElement.lang || "pt-BR";

  // t("progress", {done: 1, total: 3}): the text with its {placeholders} filled in (plain text, never HTML).
  function t(key, params) {
    const text = Object.prototype.hasOwnProperty.call(strings, key) ? strings[key] : key;
    if (!params) return text;
    return text.replace(/\{(\w+)\}/g, (match, name) =>
      Object.prototype.hasOwnProperty.call(params, name) ? String(params[name]) : match);
  }

  function formatTime(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleTimeString(lang);
  }

  function formatDateTime(epochSeconds) {
    return new Date(epochSeconds * 1000).toLocaleString(lang);
  }

  function formatNumber(value, options) {
    return new Intl.NumberFormat(lang, options).format(value);
  }

  function formatDuration(milliseconds) {
    if (milliseconds < 1000) return formatNumber(Math.round(milliseconds)) + " ms";
    return formatNumber(milliseconds / 1000, { maximumFractionDigits: 1 }) + " s";
  }

  // ISO date (YYYY-MM-DD) in the page's locale, without a time-zone shift.
  function formatDate(iso) {
    const match = /^(\d{4})-(\d{2})-(\d{2})$/.exec(String(iso));
    if (!match) return String(iso);
    const date = new Date(Date.UTC(Number(match[1]), Number(match[2]) - 1, Number(match[3])));
    return date.toLocaleDateString(lang, { timeZone: "UTC" });
  }

  // Polite screen-reader announcement through the page's aria-live region.
  function announce(text) {
    const region = document.getElementById("announcer");
    if (!region) return;
    region.textContent = "";
    window.setTimeout(() => { region.textContent = text; }, 30);
  }

  window.I18n = { t, lang, formatTime, formatDateTime, formatNumber, formatDuration, formatDate, announce };
})();
