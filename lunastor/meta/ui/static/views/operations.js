// Operations (rebuilds, drains, rebalances) with progress and an estimate of the time left,
// and the recent events.

import { get, listAll } from "../api.js";
import { badge, h, replace, table } from "../dom.js";
import { ago, duration, percent, when } from "../format.js";

// Time left if the operation keeps its average pace so far (from the server's timestamps).
export function eta(op) {
  if (op.state !== "running" || op.progress <= 0 || op.progress >= 1) return null;
  const elapsed = op.updated_at - op.created_at;
  return elapsed > 0 ? (elapsed * (1 - op.progress)) / op.progress : null;
}

function progress(op) {
  const left = eta(op);
  return h(
    "div",
    { class: "progress" },
    h("progress", { max: 1, value: op.progress, "aria-label": `${op.kind} ${op.subject}` }),
    h("span", {}, percent(op.progress), op.state === "running" ? ` · ${left === null ? "estimating" : `${duration(left)} left`}` : ""),
  );
}

export default {
  title: "Operations",
  mount(root) {
    const ops = h("div", {});
    const events = h("div", {});
    replace(root, h("h1", {}, "Operations"), ops, h("h2", {}, "Recent events"), events);
    return {
      async refresh() {
        const [items, recent] = await Promise.all([listAll("/v1/operations?limit=1000"), get("/v1/events?limit=100")]);
        items.sort((a, b) => (a.state === "running") - (b.state === "running") || a.created_at - b.created_at).reverse();
        replace(
          ops,
          table(
            [
              { title: "Operation", cell: (o) => h("span", {}, h("strong", {}, o.kind), " ", o.subject) },
              { title: "State", cell: (o) => badge(o.state) },
              { title: "Progress", cell: progress },
              { title: "Started", cell: (o) => when(o.created_at) },
              { title: "Detail", cell: (o) => o.detail },
            ],
            items.map((o) => ({ data: o, attrs: { "data-op": o.id, "data-kind": o.kind, "data-subject": o.subject, "data-state": o.state } })),
            { empty: "no operations" },
          ),
        );
        replace(
          events,
          table(
            [
              { title: "When", cell: (e) => h("span", { title: when(e.at) }, ago(e.at)) },
              { title: "Severity", cell: (e) => badge(e.severity) },
              { title: "Event", cell: (e) => h("span", { title: e.what }, h("strong", {}, e.kind.replaceAll("_", " ")), " ", h("small", {}, e.subject)) },
              { title: "Detail", cell: (e) => e.detail },
              { title: "From", cell: (e) => h("small", {}, e.source) },
            ],
            recent.items.map((e) => ({ data: e, attrs: { "data-event": e.kind } })),
            { empty: "nothing has happened yet" },
          ),
        );
      },
    };
  },
};
