// Cluster: chunk servers by zone (state, capacity, version), meta instances, the redirector
// leader and its VIP, etcd as meta sees it.

import { api, get } from "../api.js";
import { badge, confirmAction, h, replace, table } from "../dom.js";
import { ago, bytes, percent } from "../format.js";

// down wins; then the operator's intent (draining, drained) as soon as it is recorded
function stateOf(chunk, admin) {
  const state = admin?.state ?? chunk.state;
  return state === "down" ? state : (admin?.admin_state ?? state);
}

function capacity(c) {
  if (c.capacity === null || c.capacity === undefined) return h("span", { class: "muted" }, "unknown (down)");
  const used = c.capacity - c.free;
  return h(
    "div",
    { class: "capacity" },
    h("meter", { min: 0, max: c.capacity, value: used, high: c.capacity * 0.85, optimum: 0, title: percent(used / (c.capacity || 1)) }),
    h("span", {}, `${bytes(used)} of ${bytes(c.capacity)}`),
  );
}

function summary(data) {
  const { cluster, health } = data;
  const s = cluster?.summary;
  const used = s ? s.capacity - s.free : 0;
  const leader = cluster?.redirector_leader;
  const etcd = health.ok
    ? h("span", {}, badge("ok"), ` revision ${health.value.etcd_revision}`)
    : h("span", {}, badge("unavailable"), ` ${health.error.message}`);
  return h(
    "div",
    { class: "tiles" },
    h("div", { class: "tile", "data-tile": "chunks" }, h("h3", {}, "Chunk servers"), s ? `${s.chunk_servers_up} of ${s.chunk_servers} up` : "—"),
    h("div", { class: "tile", "data-tile": "capacity" }, h("h3", {}, "Capacity"), s ? `${bytes(used)} used of ${bytes(s.capacity)}` : "—"),
    h("div", { class: "tile", "data-tile": "etcd" }, h("h3", {}, "etcd"), etcd),
    h(
      "div",
      { class: "tile", "data-tile": "redirector" },
      h("h3", {}, "Redirector"),
      leader ? h("span", {}, `${leader.id} leads, VIP `, h("code", {}, leader.vip ?? "?")) : badge("no leader", "unavailable"),
    ),
    health.ok && health.value.problems.length
      ? h("div", { class: "tile wide problems" }, h("h3", {}, "Problems"), h("ul", {}, health.value.problems.map((p) => h("li", {}, p))))
      : null,
  );
}

export default {
  title: "Cluster",
  mount(root, ctx) {
    const body = h("div", {});
    replace(root, h("h1", {}, "Cluster"), body);

    async function drain(id) {
      if (!(await confirmAction(`Move every replica off ${id}? It takes no new data from now on.`, "Drain"))) return;
      try {
        const op = await api("POST", `/v1/chunks/${encodeURIComponent(id)}/drain`);
        ctx.notify(`drain of ${id} started (${op.id})`);
      } catch (err) {
        ctx.notify(`drain of ${id} failed: ${err.message}`, "error");
      }
      ctx.refresh();
    }

    function servers(cluster, chunks) {
      const admin = Object.fromEntries(chunks.map((c) => [c.id, c]));
      const zones = new Map();
      for (const c of cluster.chunk_servers) {
        if (!zones.has(c.zone)) zones.set(c.zone, []);
        zones.get(c.zone).push(c);
      }
      const columns = [
        { title: "Chunk server", cell: (c) => h("span", {}, h("strong", {}, c.id), h("br"), h("small", { class: "muted" }, c.portal)) },
        { title: "State", cell: (c) => badge(stateOf(c, admin[c.id])) },
        { title: "Capacity", cell: capacity },
        {
          title: "Data dirs",
          cell: (c) => {
            const failed = c.data_dirs.filter((d) => d.state === "failed").length;
            return failed ? badge(`${failed} of ${c.data_dirs.length} failed`, "degraded") : `${c.data_dirs.length}`;
          },
        },
        { title: "Version", cell: (c) => c.version ?? "—" },
        { title: "Started", cell: (c) => ago(c.started_at) },
      ];
      if (ctx.can("drainChunkServer")) {
        columns.push({
          title: "Actions",
          cell: (c) =>
            stateOf(c, admin[c.id]) === "up"
              ? h("button", { type: "button", class: "small", "data-action": "drain", onclick: () => drain(c.id) }, "Drain")
              : "",
        });
      }
      return [...zones.keys()].sort().map((zone) =>
        h(
          "section",
          { class: "zone", "data-zone": zone },
          h("h2", {}, `Zone ${zone}`),
          table(
            columns,
            zones.get(zone).map((c) => ({ data: c, attrs: { "data-chunk": c.id, "data-state": stateOf(c, admin[c.id]) } })),
          ),
        ),
      );
    }

    function daemons(cluster) {
      return h(
        "section",
        { class: "daemons" },
        h("h2", {}, "Meta instances"),
        table(
          [
            { title: "Instance", cell: (m) => m.id },
            { title: "API", cell: (m) => h("code", {}, m.api_url) },
            { title: "Version", cell: (m) => m.version },
            { title: "Started", cell: (m) => ago(m.started_at) },
          ],
          cluster.meta_instances,
        ),
        h("h2", {}, "Redirectors"),
        table(
          [
            { title: "Instance", cell: (r) => r.id },
            { title: "Role", cell: (r) => (r.leader ? badge("leader", "ok") : "standby") },
            { title: "VIP", cell: (r) => h("code", {}, r.vip) },
            { title: "Version", cell: (r) => r.version },
          ],
          cluster.redirectors,
        ),
      );
    }

    return {
      async refresh() {
        const [cluster, chunks, health] = await Promise.all([
          get("/v1/cluster"),
          get("/v1/chunks"),
          get("/v1/health").then(
            (value) => ({ ok: true, value }),
            (error) => ({ ok: false, error }),
          ),
        ]);
        replace(body, summary({ cluster, health }), servers(cluster, chunks.items), daemons(cluster));
      },
    };
  },
};
