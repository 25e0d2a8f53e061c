// cnclip search page: text search, image search (file picker, drag and drop, paste), a lightbox.
// No framework and no CDN; data from the API is only ever put into the page as text, never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const state = { hits: [], current: -1 };

class ApiError extends Error {
  constructor(status, message) {
    super(message);
    this.status = status;
  }
}

async function api(url, options) {
  // The token, when the server has one, travels in a same-site cookie set by /?token=...
  const response = await fetch(url, { credentials: "same-origin", ...options });
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    // not JSON: reported below by status
  }
  if (!response.ok) {
    throw new ApiError(response.status, (body && body.error) || `请求失败（HTTP ${response.status}）`);
  }
  return body;
}

function showError(error) {
  if (error instanceof ApiError && error.status === 401) {
    $("token-form").hidden = false;
    $("token").focus();
  }
  $("error").textContent = error instanceof ApiError ? error.message : `无法连接服务器：${error.message}`;
  $("error").hidden = false;
}

function clearMessages() {
  $("error").hidden = true;
  $("error").textContent = "";
}

function setStatus(text, imageUrl) {
  const status = $("status");
  status.replaceChildren();
  if (imageUrl) {
    const img = document.createElement("img");
    img.src = imageUrl;
    img.alt = "查询图片";
    status.append(img);
  }
  status.append(document.createTextNode(text));
}

function showResults(data, what, imageUrl) {
  state.hits = data.results;
  const grid = $("results");
  grid.replaceChildren();
  data.results.forEach((hit, i) => {
    const figure = document.createElement("figure");
    figure.className = "hit";
    const open = document.createElement("button");
    open.type = "button";
    open.title = hit.path;
    open.addEventListener("click", () => openLightbox(i));
    const img = document.createElement("img");
    img.loading = "lazy";
    img.src = hit.thumb;
    img.alt = hit.name;
    open.append(img);
    const caption = document.createElement("figcaption");
    const score = document.createElement("span");
    score.className = "score";
    score.textContent = hit.score.toFixed(3);
    const name = document.createElement("span");
    name.className = "name";
    name.textContent = hit.t !== null && hit.t !== undefined ? `▶ ${clock(hit.t)} ${hit.name}` : hit.name;
    const like = document.createElement("button");
    like.type = "button";
    like.className = "like";
    like.textContent = "更像这张";
    like.title = "把这张照片加到搜索文字里，再搜一次";
    like.addEventListener("click", () => searchLike(hit));
    caption.append(score, name, like);
    if (hit.words) caption.append(wordsLine(hit.words));
    figure.append(open, caption);
    grid.append(figure);
  });
  $("hint").hidden = data.count > 0;
  const found = data.count > 0 ? `找到 ${data.count} 张图片` : "没有找到图片";
  setStatus(`${what}：${found}，用时 ${Math.round(data.took_ms)} 毫秒`, imageUrl);
}

// A line of words with the [start, end) character ranges in `spans` marked (nodes, never HTML).
function markedText(text, spans) {
  const out = document.createDocumentFragment();
  let at = 0;
  spans.forEach(([start, end]) => {
    out.append(document.createTextNode(text.slice(at, start)));
    const mark = document.createElement("mark");
    mark.textContent = text.slice(start, end);
    out.append(mark);
    at = end;
  });
  out.append(document.createTextNode(text.slice(at)));
  return out;
}

// The lines of words a photo was found by, the matched characters marked.
function wordsLine(lines) {
  const p = document.createElement("p");
  p.className = "words";
  p.title = "照片里的文字";
  lines.forEach((line, i) => {
    if (i > 0) p.append(document.createTextNode(" / "));
    p.append(markedText(line.text, line.spans));
  });
  return p;
}

