/*
 * The console's interactive 12-lead ECG viewer (templates/_viewer.html).
 *
 * Why a canvas and no library: the console serves everything itself (no CDN, no build step)
 * under a CSP without inline script or style. The data comes from GET /api/messages/<id>/ecg
 * (ecgbridge.gateway.console.viewer): samples in mV, and the heatmaps the worker stored.
 *
 * Paper: 1 mm minor / 5 mm major grid, 25 or 50 mm/s, 5/10/20 mm/mV, a 1 mV calibration pulse
 * at the start of every row; zoom changes pixels per millimetre, never the paper's scale.
 * The root element's data-state is "loading", then "ready" once drawn, or "error".
 */
(function () {
  "use strict";

  var LAYOUT = [
    ["I", "aVR", "V1", "V4"],
    ["II", "aVL", "V2", "V5"],
    ["III", "aVF", "V3", "V6"],
  ];
  var COLUMN_S = 2.5;
  var PAGE_S = 10;
  var LEAD_IN_MM = 10; // the calibration pulse sits before the traces, as on the printed page
  var RIGHT_MM = 5;
  var BOTTOM_MM = 6;
  var SCALES = [2, 3, 4, 5, 6, 8, 10, 12, 16]; // CSS pixels per millimetre of paper
  var GAINS = [10, 5, 2.5]; // the first one the largest lead fits is the default, as on the printed page
  var FIT_MM = 33.25; // the printed page's test: 95 % of its 35 mm row
  var MINOR = "#f6c9c4";
  var MAJOR = "#e58f86";
  var TRACE = "#111111";
  var RED = "#b00020";
  var CALIPER = "#1a56c4";
  var HEAT = "31, 89, 242"; // the PNG's heatmap blue
  var HEAT_ALPHA = 0.5;

  function clamp(x, lo, hi) {
    return Math.max(lo, Math.min(hi, x));
  }

  function fmt(x, digits) {
    return Number(x).toFixed(digits);
  }

  function median(values) {
    var finite = [];
    for (var i = 0; i < values.length; i++) {
      if (values[i] !== null && isFinite(values[i])) finite.push(values[i]);
    }
    if (!finite.length) return 0;
    finite.sort(function (a, b) {
      return a - b;
    });
    var mid = finite.length >> 1;
    return finite.length % 2 ? finite[mid] : (finite[mid - 1] + finite[mid]) / 2;
  }

  /* [low, high] of the finite values: the 0.5th and 99.5th percentiles, or the extremes (q = 0). */
  function range(values, q) {
    var finite = values.filter(function (v) {
      return v !== null && isFinite(v);
    });
    if (!finite.length) return [0, 0];
    finite.sort(function (a, b) {
      return a - b;
    });
    var last = finite.length - 1;
    return [finite[Math.floor(q * last)], finite[Math.ceil((1 - q) * last)]];
  }

  /* The standard 10 mm/mV unless the largest lead would not fit its row: then 5, then 2.5. */
  function defaultGain(samples) {
    var span = 0;
    Object.keys(samples).forEach(function (lead) {
      var r = range(samples[lead], 0.005);
      span = Math.max(span, r[1] - r[0]);
    });
    for (var i = 0; i < GAINS.length; i++) {
      if (span * GAINS[i] <= FIT_MM) return GAINS[i];
    }
    return GAINS[GAINS.length - 1];
  }

  /* "name:LEAD,LEAD" flags (quality, reader) -> lead -> ["name", ...] for the panel labels. */
  function leadMarks(flags, leads) {
    var marks = {};
    (flags || []).forEach(function (flag) {
      var parts = String(flag).split(":");
      if (parts.length !== 2) return;
      var named = parts[1].split(",").map(function (s) {
        return s.trim();
      });
      if (!named.every(function (l) { return leads.indexOf(l) >= 0; })) return;
      var word = parts[0].replace(/_leads?$/, "").replace(/_/g, " ");
      named.forEach(function (l) {
        (marks[l] = marks[l] || []).push(word);
      });
    });
    return marks;
  }

  function Viewer(root) {
    this.root = root;
    this.q = function (name) {
      return root.querySelector('[data-ctl="' + name + '"]');
    };
    this.canvas = this.q("canvas");
    this.scroll = this.q("scroll");
    this.data = null;
    this.mode = "12";
    this.rhythmLead = "II";
    this.singleLead = "II";
    this.speed = 25;
    this.gain = 10;
    this.scale = null; // px per mm; null until fitted
    this.userZoomed = false;
    this.heat = "";
    this.points = [];
    this.cursor = null;
    this.geometry = null;
    this.centres = {};
    this.bind();
  }

  Viewer.prototype.url = function () {
    return "/api/messages/" + encodeURIComponent(this.root.getAttribute("data-message-id") || "") + "/ecg";
  };

  Viewer.prototype.setState = function (state) {
    this.root.setAttribute("data-state", state);
  };

  Viewer.prototype.controls = function (enabled) {
    var self = this;
    ["mode", "lead", "speed", "gain", "zoom-in", "zoom-out", "heatmap", "clear"].forEach(function (name) {
      var el = self.q(name);
      if (el) el.disabled = !enabled;
    });
    if (enabled && !(this.data && this.data.heatmaps && this.heatCodes().length)) this.q("heatmap").disabled = true;
  };

  Viewer.prototype.bind = function () {
    var self = this;
    this.controls(false);
    this.q("mode").addEventListener("change", function (e) {
      self.mode = e.target.value;
      self.points = [];
      self.cursor = null;
      self.fillLeads();
      self.draw();
    });
    this.q("lead").addEventListener("change", function (e) {
      if (self.mode === "12") self.rhythmLead = e.target.value;
      else self.singleLead = e.target.value;
      self.points = [];
      self.cursor = null;
      self.draw();
    });
    this.q("speed").addEventListener("change", function (e) {
      self.speed = Number(e.target.value);
      self.draw();
    });
    this.q("gain").addEventListener("change", function (e) {
      self.gain = Number(e.target.value);
      self.draw();
    });
    this.q("heatmap").addEventListener("change", function (e) {
      self.heat = e.target.value;
      self.draw();
    });
    this.q("zoom-in").addEventListener("click", function () {
      self.zoom(1);
    });
    this.q("zoom-out").addEventListener("click", function () {
      self.zoom(-1);
    });
    this.q("clear").addEventListener("click", function () {
      self.points = [];
      self.draw();
    });
    this.root.addEventListener("keydown", function (e) {
      if (e.ctrlKey || e.metaKey || e.altKey || !self.data) return;
      if (e.key === "+" || e.key === "=") {
        self.zoom(1);
        e.preventDefault();
      } else if (e.key === "-" || e.key === "_") {
        self.zoom(-1);
        e.preventDefault();
      }
    });
    this.canvas.addEventListener("click", function (e) {
      if (!self.data || !self.geometry) return;
      var rect = self.canvas.getBoundingClientRect();
      var p = self.pointAt((e.clientX - rect.left) / self.scale, (e.clientY - rect.top) / self.scale);
      if (p) self.addPoint(p);
    });
    this.canvas.addEventListener("keydown", function (e) {
      self.onCanvasKey(e);
    });
    this.canvas.addEventListener("focus", function () {
      if (!self.data || !self.geometry) return;
      var byKeyboard = true;
      try {
        byKeyboard = self.canvas.matches(":focus-visible");
      } catch (err) {
        byKeyboard = true; // a browser without :focus-visible: show the cursor
      }
      if (!self.cursor && byKeyboard) {
        var row = self.geometry.rows.length - 1;
        self.cursor = { row: row, t: 0, mv: 0 };
        self.snapCursor();
      }
      self.draw();
    });
    this.canvas.addEventListener("blur", function () {
      if (self.cursor && self.data) {
        self.cursor = null;
        self.draw();
      }
    });
    var pending = null;
    window.addEventListener("resize", function () {
      if (self.userZoomed || !self.data) return;
      clearTimeout(pending);
      pending = setTimeout(function () {
        self.scale = null;
        self.draw();
      }, 150);
    });
  };

  Viewer.prototype.load = function () {
    var self = this;
    this.message("Loading ECG\u2026", TRACE);
    fetch(this.url(), { headers: { Accept: "application/json" }, credentials: "same-origin" })
      .then(function (response) {
        return response
          .json()
          .catch(function () {
            return {};
          })
          .then(function (body) {
            if (!response.ok) {
              throw new Error((body && body.detail) || "HTTP " + response.status);
            }
            return body;
          });
      })
      .then(function (data) {
        if (!data || !data.samples || !data.leads || !data.leads.length) throw new Error("the answer holds no samples");
        self.data = data;
        self.marks = leadMarks((data.study && data.study.flags) || [], data.leads);
        var preferred = data.leads.indexOf("II") >= 0 ? "II" : data.leads[0];
        self.rhythmLead = preferred;
        self.singleLead = preferred;
        self.gain = defaultGain(data.samples);
        self.q("gain").value = String(self.gain);
        self.fillLeads();
        self.fillHeatmaps();
        self.controls(true);
        self.draw();
        self.setState("ready");
      })
      .catch(function (err) {
        var text = "Could not load the ECG: " + (err && err.message ? err.message : String(err));
        self.message(text, RED);
        self.q("readout").textContent = text;
        self.canvas.setAttribute("aria-label", text);
        self.setState("error");
      });
  };

  /* Loading and error text, drawn where the ECG would be. */
  Viewer.prototype.message = function (text, colour) {
    var width = Math.max(320, (this.scroll.clientWidth || 900) - 4);
    var height = 160;
    var dpr = window.devicePixelRatio || 1;
    var c = this.canvas;
    c.width = Math.round(width * dpr);
    c.height = Math.round(height * dpr);
    c.style.width = width + "px";
    c.style.height = height + "px";
    var g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.fillStyle = "#ffffff";
    g.fillRect(0, 0, width, height);
    g.fillStyle = colour;
    g.font = "600 15px system-ui, sans-serif";
    g.textBaseline = "top";
    var words = text.split(/\s+/);
    var line = "";
    var y = 20;
    for (var i = 0; i < words.length; i++) {
      var next = line ? line + " " + words[i] : words[i];
      if (g.measureText(next).width > width - 40 && line) {
        g.fillText(line, 20, y);
        y += 20;
        line = words[i];
      } else {
        line = next;
      }
    }
    if (line) g.fillText(line, 20, y);
  };

  Viewer.prototype.fillLeads = function () {
    var select = this.q("lead");
    var current = this.mode === "12" ? this.rhythmLead : this.singleLead;
    select.textContent = "";
    (this.data ? this.data.leads : []).forEach(function (lead) {
      var option = document.createElement("option");
      option.value = lead;
      option.textContent = lead;
      option.selected = lead === current;
      select.appendChild(option);
    });
    this.q("lead-label").textContent = this.mode === "12" ? "Rhythm lead" : "Lead";
  };

  Viewer.prototype.heatCodes = function () {
    var h = this.data && this.data.heatmaps;
    return h && h.classes ? Object.keys(h.classes) : [];
  };

  Viewer.prototype.fillHeatmaps = function () {
    var select = this.q("heatmap");
    var h = this.data.heatmaps;
    select.textContent = "";
    var none = document.createElement("option");
    none.value = "";
    none.textContent = h && h.classes ? "none" : "none (no map stored)";
    select.appendChild(none);
    this.heatCodes().forEach(function (code) {
      var c = h.classes[code];
      var option = document.createElement("option");
      option.value = code;
      var p = typeof c.probability === "number" ? "p=" + fmt(c.probability, 2) : "p unknown";
      var present = c.present === true ? ", present" : c.present === false ? ", absent" : "";
      option.textContent = (c.display || code) + " (" + code + ", " + p + present + ")";
      select.appendChild(option);
    });
    select.value = "";
  };

  Viewer.prototype.zoom = function (direction) {
    if (!this.data) return;
    var i = SCALES.indexOf(this.scale);
    if (i < 0) i = 0;
    var next = SCALES[clamp(i + direction, 0, SCALES.length - 1)];
    if (next === this.scale) return;
    this.scale = next;
    this.userZoomed = true;
    this.draw();
  };

  Viewer.prototype.samples = function (lead) {
    return this.data.samples[lead] || null;
  };

  /* The centre (median) a panel's trace is drawn around, as printed carts do per panel. */
  Viewer.prototype.centre = function (lead, i0, i1) {
    var key = lead + ":" + i0 + ":" + i1;
    if (!(key in this.centres)) {
      var s = this.samples(lead);
      this.centres[key] = s ? median(s.slice(i0, i1)) : 0;
    }
    return this.centres[key];
  };

  Viewer.prototype.rowPitch = function () {
    return clamp(3 * this.gain, 25, 60);
  };

  /* Rows and panels in millimetres of paper. */
  Viewer.prototype.layout = function () {
    var d = this.data;
    var fs = d.fs;
    var n = d.n_samples;
    var self = this;
    var rows = [];
    var top = 0;
    function panel(lead, t0, t1, label) {
      var i0 = Math.round(t0 * fs);
      var i1 = Math.min(Math.round(t1 * fs), n);
      return { lead: lead, t0: t0, t1: t1, i0: i0, i1: i1, label: label, centre: self.centre(lead, i0, i1) };
    }
    var seconds;
    if (this.mode === "12") {
      seconds = PAGE_S;
      var pitch = this.rowPitch();
      LAYOUT.forEach(function (leads) {
        rows.push({
          top: top,
          h: pitch,
          base: top + pitch / 2,
          panels: leads.map(function (lead, c) {
            return panel(lead, c * COLUMN_S, (c + 1) * COLUMN_S, lead);
          }),
        });
        top += pitch;
      });
      rows.push({
        top: top,
        h: pitch,
        base: top + pitch / 2,
        panels: [panel(this.rhythmLead, 0, PAGE_S, this.rhythmLead + " (rhythm)")],
      });
      top += pitch;
    } else {
      seconds = Math.max(d.duration_s, 1);
      var lead = this.singleLead;
      var only = panel(lead, 0, seconds, lead);
      var r = this.samples(lead) ? range(this.samples(lead), 0) : [-1, 1];
      var above = Math.max(r[1] - only.centre, 1) * this.gain + 10; // room for the label and the pulse
      var below = Math.max(only.centre - r[0], 0.5) * this.gain + 4;
      var h = clamp(Math.ceil(above + below), 30, 250);
      rows.push({ top: 0, h: h, base: clamp(above, 0.2 * h, 0.8 * h), panels: [only] });
      top = h;
    }
    return {
      seconds: seconds,
      rows: rows,
      rowsBottom: top,
      wMm: LEAD_IN_MM + this.speed * seconds + RIGHT_MM,
      hMm: top + BOTTOM_MM,
    };
  };

  Viewer.prototype.fitScale = function (geometry) {
    var width = Math.max(300, (this.scroll.clientWidth || 1000) - 2);
    var height = Math.max(320, (window.innerHeight || 768) - 230);
    var fit = Math.min(width / geometry.wMm, Math.max(height / geometry.hMm, 4));
    var chosen = SCALES[0];
    SCALES.forEach(function (s) {
      if (s <= fit) chosen = s;
    });
    return chosen;
  };

  Viewer.prototype.x = function (t) {
    return (LEAD_IN_MM + this.speed * t) * this.scale;
  };

  Viewer.prototype.panelAt = function (row, t) {
    var panels = row.panels;
    for (var i = 0; i < panels.length; i++) {
      if (t >= panels[i].t0 && t < panels[i].t1) return panels[i];
    }
    return panels[panels.length - 1];
  };

  Viewer.prototype.yOf = function (row, panel, mv) {
    return (row.base - (mv - panel.centre) * this.gain) * this.scale;
  };

  Viewer.prototype.valueAt = function (lead, t) {
    var s = this.samples(lead);
    if (!s) return null;
    var i = clamp(Math.round(t * this.data.fs), 0, s.length - 1);
    return s[i];
  };

  /* A caliper point from paper millimetres: its row, time (s), amplitude (mV) and lead. */
  Viewer.prototype.pointAt = function (xMm, yMm) {
    var g = this.geometry;
    var rowIndex = -1;
    for (var r = 0; r < g.rows.length; r++) {
      if (yMm >= g.rows[r].top && yMm < g.rows[r].top + g.rows[r].h) rowIndex = r;
    }
    if (rowIndex < 0) rowIndex = yMm < 0 ? 0 : g.rows.length - 1;
    var row = g.rows[rowIndex];
    var t = clamp((xMm - LEAD_IN_MM) / this.speed, 0, g.seconds);
    var panel = this.panelAt(row, t);
    return { row: rowIndex, t: t, mv: panel.centre + (row.base - yMm) / this.gain, lead: panel.lead };
  };

  Viewer.prototype.addPoint = function (p) {
    if (this.points.length >= 2) this.points = [];
    this.points.push(p);
    this.draw();
  };

  Viewer.prototype.snapCursor = function () {
    var row = this.geometry.rows[this.cursor.row];
    var panel = this.panelAt(row, this.cursor.t);
    var v = this.valueAt(panel.lead, this.cursor.t);
    this.cursor.lead = panel.lead;
    this.cursor.mv = v === null ? panel.centre : v;
  };

  var CALIPER_KEYS = ["ArrowLeft", "ArrowRight", "ArrowUp", "ArrowDown", "PageUp", "PageDown", "Home", "End", "Enter", " ", "Escape"];

  Viewer.prototype.onCanvasKey = function (e) {
    if (!this.data || !this.geometry || e.ctrlKey || e.metaKey || e.altKey) return;
    if (CALIPER_KEYS.indexOf(e.key) < 0) return;
    var c = this.cursor;
    if (!c) {
      c = this.cursor = { row: this.geometry.rows.length - 1, t: 0, mv: 0 };
      this.snapCursor();
    }
    var big = e.shiftKey;
    var handled = true;
    switch (e.key) {
      case "ArrowLeft":
      case "ArrowRight":
        c.t = clamp(c.t + (e.key === "ArrowRight" ? 1 : -1) * (big ? 0.2 : 0.01), 0, this.geometry.seconds);
        c.t = Math.round(c.t * 1000) / 1000;
        this.snapCursor();
        break;
      case "ArrowUp":
      case "ArrowDown":
        c.mv += (e.key === "ArrowUp" ? 1 : -1) * (big ? 0.5 : 0.05);
        break;
      case "PageUp":
      case "PageDown":
        c.row = clamp(c.row + (e.key === "PageDown" ? 1 : -1), 0, this.geometry.rows.length - 1);
        this.snapCursor();
        break;
      case "Home":
        c.t = 0;
        this.snapCursor();
        break;
      case "End":
        c.t = this.geometry.seconds;
        this.snapCursor();
        break;
      case "Enter":
      case " ":
        var panel = this.panelAt(this.geometry.rows[c.row], c.t);
        this.addPoint({ row: c.row, t: c.t, mv: c.mv, lead: panel.lead });
        return e.preventDefault();
      case "Escape":
        this.points = [];
        break;
      default:
        handled = false;
    }
    if (handled) {
      e.preventDefault();
      this.draw();
    }
  };

  Viewer.prototype.describeCaliper = function () {
    var p = this.points;
    var c = this.cursor;
    var at = function (q) {
      return q.lead + " at " + fmt(q.t, 3) + " s, " + fmt(q.mv, 2) + " " + this.unit();
    }.bind(this);
    var text;
    if (p.length === 2) {
      var ms = Math.abs(p[1].t - p[0].t) * 1000;
      text = "Interval " + fmt(ms, 0) + " ms";
      if (ms > 0) text += " (rate " + fmt(60000 / ms, 0) + " /min if this is an RR interval)";
      if (p[0].lead === p[1].lead) {
        var dv = p[1].mv - p[0].mv;
        text += "; amplitude difference " + (dv >= 0 ? "+" : "") + fmt(dv, 2) + " " + this.unit() + " (" + p[0].lead + ")";
      } else {
        text += "; no amplitude difference: the points are on different leads (" + p[0].lead + ", " + p[1].lead + ")";
      }
    } else if (p.length === 1) {
      text = "Caliper: first point " + at(p[0]) + "; set the second point.";
    } else {
      text = "Caliper: click two points on the trace.";
    }
    if (c) text += " Cursor: " + at(c) + ".";
    return text;
  };

  Viewer.prototype.unit = function () {
    var u = (this.data && this.data.units) || "mV";
    return u.toLowerCase() === "zscore" ? "z" : u;
  };

  Viewer.prototype.legend = function () {
    var d = this.data;
    var parts = [this.speed + " mm/s", this.gain + " mm/" + this.unit(), "calibration pulse 1 " + this.unit()];
    if (this.unit() === "z") parts.push("z-score units: the source is not in mV");
    parts.push(fmt(d.fs, 0) + " Hz" + (d.source_fs !== d.fs ? " (recorded at " + fmt(d.source_fs, 0) + " Hz)" : ""));
    parts.push(
      d.truncated ? "first " + fmt(d.duration_s, 1) + " s of " + fmt(d.recording_s, 1) + " s" : fmt(d.duration_s, 1) + " s"
    );
    parts.push("unfiltered, each panel centred on its median");
    if (d.study) {
      parts.push(d.study.source_format + (d.study.device ? " (" + d.study.device + ")" : ""));
      if (d.study.flags && d.study.flags.length) parts.push("flags: " + d.study.flags.join(", "));
    }
    var text = parts.join(" \u00b7 ") + ".";
    var h = d.heatmaps;
    if (this.heat && h && h.classes && h.classes[this.heat]) {
      text +=
        " Blue: class activation map of " +
        (h.classes[this.heat].display || this.heat) +
        " from " +
        (h.model || "the model") +
        " " +
        (h.version || "") +
        " (positive evidence above its median, scaled to its maximum); it marks times, not leads.";
    }
    return text;
  };

  Viewer.prototype.draw = function () {
    if (!this.data) return;
    var geometry = this.layout();
    this.geometry = geometry;
    if (this.scale === null) this.scale = this.fitScale(geometry);
    var s = this.scale;
    var dpr = window.devicePixelRatio || 1;
    var W = Math.ceil(geometry.wMm * s);
    var H = Math.ceil(geometry.hMm * s);
    var c = this.canvas;
    c.width = Math.round(W * dpr);
    c.height = Math.round(H * dpr);
    c.style.width = W + "px";
    c.style.height = H + "px";
    var g = c.getContext("2d");
    g.setTransform(dpr, 0, 0, dpr, 0, 0);
    g.fillStyle = "#ffffff";
    g.fillRect(0, 0, W, H);
    this.drawGrid(g, W, H);
    this.drawHeat(g, geometry);
    var self = this;
    geometry.rows.forEach(function (row, r) {
      self.drawCalibration(g, row);
      row.panels.forEach(function (panel, k) {
        self.drawTrace(g, row, panel);
        if (self.mode === "12" && r < LAYOUT.length && k > 0) {
          var x = self.x(panel.t0);
          g.strokeStyle = TRACE;
          g.lineWidth = 1.5;
          g.beginPath();
          g.moveTo(x, (row.base - 3) * s);
          g.lineTo(x, (row.base + 3) * s);
          g.stroke();
        }
      });
      row.panels.forEach(function (panel) {
        self.drawLabel(g, row, panel);
      });
    });
    if (this.data.duration_s < geometry.seconds - 1e-6) {
      g.fillStyle = RED;
      g.font = "600 12px system-ui, sans-serif";
      g.textBaseline = "top";
      g.fillText(
        "recording ends at " +
          fmt(this.data.duration_s, 1) +
          " s" +
          (this.mode === "12" && this.data.duration_s < PAGE_S - COLUMN_S ? " (the single-lead view shows every lead)" : ""),
        this.x(this.data.duration_s) + 6,
        geometry.rowsBottom * s + 2
      );
    }
    this.drawCaliper(g, geometry);
    this.q("zoom-level").textContent = s + " px/mm";
    this.q("zoom-in").disabled = s >= SCALES[SCALES.length - 1];
    this.q("zoom-out").disabled = s <= SCALES[0];
    this.q("readout").textContent = this.describeCaliper();
    this.q("legend").textContent = this.legend();
    var view =
      this.mode === "12"
        ? "12-lead ECG, 3 by 4 layout with a lead " + this.rhythmLead + " rhythm strip"
        : "ECG lead " + this.singleLead + ", full length";
    var heat = this.heat ? ", heatmap of " + this.heat : "";
    c.setAttribute("aria-label", view + ", " + this.speed + " mm/s, " + this.gain + " mm/" + this.unit() + heat);
  };

  Viewer.prototype.drawGrid = function (g, W, H) {
    var s = this.scale;
    var wMm = W / s;
    var hMm = H / s;
    function lines(step, skipMajor, colour, width) {
      g.strokeStyle = colour;
      g.lineWidth = width;
      g.beginPath();
      for (var i = 0; i * step <= wMm + 1e-6; i++) {
        if (skipMajor && i % 5 === 0) continue;
        var x = Math.round(i * step * s) + 0.5;
        g.moveTo(x, 0);
        g.lineTo(x, H);
      }
      for (var j = 0; j * step <= hMm + 1e-6; j++) {
        if (skipMajor && j % 5 === 0) continue;
        var y = Math.round(j * step * s) + 0.5;
        g.moveTo(0, y);
        g.lineTo(W, y);
      }
      g.stroke();
    }
    if (s >= 3) lines(1, true, MINOR, 1);
    lines(5, false, MAJOR, s >= 5 ? 1.5 : 1);
  };

  Viewer.prototype.drawHeat = function (g, geometry) {
    var h = this.data.heatmaps;
    var map = this.heat && h && h.classes ? h.classes[this.heat] : null;
    if (!map || !map.values) return;
    var step = Number(map.step_s);
    var t0 = Number(map.t0_s) || 0;
    if (!(step > 0)) return;
    var bottom = geometry.rowsBottom * this.scale;
    for (var j = 0; j < map.values.length; j++) {
      var v = Number(map.values[j]);
      if (!(v > 0)) continue;
      var a = t0 + j * step;
      var b = Math.min(a + step, geometry.seconds);
      if (a >= geometry.seconds) break;
      var xa = this.x(a);
      g.fillStyle = "rgba(" + HEAT + ", " + fmt(HEAT_ALPHA * clamp(v, 0, 1), 3) + ")";
      g.fillRect(xa, 0, this.x(b) - xa, bottom);
    }
  };

  Viewer.prototype.drawCalibration = function (g, row) {
    var s = this.scale;
    var y0 = row.base * s;
    var y1 = (row.base - this.gain) * s; // 1 mV
    g.strokeStyle = TRACE;
    g.lineWidth = Math.max(1.2, s * 0.3);
    g.lineJoin = "miter";
    g.beginPath();
    g.moveTo(1 * s, y0);
    g.lineTo(3 * s, y0);
    g.lineTo(3 * s, y1);
    g.lineTo(8 * s, y1);
    g.lineTo(8 * s, y0);
    g.lineTo(9.5 * s, y0);
    g.stroke();
  };

  Viewer.prototype.drawTrace = function (g, row, panel) {
    var samples = this.samples(panel.lead);
    if (!samples || panel.i1 - panel.i0 < 2) return;
    var s = this.scale;
    var fs = this.data.fs;
    var k = this.gain * s;
    var base = row.base * s;
    var x0 = LEAD_IN_MM * s;
    var pxPerS = this.speed * s;
    g.strokeStyle = TRACE;
    g.lineWidth = Math.max(1.1, s * 0.28);
    g.lineJoin = "round";
    g.lineCap = "round";
    g.beginPath();
    var open = false;
    for (var i = panel.i0; i < panel.i1; i++) {
      var v = samples[i];
      if (v === null || !isFinite(v)) {
        open = false;
        continue;
      }
      var x = x0 + (i / fs) * pxPerS;
      var y = base - (v - panel.centre) * k;
      if (open) g.lineTo(x, y);
      else g.moveTo(x, y);
      open = true;
    }
    g.stroke();
  };

  Viewer.prototype.drawLabel = function (g, row, panel) {
    var s = this.scale;
    var present = !!this.samples(panel.lead);
    var marks = present ? (this.marks && this.marks[panel.lead]) || [] : ["absent"];
    var text = panel.label + (marks.length ? " (" + marks.join(", ") + ")" : "");
    var size = clamp(Math.round(s * 3), 11, 16);
    g.font = "700 " + size + "px system-ui, sans-serif";
    g.textBaseline = "top";
    var x = this.x(panel.t0) + 4;
    var y = row.top * s + 3;
    var w = g.measureText(text).width;
    g.fillStyle = "rgba(255, 255, 255, 0.75)";
    g.fillRect(x - 2, y - 1, w + 4, size + 3);
    g.fillStyle = marks.length ? RED : TRACE;
    g.fillText(text, x, y);
  };

  Viewer.prototype.drawCaliper = function (g, geometry) {
    var self = this;
    var s = this.scale;
    var bottom = geometry.rowsBottom * s;
    function mark(p, dashed) {
      var row = geometry.rows[p.row];
      if (!row) return;
      var panel = self.panelAt(row, p.t);
      var x = self.x(p.t);
      var y = self.yOf(row, panel, p.mv);
      g.strokeStyle = CALIPER;
      g.lineWidth = 1.5;
      g.setLineDash(dashed ? [4, 3] : []);
      g.beginPath();
      g.moveTo(x, 0);
      g.lineTo(x, bottom);
      g.stroke();
      g.beginPath();
      g.moveTo(x - 8, y);
      g.lineTo(x + 8, y);
      g.stroke();
      g.setLineDash([]);
      g.fillStyle = CALIPER;
      g.beginPath();
      g.arc(x, y, 3.5, 0, 2 * Math.PI);
      g.fill();
    }
    this.points.forEach(function (p) {
      mark(p, false);
    });
    if (this.points.length === 2) {
      var a = this.x(this.points[0].t);
      var b = this.x(this.points[1].t);
      var y = 4;
      g.strokeStyle = CALIPER;
      g.lineWidth = 2;
      g.beginPath();
      g.moveTo(a, y);
      g.lineTo(b, y);
      g.stroke();
      var ms = Math.abs(this.points[1].t - this.points[0].t) * 1000;
      var label = fmt(ms, 0) + " ms";
      g.font = "700 12px system-ui, sans-serif";
      g.textBaseline = "top";
      var w = g.measureText(label).width;
      var lx = clamp((a + b) / 2 - w / 2, 2, geometry.wMm * s - w - 2);
      g.fillStyle = "rgba(255, 255, 255, 0.85)";
      g.fillRect(lx - 3, y + 3, w + 6, 16);
      g.fillStyle = CALIPER;
      g.fillText(label, lx, y + 5);
    }
    if (this.cursor) mark(this.cursor, true);
  };

  function start() {
    var roots = document.querySelectorAll("[data-ecg-viewer]");
    for (var i = 0; i < roots.length; i++) {
      if (roots[i].getAttribute("data-bound") === "1") continue;
      roots[i].setAttribute("data-bound", "1");
      new Viewer(roots[i]).load();
    }
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", start);
  else start();
})();
