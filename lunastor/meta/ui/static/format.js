// Numbers as people read them.

const UNITS = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];

export function bytes(n) {
  if (n === null || n === undefined) return "—";
  let i = 0;
  let v = Number(n);
  while (Math.abs(v) >= 1024 && i < UNITS.length - 1) {
    v /= 1024;
    i += 1;
  }
  return `${v >= 100 || i === 0 ? v.toFixed(0) : v.toFixed(1)} ${UNITS[i]}`;
}

export const SIZE_UNITS = { MiB: 2 ** 20, GiB: 2 ** 30, TiB: 2 ** 40 };

export const percent = (f) => `${(100 * f).toFixed(f > 0 && f < 0.1 ? 1 : 0)}%`;

export function duration(seconds) {
  if (!Number.isFinite(seconds) || seconds < 0) return "—";
  if (seconds < 60) return `${Math.round(seconds)} s`;
  if (seconds < 3600) return `${Math.floor(seconds / 60)} min ${Math.round(seconds % 60)} s`;
  return `${Math.floor(seconds / 3600)} h ${Math.round((seconds % 3600) / 60)} min`;
}

export function when(epochSeconds) {
  if (!epochSeconds) return "—";
  return new Date(epochSeconds * 1000).toLocaleString();
}

export function ago(epochSeconds) {
  if (!epochSeconds) return "—";
  return `${duration(Date.now() / 1000 - epochSeconds)} ago`;
}

export const rate = (v, unit) => `${v >= 100 ? v.toFixed(0) : v.toFixed(1)} ${unit}`;
