// The linkproxy dashboard: polls /dashboard/state.json, reads /tap with EventSource, draws the latency chart.
// Hand-written, no dependencies, nothing loaded from anywhere but this admin server.
"use strict";

(function () {
  var Q = window.LinkproxyQuantile;
  var STATE_URL = "/dashboard/state.json";
  var TAP_URL = "/tap";
  var FETCH_TIMEOUT_MS = 3000;
  var BACKOFF_MS = [1000, 2000, 4000, 5000];   // retries after a failed poll: 1 s, 2 s, 4 s, then every 5 s
  var CHART_POINTS = 180;                      // latency history kept per series
  var CHART_SERIES = 100;                      // series with a history (the aggregate counts as one)
  var TAP_ROWS = 100;                          // rows the tap table keeps, newest first

  function $(id) { return document.getElementById(id); }

  function el(tag, attrs, text) {
    var node = document.createElement(tag);
    if (attrs) {
      Object.keys(attrs).forEach(function (k) {
        if (attrs[k] !== null && attrs[k] !== undefined) node.setAttribute(k, attrs[k]);
      });
    }
    if (text !== undefined && text !== null) node.textContent = String(text);
    return node;
  }

  // --- number formatting (the Chromium test reads these back and allows for their rounding) --------------

  function fmtMs(v) {
    if (v === null || v === undefined) return "\u2013";
    if (v < 10) return v.toFixed(2);
    if (v < 100) return v.toFixed(1);
    return v.toFixed(0);
  }

  function fmtRate(v) {
    if (v === null || v === undefined) return "\u2013";
    return v < 10 ? v.toFixed(2) : v.toFixed(1);
  }

  function fmtPercent(v) {
    if (v === null || v === undefined) return "\u2013";
    return (v * 100).toFixed(2) + "%";
  }

  function fmtCost(v) {
    if (v === null || v === undefined) return "\u2013";
    if (v === 0) return "0";
    return v < 1 ? v.toPrecision(3) : v.toFixed(2);
  }

  function fmtDuration(seconds) {
    var s = Math.abs(Math.round(seconds));
    var d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return d + " d " + h + " h";
    if (h) return h + " h " + m + " m";
    if (m) return m + " m " + (s % 60) + " s";
    return s + " s";
  }

  function setPill(node, state, text) {
    node.dataset.state = state;
    node.className = "pill pill-" + ({live: "ok", paused: "wait", connecting: "wait", reconnecting: "wait"}[state] || "bad");
    node.textContent = text;
  }

  // --- state polling ------------------------------------------------------------------------------------

  var previous = null;        // the last state.json, for rates and windowed quantiles
  var failures = 0;
  var history = {};           // series key -> [{t, p50, p95, p99}]
  var bounds = null;

  function seriesKey(row) { return row.direction + " " + row.authority; }

  function poll() {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, FETCH_TIMEOUT_MS);
    fetch(STATE_URL, {cache: "no-store", signal: controller.signal})
      .then(function (response) {
        if (!response.ok) throw new Error("HTTP " + response.status);
        return response.json();
      })
      .then(function (state) { return {state: state}; }, function (err) { return {error: err}; })
      .then(function (result) {
        // Exactly one next poll is scheduled, whatever happens below.
        clearTimeout(timer);
        var node = $("connection");
        if (result.error) {
          var delay = BACKOFF_MS[Math.min(failures, BACKOFF_MS.length - 1)];
          failures += 1;
          setPill(node, "disconnected", "disconnected \u2013 retrying in " + Math.round(delay / 1000) + " s");
          node.title = String(result.error && result.error.message || result.error);
          setTimeout(poll, delay);
          return;
        }
        failures = 0;
        setPill(node, "live", "live");
        node.title = "";
        setTimeout(poll, (result.state.poll_interval_s || 1) * 1000);
        try {
          render(result.state);
        } catch (e) {
          // A bug in the page, not a lost proxy: say so where developers look.
          console.error("dashboard: could not show the state", e);
        }
      });
  }

  function render(state) {
    bounds = Q.parseBounds(state.latency_buckets_ms);
    var prevRows = {};
    var restarted = false;
    if (previous) {
      previous.traffic.forEach(function (row) { prevRows[seriesKey(row)] = row; });
      // Counters only go down when the proxy restarted: start the windows again.
      state.traffic.forEach(function (row) {
        var before = prevRows[seriesKey(row)];
        if (before && row.requests < before.requests) restarted = true;
      });
      if (state.time < previous.time) restarted = true;
    }
    if (restarted) prevRows = {};
    var dt = previous && !restarted ? state.time - previous.time : 0;

    renderTraffic(state.traffic, prevRows, dt);
    recordLatency(state, prevRows, dt);
    renderEndpoints(state.balancers);
    renderIdentity(state.identity);
    drawChart();
    $("updated").textContent = "updated " + new Date(state.time * 1000).toLocaleTimeString();
    previous = state;
  }

  function renderTraffic(rows, prevRows, dt) {
    var body = $("traffic").tBodies[0];
    body.textContent = "";
    if (!rows.length) {
      var empty = el("tr", {"class": "empty"});
      empty.appendChild(el("td", {colspan: 8}, "no HTTP traffic yet"));
      body.appendChild(empty);
      return;
    }
    rows.forEach(function (row) {
      var before = prevRows[seriesKey(row)];
      var rate = null;
      if (dt > 0) rate = Math.max(0, row.requests - (before ? before.requests : 0)) / dt;
      var tr = el("tr", {"data-direction": row.direction, "data-authority": row.authority});
      var failing = row.success_rate !== null && row.success_rate < 0.95;
      tr.appendChild(el("td", {"data-field": "direction"}, row.direction));
      tr.appendChild(el("td", {"data-field": "authority", "class": "mono"}, row.authority));
      tr.appendChild(el("td", {"data-field": "rate", "class": "num"}, fmtRate(rate)));
      tr.appendChild(el("td", {"data-field": "requests", "class": "num"}, String(row.requests)));
      tr.appendChild(el("td", {"data-field": "success_rate", "class": "num" + (failing ? " bad" : "")},
                        fmtPercent(row.success_rate)));
      ["p50", "p95", "p99"].forEach(function (p) {
        tr.appendChild(el("td", {"data-field": p, "class": "num"}, fmtMs(row.latency_ms[p])));
      });
      body.appendChild(tr);
    });
  }

  // --- latency over time --------------------------------------------------------------------------------

  function windowQuantiles(now, before) {
    // The quantiles of the responses counted between two polls: the difference of cumulative buckets.
    var delta = now.map(function (c, i) { return Math.max(0, c - (before ? before[i] || 0 : 0)); });
    return {
      p50: Q.histogramQuantile(0.5, bounds, delta),
      p95: Q.histogramQuantile(0.95, bounds, delta),
      p99: Q.histogramQuantile(0.99, bounds, delta)
    };
  }

  function push(key, point) {
    if (!history[key]) {
      if (Object.keys(history).length >= CHART_SERIES) return;
      history[key] = [];
    }
    var points = history[key];
    points.push(point);
    if (points.length > CHART_POINTS) points.splice(0, points.length - CHART_POINTS);
  }

  function recordLatency(state, prevRows, dt) {
    if (!previous || dt <= 0) return;
    var total = null, totalBefore = null;
    state.traffic.forEach(function (row) {
      if (row.buckets.length !== bounds.length) return;
      var before = prevRows[seriesKey(row)];
      var beforeBuckets = before && before.buckets.length === bounds.length ? before.buckets : null;
      var w = windowQuantiles(row.buckets, beforeBuckets);
      push(seriesKey(row), {t: state.time, p50: w.p50, p95: w.p95, p99: w.p99});
      if (!total) { total = bounds.map(function () { return 0; }); totalBefore = total.slice(); }
      row.buckets.forEach(function (c, i) {
        total[i] += c;
        totalBefore[i] += beforeBuckets ? beforeBuckets[i] : 0;
      });
    });
    var all = total ? windowQuantiles(total, totalBefore) : {p50: null, p95: null, p99: null};
    push("", {t: state.time, p50: all.p50, p95: all.p95, p99: all.p99});
    updateSeriesChoices(state.traffic);
  }

  function updateSeriesChoices(rows) {
    var select = $("chart-series");
    var have = {};
    Array.prototype.forEach.call(select.options, function (o) { have[o.value] = true; });
    rows.forEach(function (row) {
      var key = seriesKey(row);
      if (!have[key]) select.appendChild(el("option", {value: key}, row.direction + " \u00b7 " + row.authority));
    });
  }

  var COLORS = {p50: "#4e9af1", p95: "#e3a008", p99: "#e55353"};

  function niceMax(v) {
    if (!(v > 0)) return 1;
    var p = Math.pow(10, Math.floor(Math.log10(v)));
    var steps = [1, 2, 2.5, 5, 10];
    for (var i = 0; i < steps.length; i++) if (steps[i] * p >= v) return steps[i] * p;
    return 10 * p;
  }

  function drawChart() {
    var canvas = $("chart");
    var ratio = window.devicePixelRatio || 1;
    var cssWidth = canvas.clientWidth || 1100, cssHeight = canvas.clientHeight || 220;
    if (canvas.width !== Math.round(cssWidth * ratio)) {
      canvas.width = Math.round(cssWidth * ratio);
      canvas.height = Math.round(cssHeight * ratio);
    }
    var ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, cssWidth, cssHeight);
    var left = 56, right = 12, top = 10, bottom = 24;
    var w = cssWidth - left - right, h = cssHeight - top - bottom;
    var points = history[$("chart-series").value] || [];
    var maxY = 0;
    points.forEach(function (p) { ["p50", "p95", "p99"].forEach(function (k) { if (p[k] > maxY) maxY = p[k]; }); });
    maxY = niceMax(maxY);
    var now = points.length ? points[points.length - 1].t : 0;
    var span = Math.max(30, points.length ? now - points[0].t : 30);

    ctx.font = "11px system-ui, sans-serif";
    ctx.fillStyle = "#8a94a6";
    ctx.strokeStyle = "#2a3140";
    ctx.lineWidth = 1;
    for (var i = 0; i <= 4; i++) {
      var y = top + h - (h * i) / 4;
      ctx.beginPath(); ctx.moveTo(left, y + 0.5); ctx.lineTo(left + w, y + 0.5); ctx.stroke();
      ctx.textAlign = "right"; ctx.textBaseline = "middle";
      var tick = (maxY * i) / 4;
      ctx.fillText((maxY >= 4 ? tick.toFixed(tick % 1 ? 1 : 0) : fmtMs(tick)) + " ms", left - 6, y);
    }
    ctx.textAlign = "center"; ctx.textBaseline = "top";
    for (var s = 0; s <= span; s += span > 120 ? 60 : span > 60 ? 15 : 10) {
      var x = left + w - (w * s) / span;
      ctx.fillText(s ? "-" + s + " s" : "now", x, top + h + 6);
    }
    if (!points.length) {
      ctx.textAlign = "center"; ctx.textBaseline = "middle";
      ctx.fillText("waiting for two polls\u2026", left + w / 2, top + h / 2);
      return;
    }
    ["p50", "p95", "p99"].forEach(function (k) {
      ctx.strokeStyle = COLORS[k];
      ctx.lineWidth = 2;
      ctx.beginPath();
      var drawing = false;
      points.forEach(function (p) {
        if (p[k] === null || p[k] === undefined) { drawing = false; return; }
        var px = left + w - (w * (now - p.t)) / span;
        var py = top + h - (h * Math.min(p[k], maxY)) / maxY;
        if (drawing) ctx.lineTo(px, py); else ctx.moveTo(px, py);
        drawing = true;
      });
      ctx.stroke();
    });
  }

  // --- endpoints and identity ---------------------------------------------------------------------------

  function renderEndpoints(balancers) {
    var body = $("endpoints").tBodies[0];
    body.textContent = "";
    var any = false;
    balancers.forEach(function (b) {
      b.endpoints.forEach(function (e) {
        any = true;
        var tr = el("tr", {"data-target": b.target, "data-endpoint": e.endpoint, "data-state": e.state});
        tr.appendChild(el("td", null, b.direction));
        tr.appendChild(el("td", {"class": "mono"}, b.target));
        tr.appendChild(el("td", {"class": "mono", "data-field": "endpoint"}, e.endpoint));
        var state = el("td", {"data-field": "state"});
        state.appendChild(el("span", {"class": "state state-" + e.state}, e.state));
        tr.appendChild(state);
        tr.appendChild(el("td", {"class": "num", "data-field": "cost"}, fmtCost(e.cost)));
        tr.appendChild(el("td", {"class": "num", "data-field": "weight"}, String(e.weight)));
        tr.appendChild(el("td", {"class": "mono small"}, e.identity || "not meshed"));
        body.appendChild(tr);
      });
      if (!b.endpoints.length) {
        any = true;
        var tr = el("tr", {"data-target": b.target, "class": "empty"});
        tr.appendChild(el("td", null, b.direction));
        tr.appendChild(el("td", {"class": "mono"}, b.target));
        tr.appendChild(el("td", {colspan: 5}, "no endpoints"));
        body.appendChild(tr);
      }
    });
    if (!any) {
      var empty = el("tr", {"class": "empty"});
      empty.appendChild(el("td", {colspan: 7}, "no balancer yet (targets appear with their first request)"));
      body.appendChild(empty);
    }
  }

  function renderIdentity(identity) {
    var box = $("identity"), name = $("identity-name"), expiry = $("identity-expiry");
    if (!identity) {
      box.dataset.state = "off";
      name.textContent = "off";
      expiry.textContent = "";
      return;
    }
    name.textContent = identity.name;
    if (identity.not_after === null) {
      box.dataset.state = "pending";
      expiry.textContent = identity.problem || "no certificate yet";
      return;
    }
    var left = identity.expires_in_s;
    box.dataset.state = !identity.ready ? "bad" : left < 3600 ? "expiring" : "ok";
    expiry.textContent = (left > 0 ? "expires in " + fmtDuration(left) : "expired " + fmtDuration(left) + " ago") +
      " (" + identity.not_after_iso + ")" + (identity.self_issued ? ", self-issued" : "");
    expiry.dataset.notAfter = String(identity.not_after);
  }

  // --- live tap -----------------------------------------------------------------------------------------

  var tap = null;
  var tapPaused = false;
  var tapRetry = 0;
  var tapTimer = null;

  function tapQuery() {
    var params = new URLSearchParams();
    var form = $("tap-filters");
    ["authority", "path", "method", "direction", "status"].forEach(function (name) {
      var v = form.elements[name].value.trim();
      if (v) params.set(name, v);
    });
    var text = params.toString();
    return TAP_URL + (text ? "?" + text : "");
  }

  function closeTap() {
    if (tapTimer) { clearTimeout(tapTimer); tapTimer = null; }
    if (tap) { tap.close(); tap = null; }
  }

  function openTap() {
    closeTap();
    if (tapPaused) return;
    var url = tapQuery();
    var source = new EventSource(url);
    tap = source;
    setPill($("tap-status"), "connecting", "connecting");
    source.onopen = function () {
      tapRetry = 0;
      setPill($("tap-status"), "live", "live");
    };
    source.onmessage = function (event) {
      var data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      queueTapRow(data);
    };
    // The proxy drops events for a subscriber that reads too slowly, and says how many in total.
    source.addEventListener("lost", function (event) {
      var data;
      try { data = JSON.parse(event.data); } catch (e) { return; }
      setPill($("tap-status"), "live", "live \u2013 " + data.lost + " events lost (too slow)");
    });
    source.onerror = function () {
      if (source !== tap) return;
      if (source.readyState === EventSource.CONNECTING) {
        // A dropped stream (the proxy restarted): the browser reconnects by itself.
        setPill($("tap-status"), "reconnecting", "reconnecting");
        return;
      }
      // Closed for good: the answer was not an event stream. Ask what it was, then try again later.
      tap = null;
      var delay = BACKOFF_MS[Math.min(tapRetry, BACKOFF_MS.length - 1)] * 2;
      tapRetry += 1;
      probeTap(url).then(function (answer) {
        var status = answer.status;
        if (status === 404) {
          setPill($("tap-status"), "unavailable", "tap unavailable (this proxy has no /tap)");
        } else if (status === 403) {
          setPill($("tap-status"), "unavailable", "tap refused: " + (answer.text || "403"));
        } else if (status === 400) {
          // A filter the proxy does not take: wait for the user to change it.
          setPill($("tap-status"), "invalid", "bad filter: " + (answer.text || "400"));
          return;
        } else if (status === 429) {
          setPill($("tap-status"), "reconnecting", "tap busy (too many watchers), retrying");
        } else {
          setPill($("tap-status"), "reconnecting", "reconnecting" + (status ? " (HTTP " + status + ")" : ""));
        }
        if (!tapPaused) tapTimer = setTimeout(openTap, status === 404 || status === 403 ? 10000 : delay);
      });
    };
  }

  function probeTap(url) {
    var controller = new AbortController();
    var timer = setTimeout(function () { controller.abort(); }, FETCH_TIMEOUT_MS);
    return fetch(url, {cache: "no-store", signal: controller.signal})
      .then(function (response) {
        if (response.ok) {
          // An event stream after all (the error was transient): do not wait for its events.
          clearTimeout(timer);
          controller.abort();
          return {status: response.status, text: ""};
        }
        return response.text().then(function (text) {
          clearTimeout(timer);
          return {status: response.status, text: text.trim().slice(0, 200)};
        });
      })
      .catch(function () { clearTimeout(timer); return {status: null, text: ""}; });
  }

  function cell(tr, value, cls, field) {
    tr.appendChild(el("td", {"class": cls || null, "data-field": field || null},
                      value === null || value === undefined || value === "" ? "" : value));
  }

  // Events are drawn in batches, a few times a second, so that a busy proxy costs the page at most one
  // table's worth of rows per batch.
  var tapPending = [];
  var tapFlush = null;
  var TAP_FLUSH_MS = 200;

  function queueTapRow(ev) {
    tapPending.push(ev);
    if (tapPending.length > TAP_ROWS) tapPending.splice(0, tapPending.length - TAP_ROWS);
    if (!tapFlush) {
      tapFlush = setTimeout(function () {
        tapFlush = null;
        var batch = tapPending;
        tapPending = [];
        batch.forEach(addTapRow);
      }, TAP_FLUSH_MS);
    }
  }

  function addTapRow(ev) {
    var body = $("tap").tBodies[0];
    var when = typeof ev.timestamp === "number" ? new Date(ev.timestamp * 1000) : new Date();
    var status = ev.status;
    var failed = (typeof status === "number" && status >= 500) || !!ev.error;
    // An attempt a retry replaced: shown, dimmed, with the retry noted in the error column.
    var dropped = ev.final === false;
    var tr = el("tr", {"class": dropped ? "dropped" : failed ? "bad" : null});
    cell(tr, when.toLocaleTimeString(), "muted");
    cell(tr, ev.direction, null, "direction");
    cell(tr, ev.method, null, "method");
    cell(tr, ev.authority, "mono", "authority");
    cell(tr, ev.path, "mono path", "path");
    cell(tr, status, "num", "status");
    cell(tr, ev.grpc_status, "num");
    cell(tr, typeof ev.latency_ms === "number" ? fmtMs(ev.latency_ms) : ev.latency_ms, "num");
    cell(tr, typeof ev.duration_ms === "number" ? fmtMs(ev.duration_ms) : ev.duration_ms, "num");
    cell(tr, ev.endpoint, "mono", "endpoint");
    cell(tr, ev.tls === undefined ? "" : String(ev.tls));
    cell(tr, ev.client_id, "mono small");
    cell(tr, ev.request_bytes, "num");
    cell(tr, ev.response_bytes, "num");
    cell(tr, ev.route);
    cell(tr, dropped ? "attempt " + ev.attempt + " retried" + (ev.error ? ": " + ev.error : "") : ev.error,
         "small");
    body.insertBefore(tr, body.firstChild);
    while (body.rows.length > TAP_ROWS) body.deleteRow(body.rows.length - 1);
  }

  // --- wiring -------------------------------------------------------------------------------------------

  function start() {
    $("chart-series").addEventListener("change", drawChart);
    window.addEventListener("resize", drawChart);
    $("tap-filters").addEventListener("submit", function (event) {
      event.preventDefault();
      tapRetry = 0;
      openTap();
    });
    $("tap-pause").addEventListener("click", function () {
      tapPaused = !tapPaused;
      this.textContent = tapPaused ? "resume" : "pause";
      if (tapPaused) {
        closeTap();
        setPill($("tap-status"), "paused", "paused");
      } else {
        openTap();
      }
    });
    $("tap-clear").addEventListener("click", function () {
      tapPending = [];
      $("tap").tBodies[0].textContent = "";
    });
    drawChart();
    poll();
    openTap();
  }

  start();
})();
