// The page scripts' DOM helpers (elements, event streams), shared by every page (loaded by base.html before the page's own scripts).
(function () {
  "use strict";

  // h("p", {class: "x", "data-state": "ok"}, "text", child): an element; strings become text nodes
  // (never HTML), and null, undefined or false attributes and children are left out.
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

  // An EventSource whose named events reach `on(type, apply)` parsed from JSON, and only while
  // isCurrent() (a newer lookup or batch on the page makes an older stream's events moot); a
  // malformed event is dropped.  `onState` hears "connecting", then "live" once it is open.
  function eventStream(url, isCurrent, onState) {
    const stream = new EventSource(url);
    onState("connecting");
    stream.addEventListener("open", () => { if (isCurrent()) onState("live"); });
    const on = (type, apply) => stream.addEventListener(type, (event) => {
      if (!isCurrent()) return;
      let data;
      try {
        data = JSON.parse(event.data);
      } catch (error) {
        return;
      }
      apply(data);
    });
    return { stream, on };
  }

  window.Dom = { h, eventStream };
})();
