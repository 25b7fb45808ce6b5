// The dashboard of sluice-ingest: pick a stream and a range; the page shows the events per
// minute (or hour) as a line chart, the totals, and a bar chart of the top values of each of
// the stream's dimensions. In live mode it asks again every few seconds and updates the
// charts in place. Everything it shows comes from the documented API:
//   GET /v1/streams                          the streams and their dimensions
//   GET /v1/streams/{stream}/aggregates      the counts of a range
import "./style.css";
import {
  BarController,
  BarElement,
  CategoryScale,
  Chart,
  Filler,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
} from "chart.js";

Chart.register(
  BarController,
  BarElement,
  CategoryScale,
  Filler,
  LinearScale,
  LineController,
  LineElement,
  PointElement,
  Tooltip,
);

interface StreamInfo {
  name: string;
  topic: string;
  dimensions: string[];
}

interface Bucket {
  time: string;
  count: number;
}

interface TopValue {
  value: string;
  count: number;
}

interface Aggregates {
  stream: string;
  from: string;
  to: string;
  resolution: "minute" | "hour";
  total: number;
  series: Bucket[];
  dimensions: Record<string, TopValue[]>;
}

/** An answer other than 2xx, with the problem document's words when there is one. */
class ApiFailure extends Error {
  constructor(
    readonly status: number,
    message: string,
  ) {
    super(message);
  }
}

const RANGES: Record<string, number> = {
  "15m": 15 * 60,
  "1h": 3600,
  "6h": 6 * 3600,
  "24h": 24 * 3600,
  "7d": 7 * 24 * 3600,
  "30d": 30 * 24 * 3600,
};
const LIVE_EVERY_MS = 2000;
const TOP = 10;
const KEY_STORAGE = "sluice.apiKey";

function element<T extends HTMLElement>(id: string): T {
  const found = document.getElementById(id);
  if (!found) throw new Error(`the page has no #${id}`);
  return found as T;
}

const ui = {
  stream: element<HTMLSelectElement>("stream"),
  range: element<HTMLSelectElement>("range"),
  live: element<HTMLInputElement>("live"),
  status: element<HTMLSpanElement>("status"),
  error: element<HTMLParagraphElement>("error"),
  keyForm: element<HTMLFormElement>("key-form"),
  key: element<HTMLInputElement>("key"),
  seriesTitle: element<HTMLHeadingElement>("series-title"),
  series: element<HTMLCanvasElement>("series"),
  dimensions: element<HTMLElement>("dimensions"),
  streamDimensions: element<HTMLParagraphElement>("stream-dimensions"),
  peakLabel: element<HTMLSpanElement>("peak-label"),
  latestLabel: element<HTMLSpanElement>("latest-label"),
};

const numbers = new Intl.NumberFormat("en-US");
const css = getComputedStyle(document.documentElement);
const accent = css.getPropertyValue("--accent").trim() || "#2563eb";
const grid = css.getPropertyValue("--grid").trim() || "rgba(127,127,127,0.2)";
Chart.defaults.color = css.getPropertyValue("--muted").trim() || "#666";
Chart.defaults.borderColor = grid;
Chart.defaults.font.family = css.getPropertyValue("font-family");

let streams: StreamInfo[] = [];
let timer: number | undefined;
let inFlight: AbortController | undefined;
let seriesChart: Chart<"line"> | undefined;
const dimensionCharts = new Map<string, Chart<"bar">>();

function apiKey(): string | null {
  return localStorage.getItem(KEY_STORAGE);
}

async function api<T>(path: string, signal?: AbortSignal): Promise<T> {
  const headers: Record<string, string> = { Accept: "application/json" };
  const key = apiKey();
  if (key) headers.Authorization = `Bearer ${key}`;
  const response = await fetch(path, { headers, signal });
  if (!response.ok) {
    let message = `${response.status} ${response.statusText}`;
    try {
      const problem = (await response.json()) as { title?: string; detail?: string };
      message = problem.detail ?? problem.title ?? message;
    } catch {
      // Not a problem document: the status line says enough.
    }
    throw new ApiFailure(response.status, message);
  }
  return (await response.json()) as T;
}

function showError(message: string | null): void {
  ui.error.hidden = message === null;
  ui.error.textContent = message ?? "";
}

function needKey(failure: unknown): boolean {
  if (failure instanceof ApiFailure && failure.status === 401) {
    ui.keyForm.hidden = false;
    ui.key.focus();
    showError(apiKey() ? "The API key was refused." : null);
    return true;
  }
  return false;
}

