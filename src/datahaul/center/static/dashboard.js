// The datahaul dashboard: polls /v1/live every second and redraws the page.
// Data is placed with textContent only, so a file name can never become markup.
"use strict";

const POLL_MS = 1000;
const FEED_LOST_AFTER_MS = 5000;
let lastSuccess = 0;

function el(tag, attrs = {}, children = []) {
  const node = document.createElement(tag);
  for (const [name, value] of Object.entries(attrs)) {
    if (name === "text") node.textContent = value;
    else if (name === "class") node.className = value;
    else if (name === "data") Object.assign(node.dataset, value);
    else node.setAttribute(name, value);
  }
  for (const child of children) node.append(child);
  return node;
}

function bytes(value) {
  if (value === null || value === undefined) return "–";
  const units = ["B", "KiB", "MiB", "GiB", "TiB"];
  let size = Number(value);
  let unit = 0;
  while (size >= 1024 && unit < units.length - 1) {
    size /= 1024;
    unit += 1;
  }
  return unit === 0 ? `${size} B` : `${size.toFixed(size < 10 ? 2 : 1)} ${units[unit]}`;
}

function age(seconds) {
  if (seconds === null || seconds === undefined) return "–";
  const s = Math.max(0, Math.round(seconds));
  if (s < 60) return `${s}s ago`;
  if (s < 3600) return `${Math.floor(s / 60)}m ${s % 60}s ago`;
  if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m ago`;
  return `${Math.floor(s / 86400)}d ago`;
}

function percent(part, whole) {
  return whole > 0 ? Math.min(100, (100 * part) / whole) : 0;
}

function bar(fraction, label, extra = "") {
  return el("div", { class: `meter ${extra}` }, [
    el("div", { class: "bar" }, [el("div", { style: `width: ${fraction.toFixed(1)}%` })]),
    el("span", { text: label }),
  ]);
}

function plural(count, word) {
  return `${count} ${word}${count === 1 ? "" : "s"}`;
}

function fileCell(file) {
  return el("td", {}, [
    el("div", { class: "name", text: file.file_name || file.file_id }),
    el("div", { class: "id", text: file.file_id }),
  ]);
}

function fill(tableId, rows, emptyId) {
  const body = document.querySelector(`#${tableId} tbody`);
  body.replaceChildren(...rows);
  if (emptyId) document.getElementById(emptyId).classList.toggle("hidden", rows.length > 0);
}

function drawInFlight(live) {
  const rows = live.in_flight.map((file) => {
    const done = file.received;
    const total = file.total_seq;
    const label = `${done} / ${total} packets · ${percent(done, total).toFixed(0)}%`;
    return el("tr", { data: { fileId: file.file_id, state: file.state, received: done, total } }, [
      fileCell(file),
      el("td", {}, [el("span", { class: "badge", text: file.type })]),
      el("td", { text: file.device_id || "–" }),
      el("td", { class: "progress" }, [
        bar(percent(done, total), label, file.state === "assembling" ? "done" : ""),
      ]),
      el("td", { class: "num", text: bytes(file.received_bytes) }),
      el("td", { text: age(live.now - file.updated_at) }),
    ]);
  });
  fill("in-flight", rows, "in-flight-empty");
}

function drawRecent(live) {
  const rows = live.recent.map((file) => {
    const link = file.state === "stored"
      ? el("a", { href: `/v1/files/${encodeURIComponent(file.file_id)}/content`, text: "download" })
      : el("span", { class: "id", text: file.error || "" });
    return el("tr", { data: { fileId: file.file_id, state: file.state } }, [
      fileCell(file),
      el("td", {}, [el("span", { class: "badge", text: file.type })]),
      el("td", {}, [el("span", { class: `badge ${file.state}`, text: file.state })]),
      el("td", { class: "num", text: bytes(file.size) }),
      el("td", { class: "mono", text: (file.sha256 || "").slice(0, 16) }),
      el("td", { text: file.device_id || "–" }),
      el("td", { text: age(live.now - (file.stored_at || file.updated_at)) }),
      el("td", {}, [link]),
    ]);
  });
  fill("recent", rows, "recent-empty");
}

