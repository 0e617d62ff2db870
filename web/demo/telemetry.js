// A telemetry widget that rides out a broker restart (docs/CLIENT-RESILIENCE.md, "The browser
// telemetry"). Events wait in a bounded in-memory queue and go out as POST /v1/publish/batch,
// one batch at a time, in order. Every event carries an idempotency key (this page's id and the
// event's number), so a batch the broker stored but whose answer was lost is answered `duplicate`
// when it is sent again, not stored twice. After a failure the next try waits an exponential
// backoff with full jitter, so pages cut off by the same outage do not all come back at the same
// instant. A message the broker refuses for good (a bad channel, a schema) is never sent again.
// When the page is hidden or goes away, navigator.sendBeacon hands what is queued to the browser,
// which delivers it even after unload (the gateway parses the text/plain beacon body as JSON).
"use strict";

window.createTelemetry = function ({
  broker,
  source,
  channel = "web.telemetry",
  everyMs = 3000, // a batch every few seconds while the broker answers
  maxEvents = 1000, // queue bound, in events ...
  maxBytes = 512 * 1024, // ... and in bytes of JSON; over either, the oldest waiting event goes
  batchMax = 100, // events per batch (the gateway takes up to gateway.max_batch, 500)
  initialBackoffMs = 500, // the first retry waits up to this long, then it doubles ...
  maxBackoffMs = 30000, // ... up to this
  beaconMaxBytes = 60000, // browsers refuse beacons past 64 KiB in flight
}) {
  const url = `${broker}/v1/publish/batch`;
  // One id per page load; with the event's number it makes the idempotency key. randomUUID needs
  // a secure context (https, or http on localhost/127.0.0.1); elsewhere random bytes do.
  const pageId = (crypto.randomUUID && crypto.randomUUID()) ||
    Array.from(crypto.getRandomValues(new Uint8Array(16)), (b) => b.toString(16).padStart(2, "0")).join("");
  const utf8 = new TextEncoder();
  let seq = 0;
  // Waiting events, oldest first: { message, bytes, beaconed }. The batch in flight is not here.
  let queue = [];
  let queuedBytes = 0;
  let inFlight = null; // the events of the batch being sent, or null
  let timer = null;
  let attempt = 0; // failures in a row: the backoff's exponent
  const stats = {
    page: pageId, recorded: 0, stored: 0, duplicates: 0, dropped: 0, refused: 0,
    failures: 0, retryInMs: 0, lastError: "",
  };

  function record(name, data = {}, options = {}) {
    seq += 1;
    const message = {
      channel: options.channel || channel,
      payload: { name, source, page: pageId, seq, at: new Date().toISOString(), ...data },
      idempotency_key: `${pageId}:${seq}`,
    };
    const bytes = utf8.encode(JSON.stringify(message)).length; // what it weighs on the wire
    stats.recorded += 1;
    queue.push({ message, bytes, beaconed: false });
    queuedBytes += bytes;
    enforceBounds();
    // A full batch waiting is worth sending now, unless a retry is being waited out.
    if (queue.length >= batchMax && !inFlight && attempt === 0) schedule(0);
    render();
  }

  // Bounded: a page that cannot reach the broker drops its oldest waiting events (and counts
  // them), never grows without limit. The batch in flight is not dropped: its answer decides.
  function enforceBounds() {
    const flying = inFlight ? inFlight.length : 0;
    const flyingBytes = inFlight ? inFlight.reduce((sum, e) => sum + e.bytes, 0) : 0;
    while (queue.length > 0 &&
      (queue.length + flying > maxEvents || queuedBytes + flyingBytes > maxBytes)) {
      queuedBytes -= queue.shift().bytes;
      stats.dropped += 1;
    }
  }

  function schedule(delayMs) {
    clearTimeout(timer);
    stats.retryInMs = attempt > 0 ? delayMs : 0;
    timer = setTimeout(flush, delayMs);
  }

  // The next batch: up to batchMax events, and no more bytes than a beacon could carry.
  function takeBatch(from, limitBytes) {
    const batch = [];
    let bytes = 2;
    for (const entry of from) {
      if (batch.length >= batchMax || (batch.length > 0 && bytes + entry.bytes + 1 > limitBytes)) break;
      batch.push(entry);
      bytes += entry.bytes + 1;
    }
    return batch;
  }

  async function flush() {
    timer = null;
    if (inFlight) return;
    if (queue.length === 0) {
      schedule(everyMs);
      return;
    }
    const batch = takeBatch(queue, 512 * 1024);
    queue = queue.slice(batch.length);
    queuedBytes -= batch.reduce((sum, e) => sum + e.bytes, 0);
    inFlight = batch;
    render();
    let retry;
    try {
      const body = "[" + batch.map((e) => JSON.stringify(e.message)).join(",") + "]";
      const response = await fetch(url, { method: "POST", body, keepalive: body.length < beaconMaxBytes });
      retry = await settle(batch, response);
    } catch (error) {
      // No answer at all (the broker is down, the network is gone): the whole batch again.
      retry = { entries: batch, waitMs: 0, error: `network: ${error.message || error}` };
    }
    inFlight = null;
    const recovering = attempt > 0;
    if (retry.entries.length > 0) {
      // Retried events go back in front, in their order, ahead of anything recorded meanwhile.
      queue = retry.entries.concat(queue);
      queuedBytes += retry.entries.reduce((sum, e) => sum + e.bytes, 0);
      enforceBounds();
      attempt += 1;
      stats.failures += 1;
      stats.lastError = retry.error;
      schedule(Math.max(retry.waitMs, backoffMs(attempt)));
    } else {
      attempt = 0;
      stats.lastError = "";
      // A backlog (after an outage) drains batch after batch; otherwise wait for the next round.
      schedule(queue.length >= batchMax || (queue.length > 0 && recovering) ? 0 : everyMs);
    }
    render();
  }

  // Full jitter: uniform in [0, base], base = initial * 2^(attempt-1) capped at maxBackoffMs.
  function backoffMs(failures) {
    const base = Math.min(maxBackoffMs, initialBackoffMs * 2 ** Math.min(failures - 1, 30));
    return Math.random() * base;
  }

  // What an answer means for the batch: the entries to send again (in order) and how long the
  // broker asked us to wait at least.
  async function settle(batch, response) {
    const text = await response.text();
    let body = null;
    try { body = JSON.parse(text); } catch (_) { /* a proxy's page, say */ }
    if (response.ok && Array.isArray(body) && body.length === batch.length) {
      const retry = { entries: [], waitMs: 0, error: "" };
      body.forEach((answer, i) => {
        if (answer && answer.ack) {
          stats.stored += 1;
          if (answer.ack.duplicate) stats.duplicates += 1;
        } else {
          const error = (answer && answer.error) || {};
          const verdict = retryable(error);
          if (verdict === null) {
            stats.refused += 1; // refused for good: sending it again gets the same answer
            stats.lastError = `${error.code} ${error.reason}`;
          } else {
            retry.entries.push(batch[i]);
            retry.waitMs = Math.max(retry.waitMs, verdict);
            retry.error = `${error.code} ${error.reason}`;
          }
        }
      });
      return retry;
    }
    if (response.ok) {
      // An answer that does not match the batch: send it all again; the keys make that safe.
      return { entries: batch, waitMs: 0, error: `unexpected answer ${response.status}` };
    }
    const error = (body && body.code) ? body : { code: "", reason: "" };
    let verdict = retryable(error);
    // A 5xx without the broker's JSON (a proxy, a gateway timeout) is the way to it failing.
    if (!body || !body.code) verdict = response.status >= 500 || response.status === 429 ? 0 : null;
    if (response.status === 429 && verdict !== null) {
      const seconds = Number(response.headers.get("Retry-After"));
      if (seconds > 0) verdict = Math.max(verdict || 0, seconds * 1000);
    }
    if (verdict === null) {
      // The request itself was refused for good (a malformed body, an origin not allowed): the
      // batch is dropped, never retried.
      stats.refused += batch.length;
      stats.lastError = `${response.status} ${error.reason || ""}`;
      return { entries: [], waitMs: 0, error: "" };
    }
    return { entries: batch, waitMs: verdict, error: `${response.status} ${error.reason || ""}` };
  }

  // The Rust client's table (client/src/retry.rs): null when the refusal is final, else the
  // least wait in ms before trying again.
  function retryable({ code, reason, metadata }) {
    if (code === "UNAVAILABLE" && ["NO_LEADER", "NOT_LEADER", "LEADER_UNREACHABLE", "NO_QUORUM",
      "SHUTTING_DOWN"].includes(reason)) return 0;
    if (code === "RESOURCE_EXHAUSTED" && reason === "RATE_LIMITED") {
      return Number((metadata || {}).retry_after_ms) || 1000;
    }
    // No reason: not the broker's answer but the way to it.
    if (["UNAVAILABLE", "UNKNOWN", "CANCELLED", "INTERNAL", "DEADLINE_EXCEEDED"].includes(code) && !reason) return 0;
    return null;
  }

  // The page is going away (or hidden, which on mobile may be the last chance): beacon what waits,
  // in batches a beacon can carry. The events stay queued: a beacon has no answer, so if the page
  // lives on they are sent again by fetch, and their keys make the broker answer `duplicate`.
  function flushOnExit() {
    const pending = (inFlight || []).concat(queue).filter((e) => !e.beaconed);
    while (pending.length > 0) {
      const batch = takeBatch(pending, beaconMaxBytes);
      const body = "[" + batch.map((e) => JSON.stringify(e.message)).join(",") + "]";
      if (!navigator.sendBeacon(url, body)) break; // over the browser's quota: keep the rest
      for (const entry of batch) entry.beaconed = true;
      pending.splice(0, batch.length);
    }
  }

  function render() {
    const widget = document.getElementById("telemetry");
    if (!widget) return;
    const waiting = queue.length + (inFlight ? inFlight.length : 0);
    let text = `telemetry: ${waiting} queued, ${stats.stored} stored`;
    if (stats.dropped) text += `, ${stats.dropped} dropped (queue full)`;
    if (stats.refused) text += `, ${stats.refused} refused`;
    if (attempt > 0) text += ` — broker unreachable (${stats.lastError}), retry ${attempt} in ${Math.round(stats.retryInMs)} ms`;
    widget.textContent = text;
  }

  schedule(everyMs);
  addEventListener("pagehide", flushOnExit);
  addEventListener("visibilitychange", () => {
    if (document.visibilityState === "hidden") flushOnExit();
  });
  addEventListener("click", (e) => record("click", { target: e.target.id || e.target.tagName }));
  record("page.view", { path: location.pathname });
  return {
    record,
    flush: () => { if (!inFlight) schedule(0); },
    // What the tests (and a curious developer) read.
    stats: () => ({ ...stats, queued: queue.length, inFlight: inFlight ? inFlight.length : 0, attempt }),
  };
};
