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
    name.textContent = hit.name;
    caption.append(score, name);
    figure.append(open, caption);
    grid.append(figure);
  });
  $("hint").hidden = data.count > 0;
  const found = data.count > 0 ? `找到 ${data.count} 张图片` : "没有找到图片";
  setStatus(`${what}：${found}，用时 ${Math.round(data.took_ms)} 毫秒`, imageUrl);
}

async function searchText(query) {
  query = query.trim();
  if (!query) return;
  clearMessages();
  const k = $("k").value;
  const url = new URL(location.href);
  url.search = new URLSearchParams({ q: query }).toString();
  history.replaceState(null, "", url);
  setStatus("搜索中…");
  try {
    const data = await api(`/api/search?${new URLSearchParams({ q: query, k })}`);
    showResults(data, `“${query}”`);
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
    const data = await api("/api/search/image", { method: "POST", body: form });
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
    const data = await api(`/api/similar?${new URLSearchParams({ id, k: $("k").value })}`);
    showResults(data, "相似图片", `/api/thumb/${id}`);
  } catch (error) {
    setStatus("");
    showError(error);
  }
}

function openLightbox(i) {
  const hit = state.hits[i];
  if (!hit) return;
  state.current = i;
  $("lightbox-img").src = hit.image;
  $("lightbox-img").alt = hit.name;
  $("lightbox-caption").textContent = `${hit.score.toFixed(3)}　${hit.path}`;
  $("lightbox-open").href = hit.image;
  $("lightbox").hidden = false;
  $("lightbox-close").focus();
}

function closeLightbox() {
  $("lightbox").hidden = true;
  $("lightbox-img").removeAttribute("src");
  state.current = -1;
}

async function showInfo() {
  try {
    const health = await api("/api/health");
    const model = health.model ? health.model.name || health.model.digest.slice(0, 12) : "无";
    const updated = health.last_update ? new Date(health.last_update).toLocaleString("zh-CN") : "未知";
    $("info").textContent =
      `索引共 ${health.count.toLocaleString("zh-CN")} 张图片 · 模型 ${model} · 更新于 ${updated} · ${health.runtime}`;
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
    searchText($("q").value);
  });
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
  $("lightbox").addEventListener("click", (event) => {
    if (event.target === $("lightbox")) closeLightbox();
  });
  $("lightbox-similar").addEventListener("click", () => {
    const hit = state.hits[state.current];
    if (hit) searchSimilar(hit.id);
  });
  document.addEventListener("keydown", (event) => {
    if ($("lightbox").hidden) return;
    if (event.key === "Escape") closeLightbox();
    if (event.key === "ArrowRight") openLightbox(Math.min(state.current + 1, state.hits.length - 1));
    if (event.key === "ArrowLeft") openLightbox(Math.max(state.current - 1, 0));
  });
}

document.addEventListener("DOMContentLoaded", async () => {
  wire();
  const ready = await showInfo();
  const query = new URLSearchParams(location.search).get("q");
  if (ready && query) {
    $("q").value = query;
    searchText(query);
  }
});
