// Volumes: a sortable, filterable list with each volume's health, the access points serving
// it and its exports; admins create volumes here.

import { api, get, listAll } from "../api.js";
import { actionForm, badge, field, h, replace, sizeBytes, sizeField, table } from "../dom.js";
import { bytes, when } from "../format.js";

const HEALTH_ORDER = { unavailable: 0, rebuilding: 1, degraded: 2, ok: 3, unknown: 4 };

const COLUMNS = [
  { key: "name", title: "Name", sort: (v) => v.name, cell: (v) => h("a", { href: `#/volumes/${v.id}` }, v.name) },
  { key: "size", title: "Size", sort: (v) => v.size_bytes, cell: (v) => bytes(v.size_bytes) },
  { key: "replicas", title: "Replicas", sort: (v) => v.replicas, cell: (v) => String(v.replicas) },
  {
    key: "health",
    title: "Health",
    sort: (v) => HEALTH_ORDER[v.health] ?? 9,
    cell: (v) => h("span", { title: v.health_detail ?? "" }, badge(v.health)),
  },
  {
    key: "served",
    title: "Served by",
    sort: (v) => v.served_by.join(","),
    cell: (v) => (v.served_by.length ? v.served_by.join(", ") : h("span", { class: "muted" }, "no session")),
  },
  { key: "exports", title: "Exports", sort: (v) => v.exports, cell: (v) => String(v.exports) },
  { key: "lun", title: "Target / LUN", sort: (v) => `${v.target_iqn}/${String(v.lun).padStart(3, "0")}`, cell: (v) => h("small", {}, `${v.target_iqn.split(":").pop()} / ${v.lun}`) },
  { key: "created", title: "Created", sort: (v) => v.created_at, cell: (v) => when(v.created_at) },
];

function matches(v, text) {
  if (!text) return true;
  const hay = [v.name, v.id, v.health, ...v.served_by, ...Object.entries(v.labels).map(([k, x]) => `${k}=${x}`)];
  return hay.some((s) => s.toLowerCase().includes(text));
}

export function createForm(ctx) {
  return actionForm({
    label: "Create volume",
    notify: ctx.notify,
    fields: [
      field("Name", h("input", { name: "name", required: true, pattern: "[A-Za-z0-9][A-Za-z0-9._\\-]{0,127}", placeholder: "db-1" })),
      sizeField("Size", "1"),
      field("Replicas", h("input", { name: "replicas", type: "number", min: "1", max: "5", value: "3", required: true })),
    ],
    submit: async (f) => {
      const vol = await api("POST", "/v1/volumes", { name: f.name, size_bytes: sizeBytes(f), replicas: Number(f.replicas) });
      ctx.refresh();
      return `volume ${vol.name} (${vol.id}, ${bytes(vol.size_bytes)}) created`;
    },
  });
}

export default {
  title: "Volumes",
  mount(root, ctx) {
    const state = { sort: "name", desc: false, text: "", health: "" };
    let rows = [];
    const list = h("div", { class: "volume-list" });
    const count = h("span", { class: "muted" });
    const filter = h("input", {
      type: "search",
      placeholder: "filter by name, id, label, server",
      "aria-label": "filter",
      oninput: (e) => {
        state.text = e.target.value.trim().toLowerCase();
        draw();
      },
    });
    const health = h(
      "select",
      {
        "aria-label": "health",
        onchange: (e) => {
          state.health = e.target.value;
          draw();
        },
      },
      h("option", { value: "" }, "any health"),
      Object.keys(HEALTH_ORDER).slice(0, 4).map((x) => h("option", { value: x }, x)),
    );
    // on a phone the table's header row is hidden: sort from here instead
    const sortBy = h(
      "select",
      {
        class: "sort-by",
        "aria-label": "sort by",
        onchange: (e) => {
          state.sort = e.target.value;
          state.desc = false;
          draw();
        },
      },
      COLUMNS.map((c) => h("option", { value: c.key }, `sort by ${c.title.toLowerCase()}`)),
    );
    replace(
      root,
      h("h1", {}, "Volumes"),
      ctx.can("createVolume") ? createForm(ctx) : null,
      h("div", { class: "filters" }, filter, health, sortBy, count),
      list,
    );

    function header(col) {
      const active = state.sort === col.key;
      return h(
        "th",
        { scope: "col", "aria-sort": active ? (state.desc ? "descending" : "ascending") : "none" },
        h(
          "button",
          {
            type: "button",
            class: "sort",
            "data-sort": col.key,
            onclick: () => {
              state.desc = active ? !state.desc : false;
              state.sort = col.key;
              draw();
            },
          },
          col.title,
          active ? (state.desc ? " ▾" : " ▴") : "",
        ),
      );
    }

    function draw() {
      const col = COLUMNS.find((c) => c.key === state.sort);
      const shown = rows
        .filter((v) => matches(v, state.text) && (!state.health || v.health === state.health))
        .sort((a, b) => {
          const x = col.sort(a);
          const y = col.sort(b);
          const order = x < y ? -1 : x > y ? 1 : a.name.localeCompare(b.name);
          return state.desc ? -order : order;
        });
      count.textContent = `${shown.length} of ${rows.length} volumes`;
      replace(
        list,
        table(
          COLUMNS.map((c) => ({ ...c, th: header(c) })),
          shown.map((v) => ({ data: v, attrs: { "data-volume": v.name, "data-health": v.health } })),
          { empty: rows.length ? "no volume matches the filter" : "no volumes yet" },
        ),
      );
    }

    return {
      async refresh() {
        const [volumes, status] = await Promise.all([listAll("/v1/volumes?limit=1000"), get("/v1/volume-status")]);
        const byId = Object.fromEntries(status.items.map((s) => [s.volume_id, s]));
        rows = volumes.map((v) => ({ served_by: [], exports: 0, health: "unknown", ...v, ...byId[v.id] }));
        draw();
      },
    };
  },
};
