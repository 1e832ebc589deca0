// The hoopai-proxy dashboard: reads status.json every two seconds and draws it.
// Every value from the data goes into the page as text (textContent) or as a number in an
// attribute, never as markup; links are made only from http(s) URLs.
"use strict";
(() => {
  const POLL_MS = 2000;
  const ROWS_SHOWN = 200;
  const TOKEN_KEY = "hoopai-proxy-admin-token";
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);

  let token = "";
  let selected = ""; // the charted resource's key, "" for every resource together
  let wanted = ""; // "kind:id" named by the fragment (#resource=...), charted once seen
  let latest = null; // the last status.json, to redraw the chart when a row is clicked
  let timer = 0;
  let polls = 0;

  // -- the admin token ----------------------------------------------------------------

  function fragment(name) {
    const match = new RegExp("(?:^#|&)" + name + "=([^&]*)").exec(location.hash);
    if (!match) return null;
    try {
      return decodeURIComponent(match[1]);
    } catch (error) {
      return "";
    }
  }

  function readFragment() {
    wanted = fragment("resource") || "";
    const given = fragment("token");
    if (given !== null) {
      // Out of the address bar (and this history entry) at once.
      const rest = wanted ? "#resource=" + encodeURIComponent(wanted) : "";
      history.replaceState(null, "", location.pathname + location.search + rest);
      keepToken(given);
      return;
    }
    try {
      token = sessionStorage.getItem(TOKEN_KEY) || "";
    } catch (error) {
      token = "";
    }
  }

  function keepToken(value) {
    token = value;
    try {
      sessionStorage.setItem(TOKEN_KEY, value);
    } catch (error) {
      // Storage refused (a private window): the token lives until the tab reloads.
    }
  }

  function askForToken(reason) {
    setState("login", reason);
    $("login-reason").textContent = reason;
    $("login").hidden = false;
    $("token").focus();
  }

  $("login").addEventListener("submit", (event) => {
    event.preventDefault();
    keepToken($("token").value);
    $("token").value = "";
    $("login").hidden = true;
    poll();
  });

  // -- polling ------------------------------------------------------------------------

  async function poll() {
    clearTimeout(timer);
    try {
      const headers = token ? { Authorization: "Bearer " + token } : {};
      const answer = await fetch("status.json", { headers, cache: "no-store", credentials: "omit" });
      if (answer.status === 401) {
        askForToken(token ? "The admin token was refused." : "This proxy needs its admin token.");
        return;
      }
      if (!answer.ok) throw new Error("HTTP " + answer.status);
      latest = await answer.json();
      render(latest);
      polls += 1;
      document.body.dataset.polls = String(polls);
      setState("ok", "Updated " + new Date().toLocaleTimeString() + ", every " + POLL_MS / 1000 + " s.");
    } catch (error) {
      setState("error", "Cannot read status.json (" + ((error && error.message) || error) + "); trying again.");
    }
    timer = setTimeout(poll, POLL_MS);
  }

  function setState(state, message) {
    document.body.dataset.state = state;
    $("state").textContent = message;
  }

  // -- formatting -----------------------------------------------------------------------

  function num(value) {
    const n = Number(value);
    return Number.isFinite(n) ? n.toLocaleString("en-US") : "-";
  }

  function duration(seconds) {
    if (!Number.isFinite(seconds)) return "-";
    const s = Math.max(0, seconds);
    if (s < 90) return Math.round(s) + " s";
    if (s < 90 * 60) return Math.round(s / 60) + " min";
    return Math.floor(s / 3600) + " h " + Math.floor((s % 3600) / 60) + " min";
  }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function svg(tag, attributes, text) {
    const node = document.createElementNS(SVG_NS, tag);
    for (const [name, value] of Object.entries(attributes)) node.setAttribute(name, String(value));
    if (text !== undefined) node.textContent = String(text);
    return node;
  }

  function safeUrl(text) {
    try {
      const url = new URL(String(text), location.href);
      return url.protocol === "https:" || url.protocol === "http:" ? url.href : "";
    } catch (error) {
      return "";
    }
  }

  function resourceKey(app, kind, id) {
    return String(app) + " " + String(kind) + ":" + String(id);
  }

  // -- the page -------------------------------------------------------------------------

  function render(data) {
    const now = typeof data.now === "number" ? data.now : Date.now() / 1000;
    const resources = Array.isArray(data.resources) ? data.resources : [];
    const reauth = Array.isArray(data.needs_reauth) ? data.needs_reauth : [];
    const dead = new Set(reauth.map((entry) => resourceKey(entry.app_id, entry.kind, entry.id)));
    if (wanted) {
      const named = resources.find((r) => r.kind + ":" + r.id === wanted);
      if (named) [selected, wanted] = [resourceKey(named.app, named.kind, named.id), ""];
    }
    renderLimits(data.limits || {});
    renderReauth(reauth, now);
    renderSummary(data, resources, now);
    renderRows(resources, now, dead, Number(data.chart_span_s) || 300);
    renderChart(data, resources, now);
  }

  function renderLimits(limits) {
    $("limits").textContent =
      "Mode " + (limits.mode || "-") + ". Configured limits: " + num(limits.burst) + " per " +
      num(limits.window_s) + " s, " + num(limits.daily) + " a day.";
  }

  function renderReauth(entries, now) {
    const list = $("reauth-list");
    list.replaceChildren();
    for (const entry of entries) {
      const item = el("li");
      item.append(el("strong", "", entry.kind + ":" + entry.id));
      item.append(" of app " + entry.app + " (" + entry.app_id + ")");
      if (typeof entry.since === "number") item.append(", for " + duration(now - entry.since));
      else if (entry.since) item.append(", since " + entry.since);
      const url = safeUrl(entry.install_url);
      if (url) {
        const link = el("a", "install", "install link");
        link.href = url;
        link.rel = "noopener noreferrer";
        link.target = "_blank";
        item.append(" ", link);
      } else if (entry.install_url) {
        item.append(" install URL: " + entry.install_url);
      }
      list.append(item);
    }
    $("reauth").hidden = entries.length === 0;
  }

  function renderSummary(data, resources, now) {
    const second = Math.floor(now);
    let minute = 0;
    for (const pair of Array.isArray(data.admitted_per_s) ? data.admitted_per_s : []) {
      if (pair[0] > second - 60 && pair[0] <= second) minute += Number(pair[1]) || 0;
    }
    const waiting = resources.reduce((sum, row) => sum + (Number(row.waiting) || 0), 0);
    const refused = Number(data.upstream_429s) || 0;
    $("sum-resources").textContent = num(resources.length);
    $("sum-waiting").textContent = num(waiting);
    $("sum-minute").textContent = num(minute);
    $("sum-429").textContent = num(refused);
    $("sum-429").classList.toggle("bad", refused > 0);
  }

  function renderRows(resources, now, dead, span) {
    const rows = resources.slice(0, ROWS_SHOWN).map((row) => renderRow(row, now, dead, span));
    $("rows").replaceChildren(...rows);
    const more = resources.length - rows.length;
    $("more").hidden = more <= 0;
    $("more").textContent = "Showing the " + num(rows.length) + " resources seen most recently of " +
      num(resources.length) + " (all are in status.json).";
  }

  function renderRow(row, now, dead, span) {
    const limits = row.limits || {};
    const key = resourceKey(row.app, row.kind, row.id);
    const tr = el("tr");
    tr.dataset.resource = row.kind + ":" + row.id;
    tr.dataset.app = String(row.app);
    tr.classList.toggle("selected", key === selected);
    tr.classList.toggle("near", row.near_daily_limit === true);
    tr.addEventListener("click", () => {
      selected = selected === key ? "" : key;
      if (latest) render(latest);
    });

    const name = el("td", "resource");
    name.append(el("strong", "", row.kind + ":" + row.id), el("br"), el("small", "", "app " + row.app));
    if (limits.learned) name.append(" ", el("span", "tag", "limits learned from upstream"));
    tr.append(name);

    const burstUsed = Math.max(0, (Number(limits.burst) || 0) - (Number(row.burst_remaining) || 0));
    const burst = el("td", "burst");
    burst.append(meter("burst", burstUsed, limits.burst));
    let burstText = num(burstUsed) + " of " + num(limits.burst) + " per " + num(limits.window_s) + " s";
    const upstream = row.upstream && row.upstream["X-RateLimit-Remaining"];
    if (upstream !== undefined) burstText += "; upstream: " + upstream + " left";
    burst.append(el("div", "figure", burstText));
    tr.append(burst);

    const daily = el("td", "daily");
    const used = row.daily_used;
    daily.append(meter("daily", used === null || used === undefined ? 0 : used, limits.daily));
    let dailyText;
    if (used === null || used === undefined) {
      dailyText = "- of " + num(limits.daily) + " (no decision this limit day)";
    } else {
      const share = limits.daily ? Math.floor((100 * used) / limits.daily) : 0;
      dailyText = num(used) + " of " + num(limits.daily) + " (" + share + "%), projected " + num(row.daily_projected);
      if (row.near_daily_limit === true) dailyText += ", near limit";
    }
    daily.append(el("div", "figure", dailyText));
    tr.append(daily);

    const waiting = Number(row.waiting) || 0;
    tr.append(el("td", "waiting" + (waiting > 0 ? " busy" : ""), num(waiting)));
    const refused = Number(row.upstream_429s) || 0;
    tr.append(el("td", "upstream-429" + (refused > 0 ? " bad" : ""), num(refused)));
    tr.append(tokenCell(row, now, dead.has(key)));

    const chart = el("td", "chart");
    const values = perSecond(row.admitted_per_s, now, span);
    const limit = limitPerSecond(limits);
    chart.append(sparkline(windowAverage(values, limits.window_s), limit));
    chart.title = "average over the burst window; dashed: the limit, " + num(limit) + " a second";
    tr.append(chart);

    tr.append(el("td", "seen", duration(now - Number(row.last_seen)) + " ago"));
    return tr;
  }

  function meter(kind, value, max) {
    const bar = el("meter", kind);
    const top = Math.max(1, Number(max) || 0);
    bar.min = 0;
    bar.max = top;
    bar.low = top * 0.5;
    bar.high = top * 0.8;
    bar.optimum = 0;
    bar.value = Math.max(0, Number(value) || 0);
    return bar;
  }

  function tokenCell(row, now, needsReauth) {
    if (needsReauth) return el("td", "token bad", "needs a new install");
    const expires = row.token_expires_at;
    if (typeof expires !== "number") return el("td", "token", "none cached");
    const left = expires - now;
    return el("td", "token" + (left <= 0 ? " bad" : ""), left <= 0 ? "expired" : "expires in " + duration(left));
  }

  // -- charts ---------------------------------------------------------------------------

  function perSecond(pairs, now, span) {
    const last = Math.floor(now);
    const values = new Array(span).fill(0);
    for (const pair of Array.isArray(pairs) ? pairs : []) {
      const index = Number(pair[0]) - (last - span + 1);
      if (index >= 0 && index < span) values[index] += Number(pair[1]) || 0;
    }
    return values;
  }

  // Requests per second over the trailing burst window: what the limit bounds.
  function windowAverage(values, windowS) {
    const width = Math.max(1, Math.round(Number(windowS) || 1));
    const averaged = [];
    let sum = 0;
    values.forEach((value, index) => {
      sum += value - (index >= width ? values[index - width] : 0);
      averaged.push(sum / width);
    });
    return averaged;
  }

  function limitPerSecond(limits) {
    const window = Math.max(1, Math.round(Number(limits.window_s) || 1));
    return (Number(limits.burst) || 0) / window;
  }

  function scale(series, limit) {
    let top = limit ? limit * 1.25 : 1;
    for (const values of series) for (const value of values) top = Math.max(top, value);
    return top;
  }

  function polyline(values, width, height, top, className) {
    const step = values.length > 1 ? width / (values.length - 1) : 0;
    const points = values.map(
      (value, index) => (index * step).toFixed(1) + "," + (height - (value / top) * height).toFixed(1),
    );
    return svg("polyline", { class: className, points: points.join(" ") });
  }

  function limitLine(limit, width, height, top) {
    const y = (height - (limit / top) * height).toFixed(1);
    return svg("line", { class: "limit", x1: 0, x2: width, y1: y, y2: y });
  }

  function sparkline(values, limit) {
    const width = 150;
    const height = 30;
    const top = scale([values], limit);
    const chart = svg("svg", { viewBox: "0 0 " + width + " " + height, class: "spark" });
    chart.append(polyline(values, width, height, top, "average"));
    if (limit) chart.append(limitLine(limit, width, height, top));
    return chart;
  }

  function renderChart(data, resources, now) {
    const span = Number(data.chart_span_s) || 300;
    const row = resources.find((r) => resourceKey(r.app, r.kind, r.id) === selected);
    if (!row) selected = "";
    const chart = $("chart");
    const width = 850;
    const height = 140;
    const plot = svg("g", { transform: "translate(45,8)" });
    let series;
    let limit = 0;
    if (row) {
      const limits = row.limits || {};
      const values = perSecond(row.admitted_per_s, now, span);
      limit = limitPerSecond(limits);
      series = [
        [values, "per-second"],
        [windowAverage(values, limits.window_s), "average"],
      ];
      $("chart-title").textContent = "Admitted per second, " + row.kind + ":" + row.id +
        " (limit " + num(limits.burst) + " per " + num(limits.window_s) + " s)";
      $("chart-note").textContent = "Light: each second; solid: averaged over the burst window; dashed: the limit. Click the row again for every resource.";
    } else {
      const values = perSecond(data.admitted_per_s, now, span);
      const windowS = (data.limits || {}).window_s;
      series = [
        [values, "per-second"],
        [windowAverage(values, windowS), "average total"],
      ];
      $("chart-title").textContent = "Admitted per second, all resources";
      $("chart-note").textContent = "Light: each second; solid: averaged over the configured burst window (" +
        num(windowS) + " s). Click a resource to chart it against its limit.";
    }
    const top = scale(series.map((s) => s[0]), limit);
    plot.append(svg("rect", { class: "frame", x: 0, y: 0, width, height }));
    for (const [values, className] of series) plot.append(polyline(values, width, height, top, className));
    if (limit) plot.append(limitLine(limit, width, height, top));
    plot.append(
      svg("text", { x: -6, y: 4, class: "axis end" }, num(Math.round(top * 10) / 10)),
      svg("text", { x: -6, y: height, class: "axis end" }, "0"),
      svg("text", { x: 0, y: height + 16, class: "axis" }, "-" + duration(span)),
      svg("text", { x: width, y: height + 16, class: "axis end" }, "now"),
    );
    chart.replaceChildren(plot);
  }

  readFragment();
  poll();
})();
