// The host side of an embedded KPI frame (kpi-embed.html, docs/KPIS.md "Embedding"): a frame
// sandboxed without allow-same-origin cannot call the broker itself (its requests carry
// `Origin: null`, which the allow-list refuses), so this page, on an allowed origin, reads the
// views the frame names and posts each new reading in.
"use strict";

(function () {
  const params = new URLSearchParams(location.search);
  const BROKER = (params.get("broker") || "http://localhost:7400").replace(/\/+$/, "");
  const WINDOW = params.get("window") || "1m";
  const WINDOWS = Number(params.get("windows")) || 10;
  const EVERY_MS = Math.max(250, Number(params.get("every_ms")) || 2000);
  const frame = document.getElementById("kpis");
  const shown = [];
  const followed = new Set();
  const status = (text) => { document.getElementById("embed-status").textContent = text; };

  function post(values) {
    frame.contentWindow.postMessage({ type: "switchboard.kpis", values }, "*");
  }

  // Polls one view with If-None-Match and posts what changed.
  async function follow(view) {
    let etag = "";
    for (;;) {
      try {
        const headers = etag ? { "If-None-Match": etag } : {};
        const url = `${BROKER}/v1/kpis/${encodeURIComponent(view)}?window=${encodeURIComponent(WINDOW)}&windows=${WINDOWS}`;
        const response = await fetch(url, { headers, cache: "no-store" });
        if (response.status === 200) {
          const values = await response.json();
          etag = response.headers.get("ETag") || (values.etag ? `"${String(values.etag).replace(/"/g, "")}"` : "");
          post(values);
        } else if (response.status !== 304) {
          status(`${view}: ${response.status}`);
        }
      } catch (error) {
        status(`${view}: broker unreachable`);
      }
      await new Promise((resolve) => setTimeout(resolve, EVERY_MS));
    }
  }

  window.addEventListener("message", (event) => {
    if (event.source !== frame.contentWindow || !event.data) return;
    if (event.data.type === "switchboard.kpis.ready") {
      status(`following ${event.data.views.join(", ")}`);
      for (const view of event.data.views) {
        if (followed.has(view)) continue;
        followed.add(view);
        if (params.get("feed") !== "none") follow(view);
      }
    } else if (event.data.type === "switchboard.kpis.shown") {
      shown.push({ view: event.data.view, etag: event.data.etag });
    }
  });

  // Whichever of the two starts last: the frame's own "ready" may have come before this listener.
  frame.contentWindow.postMessage({ type: "switchboard.kpis.hello" }, "*");
  window.embedDemo = { post, shown, followed };
})();
