// The REST API as the dashboard calls it: the token from sessionStorage as the Authorization
// header, JSON in and out, and every failure as an ApiError carrying the problem body.

const TOKEN_KEY = "lunastor.token";

export const token = {
  get: () => sessionStorage.getItem(TOKEN_KEY),
  set: (value) => sessionStorage.setItem(TOKEN_KEY, value),
  clear: () => sessionStorage.removeItem(TOKEN_KEY),
};

export class ApiError extends Error {
  constructor(status, problem, text) {
    const code = problem?.code ?? `http_${status}`;
    const detail = problem?.detail ?? (text || "no answer");
    super(`${status} ${code}: ${detail}`);
    this.status = status;
    this.code = code;
    this.detail = detail;
    this.problem = problem;
  }
}

export async function api(method, path, body) {
  const headers = { Accept: "application/json", Authorization: `Bearer ${token.get() ?? ""}` };
  const init = { method, headers, cache: "no-store" };
  if (body !== undefined) {
    headers["Content-Type"] = "application/json";
    init.body = JSON.stringify(body);
  }
  let resp;
  try {
    resp = await fetch(path, init);
  } catch (err) {
    throw new ApiError(0, { code: "unreachable", detail: `meta did not answer (${err.message})` });
  }
  if (resp.status === 204) return null;
  const text = await resp.text();
  let data = null;
  try {
    data = text ? JSON.parse(text) : null;
  } catch {
    data = null;
  }
  if (!resp.ok) throw new ApiError(resp.status, data, text);
  return data;
}

export const get = (path) => api("GET", path);

// Every page of a paginated listing (all pages read at the first page's etcd revision).
export async function listAll(path) {
  const items = [];
  const sep = path.includes("?") ? "&" : "?";
  let next = null;
  do {
    const page = await get(next ? `${path}${sep}next=${encodeURIComponent(next)}` : path);
    items.push(...page.items);
    next = page.next;
  } while (next);
  return items;
}
