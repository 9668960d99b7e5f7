// A small live line chart in SVG: the last `points` readings of a few series.

import { h } from "./dom.js";

const SVG = "http://www.w3.org/2000/svg";
const W = 300;
const H = 100;

function svg(tag, attrs) {
  const el = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs)) el.setAttribute(k, String(v));
  return el;
}

export class LineChart {
  // series: [{ name, kind }] where kind picks the CSS colour (read, write, p99 ...)
  constructor(title, series, format, points = 60) {
    this.series = series;
    this.format = format;
    this.points = points;
    this.data = series.map(() => []);
    this.lines = series.map((s) => svg("polyline", { class: `line ${s.kind}`, points: "" }));
    this.values = series.map((s) => h("span", { class: `value ${s.kind}` }, "—"));
    this.max = h("span", { class: "max" }, "");
    const plot = svg("svg", { viewBox: `0 0 ${W} ${H}`, preserveAspectRatio: "none", role: "img" });
    plot.setAttribute("aria-label", title);
    plot.append(svg("line", { class: "axis", x1: 0, y1: H, x2: W, y2: H }), ...this.lines);
    this.el = h(
      "figure",
      { class: "chart", "data-chart": title },
      h(
        "figcaption",
        {},
        h("strong", {}, title),
        series.map((s, i) => h("span", { class: "legend" }, `${s.name} `, this.values[i])),
      ),
      h("div", { class: "plot" }, this.max, plot),
    );
  }

  // One reading; a null value leaves a gap (no data for that interval).
  push(values) {
    values.forEach((v, i) => {
      const d = this.data[i];
      d.push(v);
      if (d.length > this.points) d.shift();
      this.values[i].textContent = v === null ? "—" : this.format(v);
    });
    this.draw();
  }

  draw() {
    const top = Math.max(1e-9, ...this.data.flat().filter((v) => v !== null));
    this.max.textContent = this.format(top);
    // fills from the left, then scrolls: the newest reading is always the rightmost
    const step = W / (this.points - 1);
    this.data.forEach((d, i) => {
      const pts = d
        .map((v, j) => (v === null ? null : `${(j * step).toFixed(1)},${(H - (v / top) * (H - 4)).toFixed(1)}`))
        .filter((p) => p !== null);
      this.lines[i].setAttribute("points", pts.join(" "));
    });
    this.el.dataset.samples = String(this.data[0].length);
  }
}
