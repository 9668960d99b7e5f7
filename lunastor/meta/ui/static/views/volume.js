// One volume: its properties, health and extents' replica placement, the sessions serving
// it, exports, snapshots and clones, live IO charts; admins expand, snapshot, publish,
// unpublish and delete here.

import { api, get, listAll } from "../api.js";
import { actionForm, badge, confirmAction, field, h, replace, sizeBytes, sizeField, table } from "../dom.js";
import { bytes, rate, when } from "../format.js";
import { LineChart } from "../chart.js";
import { rates } from "../metrics.js";

const MAX_EXTENTS_SHOWN = 256;
const ms = (s) => `${(s * 1000).toFixed(s < 0.01 ? 2 : 1)} ms`;

function properties(v) {
  const rows = [
    ["ID", h("code", {}, v.id)],
    ["Size", bytes(v.size_bytes)],
    ["Replicas", String(v.replicas)],
    ["Block size", `${v.block_size} B`],
    ["Target", h("code", {}, v.target_iqn)],
    ["LUN", String(v.lun)],
    ["Labels", Object.entries(v.labels).map(([k, x]) => `${k}=${x}`).join(", ") || "—"],
    ["Source", v.source ? Object.entries(v.source).map(([k, x]) => h("span", {}, `${k} `, k === "volume_id" ? h("a", { href: `#/volumes/${x}` }, x) : x)) : "—"],
    ["Created", when(v.created_at)],
  ];
  return h("dl", { class: "props" }, rows.map(([k, x]) => [h("dt", {}, k), h("dd", {}, x)]));
}

function extentMap(status) {
  const list = status.extent_map;
  const size = status.extent_size ? ` of ${bytes(status.extent_size)}` : "";
  return [
    h("h2", {}, "Extents"),
    h("p", { class: "muted" }, `${list.length} allocated extents${size}; the first replica is the primary.`),
    table(
      [
        { title: "Extent", cell: (e) => String(e.index) },
        { title: "Health", cell: (e) => badge(e.health) },
        { title: "Generation", cell: (e) => String(e.gen) + (e.converging ? " (converging)" : "") },
        {
          title: "Replicas",
          cell: (e) =>
            h(
              "span",
              { class: "replicas" },
              e.replicas.map((r, i) =>
                h("span", { class: `replica ${r.state}`, title: `${r.state}, zone ${r.zone}` }, i === 0 ? "★ " : "", r.chunk_id),
              ),
            ),
        },
      ],
      list.slice(0, MAX_EXTENTS_SHOWN).map((e) => ({ data: e, attrs: { "data-extent": e.index, "data-health": e.health } })),
      { empty: "no data written yet: a thin volume allocates extents on first write" },
    ),
    list.length > MAX_EXTENTS_SHOWN ? h("p", { class: "muted" }, `and ${list.length - MAX_EXTENTS_SHOWN} more`) : null,
  ];
}

