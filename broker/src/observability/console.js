"use strict";
// The operator console (docs/CONSOLE.md). Loaded from the same origin as the page: its content
// security policy allows no inline script or style. Text goes through textContent, never HTML.

// What the page's content security policy refused, if anything (the browser test expects none).
window.consoleViolations = [];
document.addEventListener("securitypolicyviolation", e => window.consoleViolations.push(e.violatedDirective));

const SVG = "http://www.w3.org/2000/svg";
// Chart geometry, in the SVG's own units (the style sheet sets the displayed size).
const HEIGHT = 96, PAD_TOP = 12, PAD_BOTTOM = 14, PAD_LEFT = 4;
// Lines of the lag chart, one colour per subscription (cycled past the end).
const COLOURS = ["#1f6feb", "#d1242f", "#1a7f37", "#9a6700", "#8250df", "#0598bc", "#bf3989", "#57606a"];

function table(id, headers, rows) {
  const t = document.getElementById(id);
  t.replaceChildren();
  const head = t.insertRow();
  for (const h of headers) { const th = document.createElement("th"); th.textContent = h; head.append(th); }
  if (rows.length === 0) { const c = t.insertRow().insertCell(); c.colSpan = headers.length; c.textContent = "none"; c.className = "muted"; }
  for (const row of rows) {
    const tr = t.insertRow();
    for (const v of row) {
      const td = tr.insertCell();
      td.textContent = v === null || v === undefined ? "-" : String(v);
      if (typeof v === "number") td.className = "n";
    }
  }
}

function svgElement(name, attributes) {
  const e = document.createElementNS(SVG, name);
  for (const [k, v] of Object.entries(attributes)) e.setAttribute(k, String(v));
  return e;
}

// A readable number: 3 significant digits at most, no exponent.
function short(v) {
  if (v === null || v === undefined) return "-";
  if (Number.isInteger(v)) return String(v);
  const a = Math.abs(v);
  if (a >= 100) return v.toFixed(0);
  if (a >= 10) return v.toFixed(1);
  if (a >= 1) return v.toFixed(2);
  return v.toPrecision(2);
}

// A "nice" upper bound for the y axis: 1, 2 or 5 times a power of ten, at least `max`.
function ceiling(max) {
  if (!(max > 0)) return 1;
  const power = Math.pow(10, Math.floor(Math.log10(max)));
  for (const m of [1, 2, 5, 10]) if (m * power >= max) return m * power;
  return 10 * power;
}

// The SVG path of one series: points at their times, broken where a value is missing; a point
// with no neighbour is drawn as a short dash so that it shows.
function pathOf(times, values, x, y) {
  let d = "", run = 0;
  const end = () => { if (run === 1) d += "h2"; run = 0; };
  for (let i = 0; i < values.length; i++) {
    const v = values[i];
    if (v === null || v === undefined) { end(); continue; }
    d += (run > 0 ? "L" : "M") + x(times[i]).toFixed(1) + " " + y(v).toFixed(1);
    run++;
  }
  end();
  return d;
}

// Draws one chart into the figure `id`: a caption with the title and the latest value, an SVG
// with a light grid, the y range and the window on the axes, and one line per series.
// `lines` is [{ values, colour, label }]; `scale` turns stored values into shown ones.
function chart(id, title, unit, history, lines, wide) {
  const figure = document.getElementById(id);
  const width = wide ? 540 : 260;
  const times = history.times_us;
  const span = history.capacity * history.interval_s * 1e6;
  const end = times.length ? times[times.length - 1] : 0;
  let max = 0;
  for (const line of lines) for (const v of line.values) if (v !== null && v > max) max = v;
  const top = ceiling(max);
  const x = t => PAD_LEFT + (width - PAD_LEFT * 2) * (1 - (end - t) / span);
  const y = v => HEIGHT - PAD_BOTTOM - (HEIGHT - PAD_BOTTOM - PAD_TOP) * (v / top);

  const svg = svgElement("svg", { class: "chart" + (wide ? " wide" : ""), viewBox: `0 0 ${width} ${HEIGHT}`, role: "img" });
  svg.append(svgElement("title", {}));
  svg.firstChild.textContent = `${title}, last ${Math.round(span / 60e6)} minutes`;
  for (const v of [0, top / 2, top]) {
    svg.append(svgElement("line", { class: "grid", x1: 0, x2: width, y1: y(v), y2: y(v) }));
  }
  const label = (text, attributes) => { const t = svgElement("text", { class: "axis", ...attributes }); t.textContent = text; svg.append(t); };
  label(`${short(top)} ${unit}`, { x: PAD_LEFT, y: PAD_TOP - 2 });
  label(`-${Math.round(span / 60e6)} min`, { x: PAD_LEFT, y: HEIGHT - 2 });
  label("now", { x: width - PAD_LEFT, y: HEIGHT - 2, "text-anchor": "end" });
  lines.forEach((line, i) => {
    const path = svgElement("path", { class: "line", d: pathOf(times, line.values, x, y), "data-series": line.label });
    // Through the CSSOM: a stroke attribute would lose to the style sheet's, and a style
    // attribute is refused by the page's policy.
    if (line.colour) path.style.stroke = line.colour;
    svg.append(path);
  });

  const caption = document.createElement("figcaption");
  const name = document.createElement("span");
  name.textContent = title;
  const latest = document.createElement("span");
  latest.className = "now";
  // The latest point ("-" when it has none: no delivery in the last interval, for the p99).
  const last = lines.length === 1 ? lines[0].values[lines[0].values.length - 1] : undefined;
  latest.textContent = lines.length === 1 ? `${short(last)} ${unit}` : "";
  caption.append(name, latest);
  figure.replaceChildren(caption, svg);
  return figure;
}

