// One contact panel: shows the merged contact live (an EventSource on the entity watch) and edits
// only its own fields with PATCH + If-Match, so two panels on two origins never overwrite each
// other's fields, and a stale edit is refused (412) instead of silently winning.
// Settings come from the query string: ?broker=http://localhost:7400&contact=42
"use strict";

const params = new URLSearchParams(location.search);
const BROKER = params.get("broker") || "http://localhost:7400";
const CONTACT = params.get("contact") || "42";
const PANEL = document.body.dataset.panel; // "crm" or "telephony": the writer of our edits
const OWN_FIELDS = document.body.dataset.fields.split(",");

// What the tests (and a curious developer in the console) read.
window.demo = { contact: null, version: 0, changes: 0, status: "connecting", feed: [], sources: [] };

const $ = (id) => document.getElementById(id);

function setStatus(text) {
  window.demo.status = text;
  $("status").textContent = text;
}

function show(entity) {
  // Versions only grow: a late snapshot never replaces a newer change.
  if (entity.version < window.demo.version) return;
  window.demo.contact = entity.fields || {};
  window.demo.version = entity.version;
  window.demo.changes += 1;
  window.demo.changedAt = Date.now();
  const writer = entity.last_stamp ? entity.last_stamp.writer : "";
  $("merged").textContent = JSON.stringify(entity.fields, null, 2);
  $("version").textContent = `v${entity.version}` + (writer ? ` (last edit by ${writer})` : "");
  for (const field of OWN_FIELDS) {
    const input = $(field);
    // Never overwrite what the user is typing.
    if (document.activeElement !== input && entity.fields && field in entity.fields) {
      input.value = entity.fields[field];
    }
  }
}

function watchContact() {
  const url = `${BROKER}/v1/entities/watch?pattern=${encodeURIComponent(`contact.${CONTACT}`)}`;
  const events = new EventSource(url);
  window.demo.sources.push(events);
  const onEntity = (e) => show(JSON.parse(e.data));
  events.addEventListener("snapshot", onEntity);
  events.addEventListener("change", onEntity);
  events.addEventListener("snapshot_complete", () => setStatus("live"));
  events.onerror = () => setStatus("reconnecting");
}

async function save(event) {
  event.preventDefault();
  const fields = {};
  for (const field of OWN_FIELDS) fields[field] = $(field).value;
  const headers = { "Content-Type": "application/json", "X-Switchboard-Writer": PANEL };
  if (window.demo.version > 0) headers["If-Match"] = `"v${window.demo.version}"`;
  const started = performance.now();
  const response = await fetch(`${BROKER}/v1/entities/contact/${encodeURIComponent(CONTACT)}`, {
    method: "PATCH",
    headers,
    body: JSON.stringify(fields),
  });
  if (response.status === 412) {
    // Someone else edited first: our view is about to catch up through the watch; the user
    // saves again on top of the newer version.
    setStatus("conflict: the contact changed meanwhile, check and save again");
  } else if (!response.ok) {
    const error = await response.json().catch(() => ({}));
    setStatus(`refused: ${error.reason || response.status}`);
  } else {
    setStatus("saved");
  }
  // `ms` feeds the save_latency KPI view (web/demo/kpis/save_latency.toml, kpi.html).
  const ms = Math.round(performance.now() - started);
  telemetry.record("contact.save", { panel: PANEL, status: response.status, ms });
}

// An activity feed on a channel, resumable across page reloads: the offset of the last event
// shown is kept in localStorage and sent back as last_event_id, so the broker continues at the
// next offset - nothing missed while the page was away, nothing shown twice.
function followFeed() {
  const pattern = params.get("feed") || `${PANEL}.>`;
  const key = `switchboard.demo.lastEventId.${pattern}`;
  const last = localStorage.getItem(key) || "";
  const url = `${BROKER}/v1/subscribe?pattern=${encodeURIComponent(pattern)}` +
    `&last_event_id=${encodeURIComponent(last)}`;
  window.demo.resumedFrom = last;
  const events = new EventSource(url);
  window.demo.sources.push(events);
  // The broker has registered the subscription: what is published from now on will be shown.
  events.addEventListener("subscribed", () => { window.demo.feedReady = true; });
  // A saved id beyond the end of the broker's log (its data was wiped since) is refused with
  // START_BEYOND_END, and EventSource does not retry a refusal (nor show why): ask again to read
  // the JSON error, and only for that one forget the id and follow from now on.
  events.onerror = async () => {
    if (events.readyState !== EventSource.CLOSED || !last) return;
    const response = await fetch(url).catch(() => null);
    if (!response || response.ok) {
      response?.body?.cancel();
      return;
    }
    const error = await response.json().catch(() => ({}));
    if (error.reason === "START_BEYOND_END") {
      localStorage.removeItem(key);
      followFeed();
    }
  };
  events.onmessage = (e) => {
    const message = JSON.parse(e.data);
    localStorage.setItem(key, e.lastEventId);
    window.demo.feed.push(message);
    const line = document.createElement("li");
    line.textContent = `#${message.offset} ${message.channel} ${JSON.stringify(message.payload)}`;
    $("feed").prepend(line);
    while ($("feed").children.length > 20) $("feed").lastChild.remove();
  };
}

// Telemetry settings may come from the query string too (the tests use short ones):
// ?telemetry_every_ms=200&telemetry_max_events=50&telemetry_max_backoff_ms=1000
const telemetryOptions = { broker: BROKER, source: PANEL };
for (const [param, option] of [["telemetry_every_ms", "everyMs"], ["telemetry_max_events", "maxEvents"],
  ["telemetry_max_backoff_ms", "maxBackoffMs"]]) {
  if (params.has(param)) telemetryOptions[option] = Number(params.get(param));
}
const telemetry = window.createTelemetry(telemetryOptions);
window.demo.telemetry = telemetry;
document.getElementById("form").addEventListener("submit", save);
watchContact();
followFeed();