// Under the big photo: every line read in it, to read and copy, the query's matches marked. The
// words are extra: when they cannot be had, the photo shows without them.
async function showPhotoWords(hit) {
  const panel = $("lightbox-words");
  panel.hidden = true;
  $("lightbox-boxes").toggleAttribute("hidden", true); // an <svg> has no .hidden property
  $("lightbox-boxes").replaceChildren();
  $("lightbox").classList.remove("with-words");
  $("lightbox-lines").replaceChildren();
  $("lightbox-copy").textContent = "复制文字";
  let data;
  try {
    data = await api(`/api/words/${hit.id}`);
  } catch (_) {
    return;
  }
  if (state.hits[state.current] !== hit || !data.lines.length) return; // stepped on, or no words
  const matched = new Map((hit.words || []).map((line) => [line.text, line.spans]));
  data.lines.forEach((line) => {
    const item = document.createElement("li");
    item.append(markedText(line.text, matched.get(line.text) || []));
    $("lightbox-lines").append(item);
  });
  $("lightbox").classList.add("with-words");
  panel.hidden = false;
  if (hit.t === null || hit.t === undefined) drawWordBoxes(hit, data.lines.filter((line) => matched.has(line.text)));
}

// Over the photo, where the matched lines are: their boxes are in the photo's pixels (upright, as
// the browser shows it), so the drawing's coordinates are the picture's own.
function drawWordBoxes(hit, lines) {
  const img = $("lightbox-img");
  const draw = () => {
    const svg = $("lightbox-boxes");
    if (state.hits[state.current] !== hit || !img.naturalWidth || !lines.length) return; // stepped on
    svg.setAttribute("viewBox", `0 0 ${img.naturalWidth} ${img.naturalHeight}`);
    lines.forEach((line) => {
      const box = document.createElementNS("http://www.w3.org/2000/svg", "polygon");
      box.setAttribute("points", line.box.map(([x, y]) => `${x},${y}`).join(" "));
      svg.append(box);
    });
    svg.toggleAttribute("hidden", false);
  };
  if (img.complete) draw();
  else img.addEventListener("load", draw, { once: true });
}

// The clipboard needs a secure page (https, or this computer); elsewhere the lines are selected
// for Ctrl+C instead.
async function copyPhotoWords() {
  const lines = $("lightbox-lines");
  const text = [...lines.children].map((item) => item.textContent).join("\n");
  try {
    await navigator.clipboard.writeText(text);
    $("lightbox-copy").textContent = "已复制";
  } catch (_) {
    const range = document.createRange();
    range.selectNodeContents(lines);
    window.getSelection().removeAllRanges();
    window.getSelection().addRange(range);
    $("lightbox-copy").textContent = "已选中，按 Ctrl+C 复制";
  }
}

// Combined queries: the 不要 field's texts (split at commas or 、) are subtracted from the query text.
function minusTexts() {
  return $("not").value.split(/[,，、]/).map((text) => text.trim()).filter(Boolean);
}

// Filters (拍摄时间, 文件夹): the same query parameters for every kind of search.
const FILTERS = ["after", "before", "in", "kind", "camera"];

function filterPairs() {
  return FILTERS.map((name) => [name, $(name).value.trim()]).filter(([, value]) => value);
}

function withFilters(params) {
  filterPairs().forEach(([name, value]) => params.append(name, value));
  return params;
}

// On phones the filters fold behind 筛选 (style.css shows #filters there only when .open); the button
// counts the filters set, so a folded filter is never forgotten. Wider screens show the filters, never the button.
function showFilterCount() {
  const count = filterPairs().length;
  $("filters-count").textContent = String(count);
  $("filters-count").hidden = count === 0;
}

function setFiltersOpen(open) {
  $("filters").classList.toggle("open", open);
  $("filters-toggle").setAttribute("aria-expanded", String(open));
}

function combinedParams(query, nots, like) {
  const params = new URLSearchParams({ q: query, k: $("k").value });
  if ($("words").value !== "auto") params.append("words", $("words").value);
  nots.forEach((text) => params.append("not", text));
  if (like !== undefined) params.append("like", like);
  return withFilters(params);
}