function drawQueues(live) {
  const rows = live.queues.map((queue) => {
    const known = queue.state === "ok";
    return el("tr", { data: { queue: queue.queue } }, [
      el("td", {}, [
        el("span", { text: `${queue.queue} ` }),
        known ? "" : el("span", { class: `badge ${queue.state}`, text: queue.state }),
      ]),
      el("td", { class: "num", text: known ? String(queue.messages) : "–" }),
      el("td", { class: "num", text: known ? String(queue.consumers) : "–" }),
    ]);
  });
  fill("queues", rows);
}

function drawGateways(live) {
  const rows = live.gateways.map((gateway) => {
    const used = percent(gateway.outbox_bytes, gateway.outbox_quota_bytes);
    return el("tr", { data: { gateway: gateway.gateway_id, link: gateway.link } }, [
      el("td", { class: "mono", text: gateway.gateway_id }),
      el("td", {}, [el("span", { class: `badge ${gateway.link}`, text: gateway.link })]),
      el("td", { class: "num", text: `${gateway.outbox_packets} pkts · ${bytes(gateway.outbox_bytes)}` }),
      el("td", {}, [bar(used, `${used.toFixed(1)}%`, used > 80 ? "full" : "")]),
      el("td", { text: age(gateway.age_seconds) }),
    ]);
  });
  fill("gateways", rows, "gateways-empty");
}

function drawCards(live) {
  const through = live.throughput;
  document.getElementById("throughput").textContent = `${bytes(through.bytes_per_second)}/s`;
  document.getElementById("stored-minute").textContent = plural(through.files, "file");
  document.getElementById("stored-total").textContent =
    `${bytes(through.bytes)} in the last 60 s · ${live.states.stored || 0} stored in all`;

  document.getElementById("in-flight-count").textContent = String(live.in_flight_count);
  const idle = live.oldest_receiving_idle_seconds;
  document.getElementById("stuck-note").textContent = idle > 60
    ? `oldest idle for ${age(idle).replace(" ago", "")}`
    : "files receiving or assembling";

  const dead = live.dead_letters;
  document.getElementById("dead-letters").textContent = dead === null ? "–" : String(dead);
  document.getElementById("dead-card").classList.toggle("alarm", Boolean(dead));

  const broker = document.getElementById("broker");
  broker.textContent = live.broker.up ? "broker up" : "broker down";
  broker.className = `badge ${live.broker.up ? "up" : "down"}`;
  broker.title = live.broker.error || "";
  drawSparkline(through.series);
}

function drawSparkline(series) {
  const canvas = document.getElementById("sparkline");
  const context = canvas.getContext("2d");
  const { width, height } = canvas;
  context.clearRect(0, 0, width, height);
  const top = Math.max(1, ...series);
  const step = width / series.length;
  context.fillStyle = "#2f6fdf";
  series.forEach((value, index) => {
    const h = Math.max(value > 0 ? 2 : 0, (value / top) * (height - 2));
    context.fillRect(index * step, height - h, Math.max(1, step - 1), h);
  });
}

function showFeed(state, text) {
  const feed = document.getElementById("feed");
  feed.className = `feed ${state}`;
  feed.querySelector("b").textContent = text;
}

async function poll() {
  try {
    const response = await fetch("/v1/live", { cache: "no-store" });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const live = await response.json();
    drawCards(live);
    drawInFlight(live);
    drawQueues(live);
    drawGateways(live);
    drawRecent(live);
    lastSuccess = Date.now();
    showFeed("live", `live · ${new Date(live.now * 1000).toLocaleTimeString()}`);
  } catch (error) {
    if (Date.now() - lastSuccess > FEED_LOST_AFTER_MS) {
      showFeed("lost", `feed lost (${error.message})`);
    }
  } finally {
    setTimeout(poll, POLL_MS);
  }
}

poll();
