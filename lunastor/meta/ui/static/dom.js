import { SIZE_UNITS } from "./format.js";

// Building the page from data: elements and text nodes only, never HTML strings, so nothing
// a record holds (a volume name, a label) can become markup.

export function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [key, value] of Object.entries(attrs ?? {})) {
    if (value === undefined || value === null || value === false) continue;
    if (key.startsWith("on") && typeof value === "function") {
      el.addEventListener(key.slice(2), value);
    } else if (key === "class") {
      el.className = value;
    } else if (key === "value" || key === "checked") {
      el[key] = value;
    } else {
      el.setAttribute(key, value === true ? "" : String(value));
    }
  }
  append(el, children);
  return el;
}

export function append(el, children) {
  for (const child of [children].flat(Infinity)) {
    if (child === null || child === undefined || child === false) continue;
    el.append(child instanceof Node ? child : document.createTextNode(String(child)));
  }
  return el;
}

export function replace(el, ...children) {
  el.replaceChildren();
  return append(el, children);
}

export const badge = (text, kind = text) => h("span", { class: `badge ${kind}` }, text);

// A table that becomes a list of cards on a narrow screen (each cell labelled by its column).
export function table(columns, rows, { empty = "none", caption } = {}) {
  if (!rows.length) return h("p", { class: "empty" }, empty);
  return h(
    "div",
    { class: "table-wrap" },
    h(
      "table",
      { class: "cards" },
      caption ? h("caption", {}, caption) : null,
      h("thead", {}, h("tr", {}, columns.map((c) => (c.th ? c.th : h("th", { scope: "col" }, c.title))))),
      h(
        "tbody",
        {},
        rows.map((row) =>
          h(
            "tr",
            row.attrs ?? {},
            columns.map((c) => h("td", { "data-label": c.title }, c.cell(row.data ?? row))),
          ),
        ),
      ),
    ),
  );
}

// An action form: runs `submit(values)`, shows its problem body plainly, and stays usable.
export function actionForm({ label, fields, submit, notify, className = "action" }) {
  const error = h("p", { class: "problem", role: "alert", hidden: true });
  const button = h("button", { type: "submit" }, label);
  const form = h(
    "form",
    { class: className, "aria-label": label },
    fields,
    button,
    error,
  );
  form.addEventListener("submit", async (event) => {
    event.preventDefault();
    error.hidden = true;
    button.disabled = true;
    try {
      const message = await submit(Object.fromEntries(new FormData(form)));
      if (message) notify(message);
    } catch (err) {
      error.textContent = err.message;
      error.hidden = false;
    } finally {
      button.disabled = false;
    }
  });
  return form;
}

export const field = (label, input) => h("label", { class: "field" }, h("span", {}, label), input);

// A size as a number and a unit (fields `size` and `unit`; `sizeBytes` reads them back).
export function sizeField(label, value) {
  return field(
    label,
    h(
      "span",
      { class: "size" },
      h("input", { name: "size", type: "number", min: "1", step: "any", required: true, value }),
      h("select", { name: "unit", "aria-label": "unit" }, Object.keys(SIZE_UNITS).map((u) => h("option", { selected: u === "GiB" }, u))),
    ),
  );
}

// Bytes from a sizeField's values, rounded to whole 512-byte blocks (the API's unit).
export const sizeBytes = (f) => Math.round((Number(f.size) * SIZE_UNITS[f.unit]) / 512) * 512;

// Ask before an action that cannot be undone; resolves true when confirmed.
export function confirmAction(question, verb) {
  return new Promise((resolve) => {
    const dialog = h(
      "dialog",
      { class: "confirm" },
      h(
        "form",
        { method: "dialog" },
        h("p", {}, question),
        h(
          "div",
          { class: "buttons" },
          h("button", { value: "cancel", class: "quiet" }, "Cancel"),
          h("button", { value: "confirm", class: "danger" }, verb),
        ),
      ),
    );
    dialog.addEventListener("close", () => {
      dialog.remove();
      resolve(dialog.returnValue === "confirm");
    });
    document.body.append(dialog);
    dialog.showModal();
  });
}