function describeQuery(query, nots) {
  return `“${query}”` + nots.map((text) => ` 不要“${text}”`).join("");
}

async function searchText(query) {
  query = query.trim();
  if (!query) return;
  clearMessages();
  const nots = minusTexts();
  const url = new URL(location.href);
  const words = $("words").value !== "auto" ? [["words", $("words").value]] : [];
  url.search = new URLSearchParams([["q", query], ...nots.map((text) => ["not", text]), ...filterPairs(), ...words]).toString();
  history.replaceState(null, "", url);
  setStatus("搜索中…");
  try {
    const data = await api(`/api/search?${combinedParams(query, nots)}`);
    showResults(data, describeQuery(query, nots));
  } catch (error) {
    setStatus("");
    showError(error);
  }
}

// 更像这张: the current text (minus the 不要 texts) plus this photo; with no text, plain 找相似.
async function searchLike(hit) {
  const query = $("q").value.trim();
  if (!query) return searchSimilar(hit.id);
  clearMessages();
  const nots = minusTexts();
  setStatus("搜索中…", hit.thumb);
  try {
    const data = await api(`/api/search?${combinedParams(query, nots, hit.id)}`);
    showResults(data, `${describeQuery(query, nots)} 更像这张`, hit.thumb);
  } catch (error) {
    setStatus("");
    showError(error);
  }
}

async function searchImage(file) {
  if (!file) return;
  if (file.type && !file.type.startsWith("image/")) {
    showError(new ApiError(415, `${file.name || "这个文件"}不是图片`));
    return;
  }
  clearMessages();
  const preview = URL.createObjectURL(file);
  setStatus("以图搜图中…", preview);
  const form = new FormData();
  form.append("file", file, file.name || "pasted.png");
  form.append("k", $("k").value);
  try {
    const data = await api(`/api/search/image?${withFilters(new URLSearchParams())}`, { method: "POST", body: form });
    showResults(data, "以图搜图", preview);
  } catch (error) {
    setStatus("");
    showError(error);
  }
}

async function searchSimilar(id) {
  closeLightbox();
  clearMessages();
  setStatus("查找相似图片中…");
  try {
    const data = await api(`/api/similar?${withFilters(new URLSearchParams({ id, k: $("k").value }))}`);
    showResults(data, "相似图片", `/api/thumb/${id}`);
  } catch (error) {
    setStatus("");
    showError(error);
  }
}

function clock(seconds) {
  const s = Math.floor(seconds);
  return `${Math.floor(s / 60)}:${String(s % 60).padStart(2, "0")}`;
}

function openLightbox(i) {
  const hit = state.hits[i];
  if (!hit) return;
  state.current = i;
  const video = $("lightbox-video");
  const isVideo = hit.t !== null && hit.t !== undefined;
  // a video plays from its best-matching moment (a media fragment: #t=SECONDS)
  video.hidden = !isVideo;
  $("lightbox-img").hidden = isVideo;
  if (isVideo) {
    video.src = `${hit.image}#t=${hit.t}`;
    $("lightbox-img").removeAttribute("src");
  } else {
    video.pause();
    video.removeAttribute("src");
    $("lightbox-img").src = hit.image;
  }
  $("lightbox-img").alt = hit.name;
  $("lightbox-caption").textContent = `${hit.score.toFixed(3)}　${hit.path}` + (isVideo ? `　${clock(hit.t)}` : "");
  $("lightbox-open").href = hit.image;
  $("lightbox").hidden = false;
  $("lightbox-close").focus();
  showPhotoWords(hit);
}

// The arrow keys and a swipe: one photo on, or back, stopping at either end.
function stepLightbox(delta) {
  const next = Math.min(Math.max(state.current + delta, 0), state.hits.length - 1);
  if (next !== state.current) openLightbox(next);
}