/** Labels of the buckets in the viewer's time zone. */
function bucketLabel(time: string, resolution: Aggregates["resolution"]): string {
  const t = new Date(time);
  const hm = t.toLocaleTimeString(undefined, { hour: "2-digit", minute: "2-digit" });
  if (resolution === "minute") return hm;
  return `${t.toLocaleDateString(undefined, { month: "short", day: "numeric" })} ${hm}`;
}

function setText(testId: string, text: string): void {
  const target = document.querySelector<HTMLElement>(`[data-testid="${testId}"]`);
  if (target) target.textContent = text;
}

function drawSeries(a: Aggregates): void {
  const labels = a.series.map((b) => bucketLabel(b.time, a.resolution));
  const counts = a.series.map((b) => b.count);
  ui.seriesTitle.textContent = `Events per ${a.resolution}`;
  ui.series.setAttribute(
    "aria-label",
    `Events per ${a.resolution} of ${a.stream}, ${numbers.format(a.total)} in all`,
  );
  if (!seriesChart) {
    seriesChart = new Chart(ui.series, {
      type: "line",
      data: {
        labels,
        datasets: [
          {
            label: "events",
            data: counts,
            borderColor: accent,
            backgroundColor: `${accent}33`,
            fill: true,
            pointRadius: 0,
            pointHitRadius: 8,
            cubicInterpolationMode: "monotone",
          },
        ],
      },
      options: {
        animation: false,
        maintainAspectRatio: false,
        interaction: { mode: "index", intersect: false },
        scales: {
          x: { ticks: { maxTicksLimit: 12, autoSkip: true } },
          y: { beginAtZero: true, ticks: { precision: 0 } },
        },
      },
    });
    return;
  }
  seriesChart.data.labels = labels;
  const dataset = seriesChart.data.datasets[0];
  if (dataset) dataset.data = counts;
  seriesChart.update("none");
}

/** A card per dimension: a horizontal bar chart of its top values and the same as a table. */
function dimensionCard(pointer: string): Chart<"bar"> {
  const existing = dimensionCharts.get(pointer);
  if (existing) return existing;
  const card = document.createElement("section");
  card.className = "card";
  card.dataset.dimension = pointer;
  const title = document.createElement("h2");
  title.textContent = `Top ${pointer}`;
  const box = document.createElement("div");
  box.className = "chart";
  const canvas = document.createElement("canvas");
  canvas.setAttribute("role", "img");
  canvas.setAttribute("aria-label", `Top values of ${pointer}`);
  box.append(canvas);
  const table = document.createElement("table");
  table.innerHTML = '<thead><tr><th scope="col">Value</th><th scope="col">Events</th></tr></thead><tbody></tbody>';
  card.append(title, box, table);
  ui.dimensions.append(card);
  const chart = new Chart(canvas, {
    type: "bar",
    data: {
      labels: [],
      datasets: [{ label: "events", data: [], backgroundColor: accent, borderRadius: 3 }],
    },
    options: {
      animation: false,
      maintainAspectRatio: false,
      indexAxis: "y",
      scales: { x: { beginAtZero: true, ticks: { precision: 0 } } },
    },
  });
  dimensionCharts.set(pointer, chart);
  return chart;
}

function drawDimensions(a: Aggregates): void {
  for (const [pointer, top] of Object.entries(a.dimensions)) {
    const chart = dimensionCard(pointer);
    chart.data.labels = top.map((t) => t.value);
    const dataset = chart.data.datasets[0];
    if (dataset) dataset.data = top.map((t) => t.count);
    chart.update("none");
    const body = ui.dimensions.querySelector<HTMLElement>(
      `section[data-dimension="${CSS.escape(pointer)}"] tbody`,
    );
    if (!body) continue;
    body.replaceChildren(
      ...(top.length === 0
        ? [row("no events in this range", "")]
        : top.map((t) => row(t.value, numbers.format(t.count)))),
    );
  }
}

function row(value: string, count: string): HTMLTableRowElement {
  const tr = document.createElement("tr");
  const v = document.createElement("td");
  v.textContent = value;
  const c = document.createElement("td");
  c.textContent = count;
  c.className = "count";
  tr.append(v, c);
  return tr;
}

function drawTotals(a: Aggregates): void {
  const unit = a.resolution;
  ui.peakLabel.textContent = `Busiest ${unit}`;
  ui.latestLabel.textContent = `This ${unit}`;
  setText("total", numbers.format(a.total));
  setText("peak", numbers.format(Math.max(0, ...a.series.map((b) => b.count))));
  setText("latest", numbers.format(a.series.at(-1)?.count ?? 0));
  const from = new Date(a.from).toLocaleString();
  const to = new Date(a.to).toLocaleString();
  setText("range-text", `${from} – ${to}`);
}

