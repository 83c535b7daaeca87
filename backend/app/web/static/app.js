// The console's own script: local times, the spend charts, a task's live events.
// No build step; loaded after htmx and Chart.js (all from this origin: CSP default-src 'self').
"use strict";

(function () {
  // -- times: the server writes UTC <time datetime>; show them in the viewer's time zone ----
  const timeFormat = new Intl.DateTimeFormat(undefined, {
    year: "numeric", month: "short", day: "2-digit",
    hour: "2-digit", minute: "2-digit", second: "2-digit",
  });

  function localTimes(root) {
    root.querySelectorAll("time[data-local]").forEach(function (el) {
      const moment = new Date(el.getAttribute("datetime"));
      if (!isNaN(moment.getTime())) {
        el.title = el.textContent;
        el.textContent = timeFormat.format(moment);
      }
      el.removeAttribute("data-local");
    });
    const zone = document.getElementById("time-zone");
    if (zone) {
      zone.textContent = Intl.DateTimeFormat().resolvedOptions().timeZone || "local time";
    }
  }

  // -- charts: stacked daily spend, data in the canvas's data-chart attribute ---------------
  const palette = [
    "#2563eb", "#f59e0b", "#10b981", "#ef4444", "#8b5cf6",
    "#0ea5e9", "#ec4899", "#84cc16", "#94a3b8",
  ];

  function drawCharts(root) {
    if (typeof Chart === "undefined") {
      return;
    }
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      const data = JSON.parse(canvas.getAttribute("data-chart"));
      data.datasets.forEach(function (set, i) {
        set.backgroundColor = palette[i % palette.length];
        set.borderWidth = 0;
      });
      canvas.removeAttribute("data-chart");
      new Chart(canvas, {
        type: "bar",
        data: data,
        options: {
          animation: false,
          maintainAspectRatio: false,
          responsive: true,
          interaction: { mode: "index", intersect: false },
          scales: {
            x: { stacked: true, ticks: { maxRotation: 0, autoSkipPadding: 12 } },
            y: { stacked: true, title: { display: true, text: "USD" } },
          },
          plugins: {
            legend: { position: "bottom" },
            tooltip: {
              callbacks: {
                label: function (ctx) {
                  return ctx.dataset.label + ": $" + ctx.parsed.y.toPrecision(6);
                },
              },
            },
          },
        },
      });
      canvas.setAttribute("data-drawn", "true");
    });
  }

  // -- a task's events: the server-sent stream, read with fetch (any event name) -------------
  function refreshLive() {
    if (typeof htmx === "undefined") {
      return;
    }
    document.querySelectorAll("[data-live]").forEach(function (el) {
      htmx.trigger(el, "refresh");
    });
  }

  function appendEvent(list, id, kind, data) {
    let message = data;
    let stamp = null;
    try {
      const parsed = JSON.parse(data);
      message = parsed.message;
      stamp = parsed.timestamp;
    } catch (e) {
      // not JSON: shown as it came
    }
    const item = document.createElement("li");
    item.className = "event event-" + kind.replace(/[^a-z_]/g, "");
    if (stamp) {
      const time = document.createElement("time");
      time.setAttribute("datetime", stamp);
      time.setAttribute("data-local", "");
      time.textContent = stamp;
      item.appendChild(time);
      item.appendChild(document.createTextNode(" "));
    }
    const label = document.createElement("strong");
    label.textContent = kind;
    item.appendChild(label);
    item.appendChild(document.createTextNode(" " + message));
    if (id) {
      item.setAttribute("data-id", id);
    }
    list.appendChild(item);
    localTimes(item);
  }

  async function followEvents(list) {
    let after = Number(list.getAttribute("data-after") || "0");
    const url = list.getAttribute("data-stream");
    const state = document.getElementById("stream-state");
    for (let attempt = 0; attempt < 50; attempt++) {
      let ended = false;
      try {
        const response = await fetch(url + "?after=" + after, {
          headers: { Accept: "text/event-stream" },
          credentials: "same-origin",
        });
        if (!response.ok || !response.body) {
          if (response.status === 401 || response.status === 404) {
            if (state) { state.textContent = "stream closed (" + response.status + ")"; }
            return;
          }
          throw new Error("HTTP " + response.status);
        }
        if (state) { state.textContent = "live"; }
        const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
        let buffer = "";
        for (;;) {
          const chunk = await reader.read();
          if (chunk.done) { break; }
          buffer += chunk.value;
          let cut;
          while ((cut = buffer.indexOf("\n\n")) >= 0) {
            const block = buffer.slice(0, cut);
            buffer = buffer.slice(cut + 2);
            let id = null, kind = "message", data = "";
            block.split("\n").forEach(function (line) {
              if (line.startsWith("id: ")) { id = line.slice(4); }
              else if (line.startsWith("event: ")) { kind = line.slice(7); }
              else if (line.startsWith("data: ")) { data += line.slice(6); }
            });
            if (kind === "end") {
              ended = true;
            } else if (data) {
              appendEvent(list, id, kind, data);
              if (id) { after = Number(id); }
            }
            if (data) { refreshLive(); }
          }
        }
      } catch (e) {
        if (state) { state.textContent = "reconnecting…"; }
      }
      if (ended) {
        if (state) { state.textContent = "finished"; }
        refreshLive();
        return;
      }
      await new Promise(function (resolve) { setTimeout(resolve, 2000); });
    }
  }

  function start(root) {
    localTimes(root);
    drawCharts(root);
  }

  document.addEventListener("DOMContentLoaded", function () {
    start(document);
    const events = document.getElementById("events");
    if (events && events.hasAttribute("data-stream")) {
      followEvents(events);
    }
    if (typeof htmx !== "undefined") {
      htmx.onLoad(function (el) { start(el); });
    }
    document.querySelectorAll("form[data-confirm]").forEach(function (form) {
      form.addEventListener("submit", function (event) {
        if (!window.confirm(form.getAttribute("data-confirm"))) {
          event.preventDefault();
        }
      });
    });
  });
})();