function charts(h) {
  window.consoleHistory = h;
  document.getElementById("window").textContent =
    `(one point every ${h.interval_s} s, ${Math.round(h.capacity * h.interval_s / 60)} minutes kept)`;
  chart("chart-publish_rate", "publishes", "/s", h, [{ values: h.publish_rate, label: "publishes" }]);
  chart("chart-delivery_rate", "deliveries", "/s", h, [{ values: h.delivery_rate, label: "deliveries" }]);
  // Milliseconds, or seconds once a subscriber waits that long (lossless and behind).
  const slowest = Math.max(0, ...h.deliver_p99_s.filter(v => v !== null));
  const [unit, scale] = slowest >= 1 ? ["s", 1] : ["ms", 1000];
  const p99 = h.deliver_p99_s.map(v => v === null ? null : v * scale);
  chart("chart-deliver_p99_s", "publish→deliver p99 (live)", unit, h, [{ values: p99, label: "p99" }]);
  chart("chart-refusal_rate", "refusals", "/s", h, [{ values: h.refusal_rate, label: "refusals" }]);
  const lagLines = h.subscriptions.map((s, i) => ({
    values: s.lag, colour: COLOURS[i % COLOURS.length], label: `${s.id} ${s.pattern}`,
  }));
  const figure = chart("chart-lag", "subscription lag", "offsets", h, lagLines, true);
  const legend = document.createElement("ul");
  legend.className = "legend";
  lagLines.forEach((line, i) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.textContent = "— ";
    // A colour set through the CSSOM, which the style policy allows (a style attribute it would not).
    swatch.style.color = line.colour;
    const s = h.subscriptions[i];
    const lag = s.lag.findLast(v => v !== null);
    item.append(swatch, `${line.label}: ${s.live ? short(lag) : "ended"}`);
    legend.append(item);
  });
  if (h.subscriptions_omitted > 0) {
    const item = document.createElement("li");
    item.className = "muted";
    item.textContent = `${h.subscriptions_omitted} more not charted (at most ${h.max_subscription_series})`;
    legend.append(item);
  }
  if (lagLines.length === 0) {
    const item = document.createElement("li");
    item.className = "muted";
    item.textContent = "no subscriptions";
    legend.append(item);
  }
  figure.append(legend);
}

function tables(s) {
  window.consoleState = s;
  document.getElementById("summary").textContent =
    `node ${s.node_id} · last offset ${s.last_offset} · ${(s.stored_bytes / 1024).toFixed(0)} KiB stored`;
  table("cluster", ["node", "raft", "public", "role", "replication lag"], s.cluster.nodes.map(n => [
    n.id + (n.this_node ? " (this)" : ""), n.raft_addr, n.public_addr,
    n.role, n.replication_lag]));
  table("channels", ["channel", "recent messages", "msg/s", "last offset"], s.channels.map(c => [
    c.channel, c.recent_messages, Number(c.rate_per_s.toFixed(2)), c.last_offset]));
  table("subscriptions", ["id", "pattern", "policy", "durable", "lag", "queued"], s.subscriptions.map(x => [
    x.id, x.pattern, x.policy, x.durable, x.lag, x.queued_messages]));
  table("consumers", ["name", "pattern", "acked offset", "behind", "redeliveries"], s.consumers.map(c => [
    c.name, c.pattern, c.acked_offset,
    c.behind === null || c.behind_exact ? c.behind ?? "-" : c.behind + "+", c.redeliveries]));
  table("schemas", ["pattern", "version", "policy", "refused", "warned"], s.schemas.map(x => [
    x.pattern, x.version, x.policy, x.refused, x.warned]));
  const now = {};
  table("refusals", ["reason", "metric", "total", "last 2 s"], s.refusals.map(r => {
    const key = r.metric + r.reason;
    now[key] = r.count;
    return [r.reason, r.metric.replace("switchboard_", ""), r.count, r.count - (previous[key] ?? r.count)];
  }));
  previous = now;
}

let previous = {};
async function refresh() {
  try {
    const [state, history] = await Promise.all(["console/api/state", "console/api/history"].map(
      async url => {
        const response = await fetch(url, { cache: "no-store" });
        if (!response.ok) throw new Error(`${url}: ${response.status}`);
        return response.json();
      }));
    tables(state);
    charts(history);
    document.getElementById("error").textContent = "";
  } catch (e) {
    document.getElementById("error").textContent = `cannot read the state: ${e}`;
  }
}
refresh();
setInterval(refresh, 2000);
