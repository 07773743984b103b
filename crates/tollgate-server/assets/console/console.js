// The console's own script, loaded with `defer` and no inline code (the CSP forbids it): it
// draws the charts from the data the page carries, and copies a new key's secret. Every page
// works without it; it only adds.
(function () {
  "use strict";

  var COLOURS = ["#2457c5", "#c53030", "#1f7a3a", "#b7791f", "#6b46c1", "#2c7a7b", "#97266d", "#4a5568"];

  function drawCharts(root) {
    if (typeof uPlot === "undefined") return;
    root.querySelectorAll("[data-chart]").forEach(function (holder) {
      if (holder.dataset.drawn) return;
      holder.dataset.drawn = "yes";
      var data = JSON.parse(holder.dataset.chart);
      var xs = data.labels.map(function (_, i) { return i; });
      data.charts.forEach(function (chart) {
        var figure = document.createElement("figure");
        var caption = document.createElement("figcaption");
        caption.textContent = chart.title + " (" + data.zone + ")";
        figure.appendChild(caption);
        holder.appendChild(figure);
        var series = [{ label: "time", value: function (u, i) { return i == null ? "" : data.labels[i]; } }];
        chart.series.forEach(function (s, i) {
          series.push({ label: s.name, stroke: COLOURS[i % COLOURS.length], width: 2, spanGaps: false });
        });
        var options = {
          width: Math.max(280, holder.clientWidth),
          height: 220,
          series: series,
          scales: { x: { time: false } },
          axes: [
            { values: function (u, splits) { return splits.map(function (i) { return data.labels[i] ? data.labels[i].slice(5, 16) : ""; }); } },
            {}
          ]
        };
        var values = [xs].concat(chart.series.map(function (s) { return s.points; }));
        var plot = new uPlot(options, values, figure);
        window.addEventListener("resize", function () {
          plot.setSize({ width: Math.max(280, holder.clientWidth), height: 220 });
        });
      });
    });
  }

  function wireCopyButtons(root) {
    root.querySelectorAll("button[data-copy]").forEach(function (button) {
      button.hidden = false;
      button.addEventListener("click", function () {
        var source = document.getElementById(button.dataset.copy);
        if (!source || !navigator.clipboard) return;
        navigator.clipboard.writeText(source.value || source.textContent).then(function () {
          button.textContent = "Copied";
        });
      });
    });
  }

  function start(root) {
    drawCharts(root);
    wireCopyButtons(root);
  }

  document.addEventListener("DOMContentLoaded", function () { start(document); });
  // Parts of a page htmx swaps in get the same treatment.
  document.addEventListener("htmx:afterSettle", function (event) { start(event.target); });
})();
