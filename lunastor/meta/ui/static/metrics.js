// Rates from two cumulative readings of GET /v1/volumes/{id}/metrics.

const OPS = ["read", "write"];

// The latency under which `q` of the commands between the readings finished, in seconds,
// interpolated inside the histogram bucket it falls in (as Prometheus's histogram_quantile).
export function quantile(q, before, after) {
  const bounds = new Map();
  for (const op of OPS) {
    const prev = new Map(before[op].buckets);
    for (const [le, n] of after[op].buckets) bounds.set(le, (bounds.get(le) ?? 0) + n - (prev.get(le) ?? 0));
  }
  const total = OPS.reduce((s, op) => s + after[op].ops - before[op].ops, 0);
  if (total <= 0) return null;
  const rank = q * total;
  let lower = 0;
  let below = 0;
  for (const [le, n] of [...bounds.entries()].sort((a, b) => a[0] - b[0])) {
    if (n >= rank) return lower + ((le - lower) * (rank - below)) / Math.max(n - below, 1e-9);
    lower = le;
    below = n;
  }
  return lower; // beyond the last bound
}

// IOPS, bytes/s and mean latency per operation, and p99 over both; null when the readings
// cannot be compared (a counter went back: an access point restarted or did not answer).
export function rates(before, after) {
  const dt = after.at - before.at;
  if (dt <= 0) return null;
  const out = {};
  for (const op of OPS) {
    const ops = after[op].ops - before[op].ops;
    const bytes = after[op].bytes - before[op].bytes;
    if (ops < 0 || bytes < 0) return null;
    out[op] = { iops: ops / dt, bps: bytes / dt, latency: ops ? (after[op].seconds - before[op].seconds) / ops : null };
  }
  out.p99 = quantile(0.99, before, after);
  return out;
}
