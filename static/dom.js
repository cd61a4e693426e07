// The page scripts' one DOM helper, shared by every page (loaded by base.html before the page's own scripts).
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

  window.Dom = { h };
})();