function resetDimensions(): void {
  for (const chart of dimensionCharts.values()) chart.destroy();
  dimensionCharts.clear();
  ui.dimensions.replaceChildren();
}

/** Asks for the chosen stream and range and redraws; one request at a time. */
async function refresh(): Promise<void> {
  const stream = ui.stream.value;
  if (!stream) return;
  inFlight?.abort();
  const controller = new AbortController();
  inFlight = controller;
  const seconds = RANGES[ui.range.value] ?? 3600;
  const to = new Date();
  const from = new Date(to.getTime() - seconds * 1000);
  const query = new URLSearchParams({
    from: from.toISOString(),
    to: to.toISOString(),
    top: String(TOP),
  });
  ui.status.textContent = "loading…";
  try {
    const a = await api<Aggregates>(
      `/v1/streams/${encodeURIComponent(stream)}/aggregates?${query}`,
      controller.signal,
    );
    if (a.stream !== ui.stream.value) return;
    showError(null);
    drawTotals(a);
    drawSeries(a);
    drawDimensions(a);
    ui.status.textContent = `${ui.live.checked ? "live · " : ""}updated ${new Date().toLocaleTimeString()}`;
  } catch (failure) {
    if (controller.signal.aborted) return;
    ui.status.textContent = "";
    if (!needKey(failure)) {
      showError(`Could not read the counts of ${stream}: ${(failure as Error).message}`);
    }
  } finally {
    if (inFlight === controller) inFlight = undefined;
  }
}

function schedule(): void {
  window.clearInterval(timer);
  timer = undefined;
  if (ui.live.checked) {
    timer = window.setInterval(() => {
      if (!document.hidden && !inFlight) void refresh();
    }, LIVE_EVERY_MS);
  }
}

/** The choices live in the address, so a view can be bookmarked and shared. */
function remember(): void {
  const params = new URLSearchParams({
    stream: ui.stream.value,
    range: ui.range.value,
    live: ui.live.checked ? "1" : "0",
  });
  history.replaceState(null, "", `${location.pathname}?${params}`);
}

function describeStream(): void {
  const info = streams.find((s) => s.name === ui.stream.value);
  if (!info) return;
  ui.streamDimensions.textContent =
    info.dimensions.length === 0
      ? `${info.name} has no dimensions: add JSON pointers to its "dimensions" in the pipeline settings to count values here.`
      : `${info.name} (topic ${info.topic}) counts ${info.dimensions.join(", ")}.`;
}

async function loadStreams(): Promise<void> {
  try {
    const answer = await api<{ streams: StreamInfo[] }>("/v1/streams");
    streams = answer.streams;
  } catch (failure) {
    if (!needKey(failure)) showError(`Could not list the streams: ${(failure as Error).message}`);
    return;
  }
  ui.keyForm.hidden = true;
  showError(null);
  const params = new URLSearchParams(location.search);
  const wanted = params.get("stream");
  ui.stream.replaceChildren(
    ...streams.map((s) => {
      const option = document.createElement("option");
      option.value = s.name;
      option.textContent = s.name;
      return option;
    }),
  );
  if (streams.length === 0) {
    showError("This pipeline has no streams.");
    return;
  }
  const withDimensions = streams.find((s) => s.dimensions.length > 0);
  ui.stream.value =
    wanted && streams.some((s) => s.name === wanted)
      ? wanted
      : (withDimensions ?? streams[0])?.name ?? "";
  const range = params.get("range");
  if (range && range in RANGES) ui.range.value = range;
  if (params.get("live") === "0") ui.live.checked = false;
  describeStream();
  remember();
  schedule();
  await refresh();
}

ui.stream.addEventListener("change", () => {
  resetDimensions();
  describeStream();
  remember();
  void refresh();
});
ui.range.addEventListener("change", () => {
  remember();
  void refresh();
});
ui.live.addEventListener("change", () => {
  remember();
  schedule();
  void refresh();
});
ui.keyForm.addEventListener("submit", (event) => {
  event.preventDefault();
  localStorage.setItem(KEY_STORAGE, ui.key.value.trim());
  ui.key.value = "";
  void loadStreams();
});
document.addEventListener("visibilitychange", () => {
  if (!document.hidden && ui.live.checked) void refresh();
});

void loadStreams();