// A one-finger swipe of at least SWIPE_PX, more sideways than up or down, steps the lightbox (left: next).
// Its moves are consumed: the browser would otherwise scroll the page behind and fling on, and a fling
// swallows the next tap (it only stops the fling), so a tap just after a swipe would not close the lightbox.
// A second finger (a pinch: zoom) cancels the swipe; one that starts on a video is left to its controls.
const SWIPE_PX = 50;

function wireSwipe(element) {
  let start = null;
  element.addEventListener("touchstart", (event) => {
    const touch = event.touches.length === 1 && event.target.tagName !== "VIDEO" ? event.touches[0] : null;
    start = touch && { x: touch.clientX, y: touch.clientY };
  }, { passive: true });
  element.addEventListener("touchmove", (event) => {
    if (start && event.cancelable) event.preventDefault();
  });
  element.addEventListener("touchcancel", () => (start = null));
  element.addEventListener("touchend", (event) => {
    const touch = event.changedTouches[0];
    if (!start || !touch) return;
    const dx = touch.clientX - start.x;
    const dy = touch.clientY - start.y;
    start = null;
    if (Math.abs(dx) >= SWIPE_PX && Math.abs(dx) > 2 * Math.abs(dy)) stepLightbox(dx < 0 ? 1 : -1);
  });
}

function closeLightbox() {
  $("lightbox").hidden = true;
  $("lightbox-img").removeAttribute("src");
  $("lightbox-video").pause();
  $("lightbox-video").removeAttribute("src");
  state.current = -1;
}

async function showInfo() {
  try {
    const health = await api("/api/health");
    const model = health.model ? health.model.name || health.model.digest.slice(0, 12) : "无";
    const updated = health.last_update ? new Date(health.last_update).toLocaleString("zh-CN") : "未知";
    $("info").textContent =
      `索引共 ${health.count.toLocaleString("zh-CN")} 张图片` +
      (health.videos ? `、${health.videos.toLocaleString("zh-CN")} 个视频` : "") +
      (health.words && health.words.with_words ? `（${health.words.with_words.toLocaleString("zh-CN")} 张有文字）` : "") +
      ` · 模型 ${model} · 更新于 ${updated} · ${health.runtime}`;
    return true;
  } catch (error) {
    showError(error);
    return false;
  }
}

function imageFrom(items) {
  for (const item of items || []) {
    const file = item instanceof File ? item : item.kind === "file" ? item.getAsFile() : null;
    if (file && (!file.type || file.type.startsWith("image/"))) return file;
  }
  return null;
}

