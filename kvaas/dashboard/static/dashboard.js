/* KVaaS admin dashboard: draws the charts (Chart.js, vendored) from their JSON endpoints.
   Series differ by line dash, point shape and fill pattern as well as colour, every legend
   names its series, and each chart has its data as a table beside it. No inline scripts. */
(function () {
  "use strict";
  var INK = ["#1f4e79", "#b85c00", "#2e7d32", "#6a1b9a"];
  var DASHES = [[], [8, 4], [2, 3], [12, 3, 2, 3]];
  var POINTS = ["circle", "triangle", "rect", "crossRot"];

  function pattern(kind, color) {
    var c = document.createElement("canvas");
    c.width = c.height = 8;
    var g = c.getContext("2d");
    g.fillStyle = "#fff";
    g.fillRect(0, 0, 8, 8);
    g.strokeStyle = color;
    g.fillStyle = color;
    g.lineWidth = 2;
    if (kind === 0) { g.fillRect(0, 0, 8, 8); }
    else if (kind === 1) { g.beginPath(); g.moveTo(0, 8); g.lineTo(8, 0); g.stroke(); }
    else { g.beginPath(); g.arc(4, 4, 1.5, 0, 2 * Math.PI); g.fill(); }
    return g.createPattern(c, "repeat");
  }

  function bytes(v) {
    var units = ["B", "KiB", "MiB", "GiB", "TiB"], i = 0;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i ? v.toFixed(1) : v.toFixed(0)) + " " + units[i];
  }

  function table(id, labels, series, fmt) {
    var holder = document.querySelector('[data-table-for="' + id + '"]');
    if (!holder) { return; }
    var t = document.createElement("table");
    var head = t.createTHead().insertRow();
    [""].concat(series.map(function (s) { return s.label; })).forEach(function (h) {
      var th = document.createElement("th"); th.scope = "col"; th.textContent = h; head.appendChild(th);
    });
    var body = t.createTBody();
    labels.forEach(function (label, i) {
      var row = body.insertRow();
      var th = document.createElement("th"); th.scope = "row"; th.textContent = label; row.appendChild(th);
      series.forEach(function (s) {
        var v = s.data[i];
        row.insertCell().textContent = v === null || v === undefined ? "–" : (s.fmt || fmt)(v);
      });
    });
    holder.replaceChildren(t);
  }

  function build(kind, d, ylabel) {
    var plain = function (v) { return Number(v).toLocaleString(); };
    if (kind === "storage") {
      var tiers = Object.keys(d.series);
      return {
        series: tiers.map(function (t) { return { label: t, data: d.series[t], fmt: bytes }; }),
        labels: d.labels,
        config: {
          type: "line",
          data: {
            labels: d.labels,
            datasets: tiers.map(function (t, i) {
              return {
                label: "tier " + t, data: d.series[t], borderColor: INK[i % 4],
                backgroundColor: INK[i % 4], borderDash: DASHES[i % 4],
                pointStyle: POINTS[i % 4], pointRadius: 3, borderWidth: 2
              };
            })
          },
          options: { scales: { y: { beginAtZero: true, title: { display: true, text: ylabel },
            ticks: { callback: bytes } } } }
        }
      };
    }
    if (kind === "attaches") {
      return {
        series: [{ label: "attaches", data: d.attaches, fmt: plain },
                 { label: "hit rate %", data: d.hit_rate, fmt: function (v) { return v + " %"; } }],
        labels: d.labels,
        config: {
          data: {
            labels: d.labels,
            datasets: [
              { type: "bar", label: "attaches per hour (striped bars)", data: d.attaches,
                backgroundColor: pattern(1, INK[0]), borderColor: INK[0], borderWidth: 1, yAxisID: "y" },
              { type: "line", label: "token-weighted hit rate % (dashed line, triangles)", data: d.hit_rate,
                borderColor: INK[1], backgroundColor: INK[1], borderDash: DASHES[1],
                pointStyle: "triangle", pointRadius: 3, yAxisID: "y1", spanGaps: true }
            ]
          },
          options: { scales: {
            y: { beginAtZero: true, title: { display: true, text: "attaches" } },
            y1: { position: "right", min: 0, max: 100, title: { display: true, text: "hit rate %" },
                  grid: { drawOnChartArea: false } } } }
        }
      };
    }
    /* usage: tokens per day, cached (solid) vs prefilled (dotted), stacked */
    return {
      series: [{ label: "cached tokens", data: d.cached_tokens, fmt: plain },
               { label: "prefilled tokens", data: d.prefill_tokens, fmt: plain },
               { label: "stored token-hours", data: d.token_hours, fmt: plain }],
      labels: d.labels,
      config: {
        type: "bar",
        data: {
          labels: d.labels,
          datasets: [
            { label: "cached tokens (solid)", data: d.cached_tokens, backgroundColor: pattern(0, INK[0]),
              borderColor: INK[0], borderWidth: 1, stack: "t" },
            { label: "prefilled tokens (dotted)", data: d.prefill_tokens, backgroundColor: pattern(2, INK[1]),
              borderColor: INK[1], borderWidth: 1, stack: "t" }
          ]
        },
        options: { scales: { x: { stacked: true }, y: { stacked: true, beginAtZero: true,
          title: { display: true, text: ylabel } } } }
      }
    };
  }

  function draw(canvas) {
    var parts = canvas.dataset.src.split("#");
    fetch(parts[0], { credentials: "same-origin", headers: { Accept: "application/json" } })
      .then(function (r) { if (!r.ok) { throw new Error(r.status); } return r.json(); })
      .then(function (json) {
        var d = parts[1] ? json[parts[1]] : json;
        var b = build(canvas.dataset.chart, d, canvas.dataset.ylabel);
        table(canvas.id, b.labels, b.series, String);
        b.config.options.animation = false;
        b.config.options.maintainAspectRatio = false;
        b.config.options.plugins = { legend: { labels: { usePointStyle: true } } };
        if (window.Chart) { new window.Chart(canvas, b.config); }
        canvas.dataset.ready = "true";
      })
      .catch(function () {
        canvas.dataset.ready = "error";
        canvas.insertAdjacentText("afterend", "The chart's data could not be loaded.");
      });
  }

  document.addEventListener("DOMContentLoaded", function () {
    document.querySelectorAll("canvas[data-chart]").forEach(draw);
  });
})();