export default {
  title: "Volume",
  mount(root, ctx, id) {
    const charts = {
      iops: new LineChart("IOPS", [{ name: "read", kind: "read" }, { name: "write", kind: "write" }], (v) => rate(v, "/s")),
      throughput: new LineChart("Throughput", [{ name: "read", kind: "read" }, { name: "write", kind: "write" }], (v) => `${bytes(v)}/s`),
      latency: new LineChart(
        "Latency",
        [{ name: "read", kind: "read" }, { name: "write", kind: "write" }, { name: "p99", kind: "p99" }],
        ms,
      ),
    };
    const head = h("div", { class: "volume-head" });
    const props = h("div", {});
    const live = h("div", {});
    const exportsBox = h("div", {});
    const related = h("div", {});
    const extents = h("div", {});
    const apBox = h("p", { class: "muted access-points" });
    let volume = null;
    let previous = null;
    let gone = false;

    async function act(what, call) {
      try {
        await call();
        ctx.notify(what);
      } catch (err) {
        ctx.notify(`${err.message}`, "error");
      }
      ctx.refresh();
    }

    const path = `/v1/volumes/${encodeURIComponent(id)}`;
    const actions = [];
    if (ctx.can("expandVolume")) {
      actions.push(
        actionForm({
          label: "Expand",
          notify: ctx.notify,
          fields: [sizeField("New size")],
          submit: async (f) => {
            const v = await api("POST", `${path}/expand`, { size_bytes: sizeBytes(f) });
            ctx.refresh();
            return `${v.name} is ${bytes(v.size_bytes)} now`;
          },
        }),
      );
    }
    if (ctx.can("createSnapshot")) {
      actions.push(
        actionForm({
          label: "Snapshot",
          notify: ctx.notify,
          fields: [field("Snapshot name", h("input", { name: "name", required: true }))],
          submit: async (f) => {
            const s = await api("POST", "/v1/snapshots", { name: f.name, volume_id: id });
            ctx.refresh();
            return `snapshot ${s.name} (${s.id}) taken`;
          },
        }),
      );
    }
    if (ctx.can("addExport")) {
      actions.push(
        actionForm({
          label: "Publish",
          notify: ctx.notify,
          fields: [field("Initiator IQN", h("input", { name: "initiator", required: true, placeholder: "iqn.1994-05.com.redhat:node1" }))],
          submit: async (f) => {
            const e = await api("POST", `${path}/exports`, { initiator: f.initiator.trim() });
            ctx.refresh();
            return `published to ${e.initiator}: portal ${e.portal}, ${e.target_iqn} LUN ${e.lun}`;
          },
        }),
      );
    }
    if (ctx.can("deleteVolume")) {
      const force = h("input", { type: "checkbox", name: "force" });
      actions.push(
        actionForm({
          label: "Delete",
          className: "action danger",
          notify: ctx.notify,
          fields: [h("label", { class: "check" }, force, " even if exported")],
          submit: async () => {
            if (!(await confirmAction(`Delete ${volume?.name ?? id} and all its data?`, "Delete"))) return null;
            await api("DELETE", `${path}${force.checked ? "?force=true" : ""}`);
            gone = true;
            ctx.go("#/volumes");
            return `volume ${volume?.name ?? id} deleted`;
          },
        }),
      );
    }

    replace(
      root,
      h("p", {}, h("a", { href: "#/volumes" }, "← Volumes")),
      head,
      h("div", { class: "columns" }, props, actions.length ? h("div", { class: "actions" }, h("h2", {}, "Actions"), actions) : null),
      h("h2", {}, "IO now"),
      h("div", { class: "charts" }, charts.iops.el, charts.throughput.el, charts.latency.el),
      apBox,
      live,
      exportsBox,
      related,
      extents,
    );

    function unpublish(initiator) {
      return async () => {
        if (!(await confirmAction(`Hide ${volume.name} from ${initiator}? Its sessions lose the LUN.`, "Unpublish"))) return;
        act(`unpublished from ${initiator}`, () => api("DELETE", `${path}/exports/${encodeURIComponent(initiator)}`));
      };
    }

    function metricsUpdate(m) {
      const r = previous ? rates(previous, m) : null;
      previous = m;
      const reach = m.access_points.map((a) => `${a.chunk_id}${a.reachable ? "" : " (unreachable)"}`).join(", ");
      apBox.textContent = `Read from the access points' metrics: ${reach || "no chunk server up"}`;
      if (!r) return;
      charts.iops.push([r.read.iops, r.write.iops]);
      charts.throughput.push([r.read.bps, r.write.bps]);
      charts.latency.push([r.read.latency, r.write.latency, r.p99]);
    }

    return {
      async refresh() {
        if (gone) return;
        const [v, status, exports, snaps, m, all] = await Promise.all([
          get(path),
          get(`${path}/status`),
          get(`${path}/exports`),
          listAll(`/v1/snapshots?limit=1000&volume_id=${encodeURIComponent(id)}`),
          get(`${path}/metrics`),
          listAll("/v1/volumes?limit=1000"),
        ]);
        volume = v;
        replace(
          head,
          h("h1", {}, v.name, " ", h("span", { class: "health", "data-health": status.health }, badge(status.health))),
          h("p", { class: "detail" }, status.health_detail),
        );
        replace(props, properties(v));
        metricsUpdate(m);
        replace(
          live,
          h("h2", {}, "Served by"),
          table(
            [
              { title: "Access point", cell: (s) => s.chunk_id },
              { title: "Initiator", cell: (s) => h("code", {}, s.initiator) },
            ],
            status.served_by,
            { empty: "no iSCSI session sees this volume now" },
          ),
        );
        const exportCols = [
          { title: "Initiator", cell: (e) => h("code", {}, e.initiator) },
          { title: "Portal", cell: (e) => e.portal },
          { title: "Target / LUN", cell: (e) => `${e.target_iqn} / ${e.lun}` },
        ];
        if (ctx.can("removeExport")) {
          exportCols.push({
            title: "Actions",
            cell: (e) => h("button", { type: "button", class: "small", "data-action": "unpublish", onclick: unpublish(e.initiator) }, "Unpublish"),
          });
        }
        replace(exportsBox, h("h2", {}, "Exports"), table(exportCols, exports.items, { empty: "not exported: no initiator sees it" }));
        const snapIds = new Set(snaps.map((s) => s.id));
        const clones = all.filter((x) => x.source && (x.source.volume_id === id || snapIds.has(x.source.snapshot_id)));
        replace(
          related,
          h("h2", {}, "Snapshots"),
          table(
            [
              { title: "Name", cell: (s) => s.name },
              { title: "ID", cell: (s) => h("code", {}, s.id) },
              { title: "Size", cell: (s) => bytes(s.size_bytes) },
              { title: "Taken", cell: (s) => when(s.created_at) },
            ],
            snaps,
            { empty: "no snapshots" },
          ),
          h("h2", {}, "Clones"),
          table(
            [
              { title: "Name", cell: (c) => h("a", { href: `#/volumes/${c.id}` }, c.name) },
              { title: "From", cell: (c) => (c.source.volume_id ? "this volume" : `snapshot ${c.source.snapshot_id}`) },
              { title: "Size", cell: (c) => bytes(c.size_bytes) },
            ],
            clones,
            { empty: "no clones" },
          ),
        );
        replace(extents, extentMap(status));
      },
    };
  },
};