function wire() {
  $("search-form").addEventListener("submit", (event) => {
    event.preventDefault();
    setFiltersOpen(false); // on a phone, the results take the screen
    searchText($("q").value);
  });
  $("filters-toggle").addEventListener("click", () => setFiltersOpen(!$("filters").classList.contains("open")));
  $("filters").addEventListener("input", showFilterCount);
  $("filters").addEventListener("change", showFilterCount);
  $("file").addEventListener("change", () => {
    searchImage($("file").files[0]);
    $("file").value = "";
  });
  $("token-form").addEventListener("submit", (event) => {
    event.preventDefault();
    location.href = `/?${new URLSearchParams({ token: $("token").value })}`;
  });

  let dragDepth = 0;
  document.addEventListener("dragenter", (event) => {
    if (!event.dataTransfer || !Array.from(event.dataTransfer.types).includes("Files")) return;
    dragDepth += 1;
    $("drop").hidden = false;
  });
  document.addEventListener("dragleave", () => {
    dragDepth = Math.max(0, dragDepth - 1);
    if (dragDepth === 0) $("drop").hidden = true;
  });
  document.addEventListener("dragover", (event) => event.preventDefault());
  document.addEventListener("drop", (event) => {
    event.preventDefault();
    dragDepth = 0;
    $("drop").hidden = true;
    const file = imageFrom(event.dataTransfer && event.dataTransfer.files);
    if (file) searchImage(file);
  });
  document.addEventListener("paste", (event) => {
    const file = imageFrom(event.clipboardData && event.clipboardData.items);
    if (file) {
      event.preventDefault();
      searchImage(file);
    }
  });

  $("lightbox-close").addEventListener("click", closeLightbox);
  $("lightbox-copy").addEventListener("click", copyPhotoWords);
  $("lightbox").addEventListener("click", (event) => {
    if (event.target === $("lightbox")) closeLightbox(); // a click or a tap beside the photo
  });
  wireSwipe($("lightbox"));
  $("lightbox-similar").addEventListener("click", () => {
    const hit = state.hits[state.current];
    if (hit) searchSimilar(hit.id);
  });
  document.addEventListener("keydown", (event) => {
    if ($("lightbox").hidden) return;
    if (event.key === "Escape") closeLightbox();
    if (event.key === "ArrowRight") stepLightbox(1);
    if (event.key === "ArrowLeft") stepLightbox(-1);
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  wire();
  const ready = await showInfo();
  const query = new URLSearchParams(location.search).get("q");
  $("not").value = new URLSearchParams(location.search).getAll("not").join("，");
  FILTERS.forEach((name) => ($(name).value = new URLSearchParams(location.search).get(name) || ""));
  $("words").value = new URLSearchParams(location.search).get("words") || "auto";
  showFilterCount();
  if (ready && query) {
    $("q").value = query;
    searchText(query);
  }
});

// -- near-duplicate photos (重复照片): groups from /api/dupes, one block per group in the results grid --
const DUPES_THRESHOLD = 0.95;

function dupeFigure(member, i, best) {
  const figure = document.createElement("figure");
  figure.className = "hit";
  const open = document.createElement("button");
  open.type = "button";
  open.title = member.path;
  open.addEventListener("click", () => openLightbox(i));
  const img = document.createElement("img");
  img.loading = "lazy";
  img.src = member.thumb;
  img.alt = member.name;
  open.append(img);
  const caption = document.createElement("figcaption");
  const score = document.createElement("span");
  score.className = best ? "score best" : "score";
  score.textContent = best ? "最佳" : member.score.toFixed(3);
  score.title = best ? "像素最多（其次字节数、最早）的一张" : "与最佳一张的相似度";
  const name = document.createElement("span");
  name.className = "name";
  name.textContent = member.width ? `${member.width}×${member.height} ${member.name}` : member.name;
  caption.append(score, name);
  figure.append(open, caption);
  return figure;
}

function showDupeGroups(data) {
  state.hits = data.groups.flatMap((group) => group.members); // the lightbox walks every listed photo
  const grid = $("results");
  grid.replaceChildren();
  let i = 0;
  data.groups.forEach((group, g) => {
    const section = document.createElement("section");
    section.className = "dupe-group";
    const heading = document.createElement("h2");
    const listed = group.capped ? `，列出 ${group.members.length} 张` : "";
    heading.textContent = `第 ${g + 1} 组：${group.size} 张${listed}`;
    const row = document.createElement("div");
    row.className = "dupe-row";
    group.members.forEach((member, j) => row.append(dupeFigure(member, i++, j === 0)));
    section.append(heading, row);
    grid.append(section);
  });
  $("hint").hidden = data.count > 0;
  const found = data.total > 0 ? `找到 ${data.total} 组` : "没有找到";
  const shown = data.total > data.count ? `（显示前 ${data.count} 组）` : "";
  setStatus(`重复照片：${data.files} 张中${found}${shown}，只列出，不删除；用时 ${Math.round(data.took_ms)} 毫秒`);
}

async function showDupes() {
  clearMessages();
  setStatus("查找重复照片中…");
  try {
    showDupeGroups(await api(`/api/dupes?${new URLSearchParams({ threshold: DUPES_THRESHOLD })}`));
  } catch (error) {
    setStatus("");
    showError(error);
  }
}

document.addEventListener("DOMContentLoaded", () => $("dupes-button").addEventListener("click", showDupes));
