// florence search page: calls the JSON API of florence.search.webapp and draws the result grid.
// Every value from the server goes into the page as text (textContent / attributes), never as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
let likeId = null;       // the row a "more like this" search starts from
let likeUrl = null;
let previewUrl = null;   // object URL of the chosen query image

function setStatus(text, isError) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function callApi(url, options) {
  const response = await fetch(url, options);
  let body;
  try {
    body = await response.json();
  } catch (err) {
    throw new Error(`${response.status} ${response.statusText}`);
  }
  if (!response.ok) throw new Error(body.error || `${response.status} ${response.statusText}`);
  return body;
}

function shortPath(path) {
  const parts = String(path).split("/");
  return parts.length > 2 ? "…/" + parts.slice(-2).join("/") : String(path);
}

function card(hit) {
  const el = document.createElement("div");
  el.className = "result";
  el.tabIndex = 0;
  el.dataset.id = hit.id;
  el.title = `${hit.path}\nclick: more like this`;
  const media = document.createElement("img");
  media.className = "thumb";
  media.loading = "lazy";
  media.alt = shortPath(hit.path);
  media.src = `/api/image/${encodeURIComponent(hit.id)}?thumb=256`;
  media.addEventListener("load", () => { if (media.naturalWidth < 96) media.classList.add("small"); });
  el.appendChild(media);
  const meta = document.createElement("div");
  meta.className = "meta";
  const score = document.createElement("span");
  score.className = "score";
  score.textContent = Number(hit.score).toFixed(3);
  meta.appendChild(score);
  if (hit.tag !== null && hit.tag !== undefined) {
    const tag = document.createElement("span");
    tag.className = "tag";
    const conf = typeof hit.tag_confidence === "number" ? ` ${hit.tag_confidence.toFixed(2)}` : "";
    tag.textContent = `${hit.tag}${conf}`;
    meta.appendChild(tag);
  }
  const path = document.createElement("span");
  path.className = "path";
  path.textContent = shortPath(hit.path);
  meta.appendChild(path);
  el.appendChild(meta);
  const more = () => moreLikeThis(hit);
  el.addEventListener("click", more);
  el.addEventListener("keydown", (e) => { if (e.key === "Enter") more(); });
  return el;
}

function render(result, what) {
  const grid = $("results");
  grid.replaceChildren(...result.hits.map(card));
  setStatus(`${result.hits.length} results for ${what} in ${result.ms} ms`, false);
}

function showQuery(src, label) {
  $("query-strip").hidden = !src;
  if (src) $("query-preview").src = src;
  $("query-label").textContent = label || "";
}

function common() {
  return { top_k: Number($("top-k").value) || 24, filter: $("filter").value.trim() };
}

async function search() {
  const text = $("text").value.trim();
  const file = $("image").files[0];
  const { top_k, filter } = common();
  const weight = Number($("text-weight").value);
  let result, what;
  setStatus("searching…", false);
  try {
    if (file) {
      const form = new FormData();
      form.append("image", file);
      if (text) form.append("text", text);
      form.append("text_weight", String(weight));
      form.append("top_k", String(top_k));
      form.append("filter", filter);
      result = await callApi("/api/search/image", { method: "POST", body: form });
      what = text ? `“${text}” + ${file.name}` : file.name;
    } else if (text || likeId) {
      const body = { top_k, filter, text_weight: weight };
      if (likeId) body.like = likeId; else body.text = text;
      result = await callApi("/api/search", { method: "POST", headers: { "Content-Type": "application/json" },
                                             body: JSON.stringify(body) });
      what = likeId ? "more like this" : `“${text}”`;
    } else {
      setStatus("type a description or choose an image", true);
      return;
    }
    render(result, what);
  } catch (err) {
    setStatus(err.message, true);
  }
}

function moreLikeThis(hit) {
  likeId = hit.id;
  likeUrl = `/api/image/${encodeURIComponent(hit.id)}?thumb=128`;
  $("text").value = "";
  clearImage();
  showQuery(likeUrl, `more like ${shortPath(hit.path)}`);
  window.scrollTo({ top: 0, behavior: "smooth" });
  search();
}

function clearImage() {
  $("image").value = "";
  $("image-label").textContent = "image…";
  $("weight-box").hidden = true;
  if (previewUrl) URL.revokeObjectURL(previewUrl);
  previewUrl = null;
}

function clearAll() {
  likeId = null;
  clearImage();
  showQuery(null);
  $("text").value = "";
  $("results").replaceChildren();
  setStatus("", false);
}

async function loadInfo() {
  try {
    const info = await callApi("/api/info");
    $("info").textContent = `${info.collection} · ${info.count.toLocaleString()} items · ${info.model} · ` +
      `${info.dim}-d ${info.index_type}`;
    $("top-k").max = String(info.max_top_k);
    $("add-files").hidden = !info.allow_index;
    $("roots").textContent = `indexed roots: ${info.roots.join(", ")}`;
  } catch (err) {
    setStatus(err.message, true);
  }
}

async function addFiles() {
  const source = $("source").value.trim();
  if (!source) return;
  $("index-status").textContent = "indexing…";
  try {
    const s = await callApi("/api/index", { method: "POST", headers: { "Content-Type": "application/json" },
                                            body: JSON.stringify({ source }) });
    const lines = [`indexed ${s.indexed}, unchanged ${s.unchanged}, updated ${s.updated}, ` +
                   `skipped ${s.skipped.length} in ${s.seconds.toFixed(1)} s; ${s.count} items now`];
    for (const [name, reason] of s.skipped.slice(0, 20)) lines.push(`  skipped ${name}: ${reason}`);
    $("index-status").textContent = lines.join("\n");
    loadInfo();
  } catch (err) {
    $("index-status").textContent = err.message;
  }
}

document.addEventListener("DOMContentLoaded", () => {
  loadInfo();
  $("search-form").addEventListener("submit", (e) => {
    e.preventDefault();
    if ($("text").value.trim() || $("image").files[0]) { likeId = null; if (!$("image").files[0]) showQuery(null); }
    search();
  });
  $("image").addEventListener("change", () => {
    const file = $("image").files[0];
    if (!file) return clearImage();
    likeId = null;
    $("image-label").textContent = file.name;
    $("weight-box").hidden = false;
    if (previewUrl) URL.revokeObjectURL(previewUrl);
    previewUrl = URL.createObjectURL(file);
    showQuery(previewUrl, file.name);
    search();
  });
  $("clear-button").addEventListener("click", clearAll);
  $("index-form").addEventListener("submit", (e) => { e.preventDefault(); addFiles(); });
});
