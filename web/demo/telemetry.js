// A telemetry widget: events are batched in memory and sent as one POST /v1/publish/batch every
// few seconds (fetch), or when the page goes away with navigator.sendBeacon, which the browser
// delivers even after unload. The gateway parses the text/plain beacon body as JSON.
"use strict";

window.createTelemetry = function ({ broker, source, channel = "web.telemetry", everyMs = 3000, max = 100 }) {
  let pending = [];
  let sent = 0;

  function record(name, data = {}) {
    // Bounded: a page that cannot reach the broker drops its oldest events, not its memory.
    if (pending.length >= max) pending.shift();
    pending.push({ channel, payload: { name, source, at: new Date().toISOString(), ...data } });
    render();
  }

  function take() {
    const batch = pending;
    pending = [];
    sent += batch.length;
    render();
    return JSON.stringify(batch);
  }

  function flush() {
    if (pending.length === 0) return;
    fetch(`${broker}/v1/publish/batch`, { method: "POST", body: take(), keepalive: true })
      .catch(() => {});
  }

  function flushOnExit() {
    if (pending.length > 0) navigator.sendBeacon(`${broker}/v1/publish/batch`, take());
  }

  function render() {
    const widget = document.getElementById("telemetry");
    if (widget) widget.textContent = `telemetry: ${pending.length} queued, ${sent} sent`;
  }

  setInterval(flush, everyMs);
  addEventListener("pagehide", flushOnExit);
  addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") flushOnExit();
  });
  addEventListener("click", (e) => record("click", { target: e.target.id || e.target.tagName }));
  record("page.view", { path: location.pathname });
  return { record, flush };
};
