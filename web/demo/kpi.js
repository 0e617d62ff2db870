// KPI tiles with sparklines of the last windows (docs/KPIS.md, "The KPI widget"). Plain
// JavaScript, no build step, nothing inline (the page's CSP allows scripts of its origin only).
//
// Where the values come from, per view named by a tile (?feed= picks; `auto` by default):
// - auto: the SSE watch `GET /v1/kpis/{view}/watch?window=&windows=` of the broker; when it
//   cannot be opened (an older broker, a proxy without streaming), polling instead;
// - poll: `GET /v1/kpis/{view}?window=&windows=` every ?every_ms= (2000), with If-None-Match, so an
//   unchanged view costs a 304 and no body;
// - parent: nothing of its own; the embedding page posts each reading to this frame
//   (`{type: "switchboard.kpis", values}`), for a frame sandboxed without `allow-same-origin`,
//   whose requests the broker would refuse (their origin is opaque: `null`).
// Every reading has the GetKpisResponse shape: {etag, view, window, windows: [{start, end,
// groups: [{kind, name, messages, measures: [{name, count, avg, p50, p95, p99, max, ...}]}]}]}.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const BROKER = (params.get("broker") || "http://localhost:7400").replace(/\/+$/, "");
  const WINDOW = params.get("window") || "1m";
  const WINDOWS = Math.max(1, Math.min(60, Number(params.get("windows")) || 10));
  const FEED = params.get("feed") || "auto";
  const EVERY_MS = Math.max(250, Number(params.get("every_ms")) || 2000);

  const tiles = Array.from(document.querySelectorAll(".tile[data-view]"));
  const views = [...new Set(tiles.map((tile) => tile.dataset.view))];
  const state = { readings: {}, feeds: {}, errors: {} };
  document.getElementById("window").textContent = WINDOW;

  function setStatus() {
    const parts = views.map((view) => `${view}: ${state.errors[view] || state.feeds[view] || "waiting"}`);
    document.getElementById("feed-status").textContent = parts.join(", ");
  }

  // A kind as the JSON gives it: "named"/"KPI_GROUP_KIND_NAMED"/1, ...
  function kindOf(group) {
    const kind = String(group.kind ?? "").toLowerCase();
    if (kind === "2" || kind.endsWith("missing")) return "missing";
    if (kind === "3" || kind.endsWith("other")) return "other";
    return "named";
  }

  function groupLabel(group) {
    const kind = kindOf(group);
    return kind === "named" ? String(group.name) : `(${kind === "other" ? "other" : "none"})`;
  }

  function messagesOf(window) {
    return (window.groups || []).reduce((sum, group) => sum + Number(group.messages || 0), 0);
  }

  // One measure's quantity in a window of an ungrouped view (its one group); null without values.
  function measureOf(window, measure, quantity) {
    for (const group of window.groups || []) {
      const found = (group.measures || []).find((m) => m.name === measure);
      if (found && Number(found.count) > 0 && found[quantity] !== undefined && found[quantity] !== null) {
        return Number(found[quantity]);
      }
    }
    return null;
  }

  function formatNumber(value) {
    if (value === null || !Number.isFinite(value)) return "–";
    if (Number.isInteger(value)) return String(value);
    return value >= 100 ? value.toFixed(0) : value.toFixed(value >= 10 ? 1 : 2);
  }

  const SVG = "http://www.w3.org/2000/svg";

  // A sparkline of `values` (null: no value in that window), scaled to the largest.
  function drawSpark(svg, values) {
    while (svg.firstChild) svg.removeChild(svg.firstChild);
    const known = values.filter((v) => v !== null);
    const top = Math.max(1, ...known);
    const step = values.length > 1 ? 100 / (values.length - 1) : 100;
    const points = values.map((v, i) => `${(i * step).toFixed(2)},${(23 - ((v ?? 0) / top) * 22).toFixed(2)}`);
    const line = document.createElementNS(SVG, "polyline");
    line.setAttribute("points", points.join(" "));
    svg.appendChild(line);
    svg.dataset.values = values.map((v) => (v === null ? "" : String(v))).join(",");
  }

  function renderTile(tile, reading) {
    const windows = reading.windows || [];
    const newest = windows[windows.length - 1] || { groups: [] };
    const stat = tile.dataset.stat || "messages";
    let series;
    if (stat === "messages" || stat === "groups") {
      series = windows.map(messagesOf);
    } else {
      const [measure, quantity] = stat.split(".");
      series = windows.map((window) => measureOf(window, measure, quantity || "p95"));
    }
    const value = tile.querySelector(".value");
    if (value) {
      const latest = series.length ? series[series.length - 1] : null;
      value.textContent = formatNumber(latest) + (latest !== null && tile.dataset.unit ? ` ${tile.dataset.unit}` : "");
      value.dataset.value = latest === null ? "" : String(latest);
    }
    const list = tile.querySelector("ul.groups");
    if (list) {
      while (list.firstChild) list.removeChild(list.firstChild);
      for (const group of newest.groups || []) {
        const item = document.createElement("li");
        const name = document.createElement("span");
        const count = document.createElement("span");
        name.textContent = groupLabel(group);
        count.textContent = String(group.messages);
        item.dataset.group = groupLabel(group);
        item.dataset.messages = String(group.messages);
        item.append(name, count);
        list.appendChild(item);
      }
    }
    const spark = tile.querySelector("svg.spark");
    if (spark) drawSpark(spark, series);
    tile.dataset.etag = reading.etag || "";
  }

  // Shows one reading of a view on every tile that names it; also the entry point of tests and
  // of an embedding page (through postMessage).
  function show(reading) {
    if (!reading || typeof reading.view !== "string" || !Array.isArray(reading.windows)) return false;
    state.readings[reading.view] = reading;
    for (const tile of tiles) if (tile.dataset.view === reading.view) renderTile(tile, reading);
    return true;
  }

  const query = (view) => `${BROKER}/v1/kpis/${encodeURIComponent(view)}`;
  const search = `window=${encodeURIComponent(WINDOW)}&windows=${WINDOWS}`;

  function watch(view) {
    const source = new EventSource(`${query(view)}/watch?${search}`);
    let received = false;
    const onReading = (event) => {
      try {
        received = true;
        state.feeds[view] = "live";
        delete state.errors[view];
        show(JSON.parse(event.data));
      } catch (error) {
        state.errors[view] = `bad reading: ${error.message}`;
      }
      setStatus();
    };
    source.onmessage = onReading;
    source.addEventListener("kpis", onReading);
    source.onerror = () => {
      // A watch that never answered (no such route, refused): poll instead. One that was live
      // reconnects by itself unless the browser gave up on it.
      if (!received || source.readyState === EventSource.CLOSED) {
        source.close();
        poll(view);
      }
    };
  }

  async function poll(view) {
    state.feeds[view] = "polling";
    setStatus();
    let etag = "";
    for (;;) {
      try {
        const headers = etag ? { "If-None-Match": etag } : {};
        const response = await fetch(`${query(view)}?${search}`, { headers, cache: "no-store" });
        if (response.status === 200) {
          const reading = await response.json();
          // The header when the broker exposes it, else the body's (quoted as an ETag is).
          const body = reading.etag ? (String(reading.etag).startsWith('"') ? reading.etag : `"${reading.etag}"`) : "";
          etag = response.headers.get("ETag") || body;
          show(reading);
          delete state.errors[view];
        } else if (response.status !== 304) {
          const error = await response.json().catch(() => ({}));
          state.errors[view] = `${response.status} ${error.reason || ""}`.trim();
        }
      } catch (error) {
        state.errors[view] = "broker unreachable";
      }
      setStatus();
      await new Promise((resolve) => setTimeout(resolve, EVERY_MS));
    }
  }

  window.addEventListener("message", (event) => {
    // Only the embedding page may feed the tiles.
    if (window.parent === window || event.source !== window.parent) return;
    const data = event.data;
    if (data && data.type === "switchboard.kpis.hello") {
      // The page started after this frame: it asks again which views to send.
      event.source.postMessage({ type: "switchboard.kpis.ready", views }, "*");
    } else if (data && data.type === "switchboard.kpis" && show(data.values)) {
      state.feeds[data.values.view] = "from the page";
      setStatus();
      // Tells the page what is shown (its origin is unknown to a sandboxed frame: "*"; the
      // message holds only the view's name and ETag).
      event.source.postMessage({ type: "switchboard.kpis.shown", view: data.values.view, etag: data.values.etag }, "*");
    }
  });

  // What the page's CSP refused, for the browser test (it expects nothing).
  const violations = [];
  document.addEventListener("securitypolicyviolation", (event) => {
    violations.push(`${event.violatedDirective} ${event.blockedURI}`);
  });

  window.kpiDemo = { show, state, violations };
  if (FEED === "parent") {
    state.feeds = Object.fromEntries(views.map((view) => [view, "waiting for the page"]));
    // The views this frame shows, so the page knows what to send.
    if (window.parent !== window) window.parent.postMessage({ type: "switchboard.kpis.ready", views }, "*");
  } else {
    for (const view of views) (FEED === "poll" || !("EventSource" in window) ? poll : watch)(view);
  }
  setStatus();
})();
