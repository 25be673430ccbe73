// clstr dashboard: draws the snapshots the server streams (GET /events).
// Node ids and messages come from the cluster: they go in as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const STATE_LABELS = {
  ok: "healthy", degraded: "degraded", connecting: "connecting", unreachable: "NATS unreachable",
  reconnecting: "reconnecting", empty: "no nodes", offline: "dashboard server unreachable",
};
let last = null;

function fmtRate(v) {
  if (v === null || v === undefined) return "–";
  return v >= 100 ? v.toFixed(0) : v >= 10 ? v.toFixed(1) : v.toFixed(2);
}
function fmtMs(v) {
  if (v === null || v === undefined) return "–";
  return (v >= 100 ? v.toFixed(0) : v >= 1 ? v.toFixed(1) : v.toFixed(2)) + " ms";
}
function fmtInt(v) { return v === null || v === undefined ? "–" : String(v); }
function fmtUptime(s) {
  if (s === null || s === undefined) return "–";
  s = Math.floor(s);
  if (s < 60) return s + "s";
  if (s < 3600) return Math.floor(s / 60) + "m" + String(s % 60).padStart(2, "0") + "s";
  if (s < 86400) return Math.floor(s / 3600) + "h" + String(Math.floor(s % 3600 / 60)).padStart(2, "0") + "m";
  return Math.floor(s / 86400) + "d" + String(Math.floor(s % 86400 / 3600)).padStart(2, "0") + "h";
}
function el(tag, text, cls) {
  const e = document.createElement(tag);
  if (text !== undefined) e.textContent = text;
  if (cls) e.className = cls;
  return e;
}

function setState(state, label) {
  const pill = $("state");
  pill.dataset.state = state;
  $("state-label").textContent = label || STATE_LABELS[state] || state;
}

function renderHeader(s) {
  const membership = s.membership === "kv" ? "membership: KV buckets"
    : s.membership === "discovery" ? "membership: static (from discovery)" : "membership: unknown";
  $("cluster").textContent =
    `prefix '${s.prefix}' · service '${s.service_name}' · ${s.num_shards} shards · ${membership} · ${s.nats_url}`;
  setState(s.state);
  const banner = $("banner");
  banner.hidden = s.state === "ok";
  banner.textContent = s.message;
  banner.className = ["unreachable", "empty", "reconnecting"].includes(s.state) ? "bad" : "";
  const notes = $("notes");
  notes.replaceChildren(...s.notes.map((n) => el("li", n)));
}

function renderCards(s) {
  const sum = s.summary;
  $("owned").textContent = `${sum.owned}/${s.num_shards}`;
  const parts = [];
  if (sum.moving) parts.push(`${sum.moving} moving`);
  if (sum.silent) parts.push(`${sum.silent} on silent nodes`);
  if (sum.unowned) parts.push(`${sum.unowned} without owner`);
  $("owned-detail").textContent = parts.join(" · ") || "every shard has its owner";
  $("node-count").textContent = String(sum.answering);
  $("node-detail").textContent = sum.members === null
    ? `${sum.nodes} known, ${sum.answering} answering`
    : `${sum.members} members, ${sum.answering} answering`;
  $("rate").textContent = fmtRate(sum.rate);
  const pct = sum.rate ? ` (${(100 * sum.error_rate / sum.rate).toFixed(1)} %)` : "";
  $("errors").textContent = fmtRate(sum.error_rate) + (sum.error_rate ? pct : "");
  $("chart-rate").innerHTML = s.charts.rate;      // SVG drawn by the server from numbers
  $("chart-errors").innerHTML = s.charts.errors;
}

