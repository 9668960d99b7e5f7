// The dashboard shell: sign-in, the page router (#/cluster, #/volumes, #/volumes/<id>,
// #/operations) and live updates by polling the REST API (EventSource cannot send an
// Authorization header, and a token never goes into a URL).

import { ApiError, get, token } from "./api.js";
import { h, replace } from "./dom.js";
import cluster from "./views/cluster.js";
import operations from "./views/operations.js";
import volume from "./views/volume.js";
import volumes from "./views/volumes.js";

const POLL_MS = 2000;
const $ = (id) => document.getElementById(id);

const session = { role: null, may: new Set() };
let current = null; // { page, instance }
let timer = null;
let busy = false;
let again = false; // a refresh was asked for while one ran (a new page): run it after

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter(Boolean);
  if (parts[0] === "volumes" && parts[1]) return { page: "volume", view: volume, arg: decodeURIComponent(parts[1]) };
  if (parts[0] === "volumes") return { page: "volumes", view: volumes };
  if (parts[0] === "operations") return { page: "operations", view: operations };
  return { page: "cluster", view: cluster };
}

function notify(message, kind = "ok") {
  const box = $("notice");
  replace(box, h("span", {}, message), h("button", { type: "button", class: "quiet", onclick: () => (box.hidden = true) }, "dismiss"));
  box.className = `notice ${kind}`;
  box.hidden = false;
}

const ctx = {
  can: (operationId) => session.may.has(operationId),
  get role() {
    return session.role;
  },
  notify,
  refresh: () => refresh(),
  go: (hash) => {
    location.hash = hash;
  },
};

async function refresh() {
  if (!current) return;
  if (busy) {
    again = true;
    return;
  }
  busy = true;
  try {
    await current.instance.refresh();
    $("updated").textContent = `updated ${new Date().toLocaleTimeString()}`;
    $("updated").className = "";
  } catch (err) {
    if (err instanceof ApiError && err.status === 401) {
      signOut(err.message);
      return;
    }
    $("updated").textContent = `update failed: ${err.message}`;
    $("updated").className = "problem";
  } finally {
    busy = false;
    if (again) {
      again = false;
      refresh();
    }
  }
}

function show() {
  const r = route();
  const main = $("main");
  current?.instance.unmount?.();
  main.replaceChildren();
  for (const a of document.querySelectorAll("#nav a")) {
    const active = a.dataset.page === r.page || (r.page === "volume" && a.dataset.page === "volumes");
    if (active) a.setAttribute("aria-current", "page");
    else a.removeAttribute("aria-current");
  }
  const root = h("div", { class: "page", "data-page": r.page });
  main.append(root);
  current = { page: r.page, instance: r.view.mount(root, ctx, r.arg) };
  document.title = `lunastor · ${r.view.title}`;
  refresh();
}

function startPolling() {
  clearInterval(timer);
  timer = setInterval(() => {
    if (!document.hidden) refresh();
  }, POLL_MS);
}

async function signIn() {
  const who = await get("/v1/whoami");
  session.role = who.role;
  session.may = new Set(who.may);
  $("login").hidden = true;
  $("nav").hidden = false;
  $("signout").hidden = false;
  replace($("who"), "role ", h("span", { class: `badge role ${who.role}` }, who.role));
  $("who").hidden = false;
  document.body.dataset.role = who.role;
  show();
  startPolling();
}

function signOut(reason) {
  token.clear();
  clearInterval(timer);
  current?.instance.unmount?.();
  current = null;
  session.role = null;
  session.may = new Set();
  delete document.body.dataset.role;
  $("main").replaceChildren();
  $("nav").hidden = true;
  $("who").hidden = true;
  $("signout").hidden = true;
  $("notice").hidden = true;
  $("login").hidden = false;
  $("login-error").hidden = !reason;
  $("login-error").textContent = reason ?? "";
  $("token").value = "";
  $("token").focus();
}

$("login-form").addEventListener("submit", async (event) => {
  event.preventDefault();
  token.set($("token").value.trim());
  $("token").value = "";
  try {
    await signIn();
  } catch (err) {
    signOut(err.message);
  }
});
$("signout").addEventListener("click", () => signOut());
window.addEventListener("hashchange", () => {
  if (session.role) show();
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden) refresh();
});

if (token.get()) signIn().catch((err) => signOut(err.message));
else signOut();
