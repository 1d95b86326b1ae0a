// Prometheus' histogram_quantile, the same algorithm as linkproxy.admin.dashboard.histogram_quantile.
// Loaded by the page (as the global LinkproxyQuantile) and by the unit tests (under node, as a module).
"use strict";

(function (root) {
  // q: the quantile (0..1). bounds: upper bounds in ascending order, the last Infinity.
  // cumulative: cumulative counts, one per bound. Returns a number, or null when there is nothing to tell.
  function histogramQuantile(q, bounds, cumulative) {
    if (Number.isNaN(q)) return null;
    if (q < 0) return -Infinity;
    if (q > 1) return Infinity;
    var n = bounds.length;
    if (n < 2 || cumulative.length !== n || bounds[n - 1] !== Infinity) return null;
    var counts = [];
    var level = 0;
    for (var i = 0; i < n; i++) {
      level = Math.max(level, cumulative[i]);
      counts.push(level);
    }
    var observations = counts[n - 1];
    if (observations === 0) return null;
    var rank = q * observations;
    var b = 0;
    while (counts[b] < rank) b++;
    if (b === n - 1) return bounds[n - 2];
    if (b === 0 && bounds[0] <= 0) return bounds[0];
    var start = 0, end = bounds[b], count = counts[b];
    if (b > 0) {
      start = bounds[b - 1];
      count -= counts[b - 1];
      rank -= counts[b - 1];
    }
    if (count === 0) return start;
    return start + (end - start) * (rank / count);
  }

  // The bounds of state.json's latency_buckets_ms ("+Inf" last) as numbers.
  function parseBounds(bounds) {
    return bounds.map(function (b) { return b === "+Inf" ? Infinity : Number(b); });
  }

  var api = { histogramQuantile: histogramQuantile, parseBounds: parseBounds };
  if (typeof module !== "undefined" && module.exports) {
    module.exports = api;
  } else {
    root.LinkproxyQuantile = api;
  }
})(this);