function renderMap(s, colors) {
  const map = $("shard-map");
  const n = s.shards.length;
  if (map.children.length !== n) {
    const cols = n <= 64 ? 16 : n <= 256 ? 32 : 64;
    map.style.setProperty("--cols", String(cols));
    map.classList.toggle("dense", n > 256);
    map.replaceChildren(...s.shards.map((_, i) => {
      const cell = el("div", String(i), "shard");
      cell.setAttribute("role", "listitem");
      cell.dataset.shard = String(i);
      return cell;
    }));
  }
  s.shards.forEach((shard, i) => {
    const cell = map.children[i];
    cell.dataset.state = shard.state;
    if (shard.owner === null) delete cell.dataset.owner; else cell.dataset.owner = shard.owner;
    cell.style.backgroundColor = shard.owner === null ? "" : (colors[shard.owner] || "#64748b");
    cell.style.borderColor = shard.state === "moving" && shard.desired ? (colors[shard.desired] || "") : "";
    let title = `shard ${i}: ` + (shard.owner === null ? "no owner" : shard.owner);
    if (shard.state === "moving") title += shard.desired ? `, moving to ${shard.desired}` : ", moving";
    if (shard.state === "silent") title += " (not answering)";
    cell.title = title;
  });
  const counts = {};
  s.shards.forEach((sh) => { if (sh.owner !== null) counts[sh.owner] = (counts[sh.owner] || 0) + 1; });
  $("legend").replaceChildren(...s.nodes.map((node) => {
    const item = el("span");
    const sw = el("span", undefined, "swatch");
    sw.style.backgroundColor = node.color;
    item.append(sw, document.createTextNode(`${node.node_id} (${counts[node.node_id] || 0})`));
    return item;
  }));
}

function renderNodes(s) {
  const body = document.querySelector("#nodes tbody");
  body.replaceChildren(...s.nodes.map((node) => {
    const tr = el("tr");
    tr.dataset.node = node.node_id;
    tr.dataset.status = node.status;
    tr.dataset.answering = String(node.answering);
    const sw = el("span", undefined, "swatch");
    sw.style.backgroundColor = node.color;
    const first = el("td"); first.append(sw);
    const cells = [
      first, el("td", node.node_id),
      el("td", node.status, "status status-" + node.status.replace(/\s+/g, "-")),
      el("td", fmtInt(node.shards), "num"), el("td", fmtRate(node.rate), "num"),
      el("td", fmtInt(node.errors), "num"), el("td", fmtRate(node.error_rate), "num"),
      el("td", fmtInt(node.queued), "num"), el("td", fmtInt(node.running), "num"),
      el("td", fmtMs(node.p50_ms), "num"), el("td", fmtMs(node.p99_ms), "num"),
      el("td", fmtUptime(node.uptime), "num"), el("td", node.version || "–"),
    ];
    cells[1].title = node.host ? `host ${node.host}, weight ${node.weight}` : "";
    tr.append(...cells);
    return tr;
  }));
}

function renderEvents(s) {
  const list = $("events");
  if (!s.events.length) { list.replaceChildren(el("li", "nothing yet", "empty")); return; }
  list.replaceChildren(...s.events.map((ev) => {
    const li = el("li", undefined, "kind-" + ev.kind);
    const t = new Date(ev.t * 1000);
    const time = el("time", t.toLocaleTimeString([], { hour12: false }));
    time.dateTime = t.toISOString();
    li.append(time, el("span", ev.text, "text"));
    return li;
  }));
}

function render(s) {
  last = s;
  const colors = {};
  s.nodes.forEach((node) => { colors[node.node_id] = node.color; });
  renderHeader(s);
  renderCards(s);
  renderMap(s, colors);
  renderNodes(s);
  renderEvents(s);
  $("updated").textContent = "Updated " + new Date(s.updated * 1000).toLocaleTimeString([], { hour12: false }) + ".";
  document.body.dataset.link = "live";
}

function connect() {
  const source = new EventSource("events");
  source.onmessage = (event) => render(JSON.parse(event.data));
  source.onerror = () => {
    // EventSource retries by itself (every 2 s, the server's "retry").
    document.body.dataset.link = "lost";
    setState("offline");
    const banner = $("banner");
    banner.hidden = false;
    banner.className = "bad";
    banner.textContent = "Lost the dashboard server: is it still running? Retrying…" +
      (last ? " (what is shown is from " + new Date(last.updated * 1000).toLocaleTimeString([], { hour12: false }) + ")" : "");
  };
}

connect();
