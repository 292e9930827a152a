// gigaslide viewer: OpenSeadragon deep-zoom slide + server-rendered overlay tile layers (level-0 coordinates).
"use strict";

const G = {
  state: null, slide: null, viewer: null, layers: [], selected: null, highlight: null, ready: false, opening: 0,
  current: null,
  allLoaded() {
    const w = G.viewer && G.viewer.world;
    if (!G.ready) return false;
    if (!w || w.getItemCount() === 0) return false;
    for (let i = 0; i < w.getItemCount(); i++) if (!w.getItemAt(i).getFullyLoaded()) return false;
    return G.layers.every(l => !l.timer && (!l.on || l.item));
  },
};
window.gigaslide = G;

const $ = sel => document.querySelector(sel);
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (k === "class") e.className = v; else if (k.startsWith("on")) e.addEventListener(k.slice(2), v);
    else if (v !== undefined && v !== null && v !== false) e.setAttribute(k, v === true ? "" : v);
  }
  for (const c of children) if (c !== null && c !== undefined) e.append(c instanceof Node ? c : String(c));
  return e;
}
async function getJSON(url) {
  const r = await fetch(url);
  const body = await r.json();
  if (!r.ok) throw new Error(body.detail || r.statusText);
  return body;
}
function fmt(v, d = 3) { return v === null || v === undefined ? "–" : Number(v).toFixed(d); }
function status(text) { $("#status").textContent = text; }
const enc = encodeURIComponent;

// -- slide list ---------------------------------------------------------------------------------
function renderProblems(problems) {
  const box = $("#problems");
  box.replaceChildren(...problems.map(p => el("div", {class: "problem"}, p)));
}

function slideRow(s, runs) {
  const cells = runs.map(r => {
    const p = s.predictions[r];
    return el("td", {}, p ? `${p.class_name ?? p.label} / ${fmt(p.prob, 2)} (f${p.fold})` : "–");
  });
  const broken = s.status === "broken";
  const current = G.current === s.key;
  return el("tr", {class: "slide" + (broken ? " broken" : "") + (s.status === "pending" ? " pending" : "") +
                   (current ? " current" : ""), "data-slide": s.key, title: s.reason || "", hidden: !matches(s),
                   onclick: () => { if (s.status !== "broken") openSlide(s.key); else status(s.reason); }},
    el("td", {}, s.slide_id), el("td", {class: "st"}, s.status), ...cells);
}

// The slide list's filter: every word typed is in the slide's id, status or a run's label (case ignored).
function matches(s) {
  if (!G.filter) return true;
  const text = [s.slide_id, s.status, ...Object.values(s.predictions || {}).map(p => `label ${p.label} ${p.class_name ?? ""}`)]
    .join(" ").toLowerCase();
  return G.filter.split(/\s+/).every(w => text.includes(w));
}
function rowOf(key) {  // (no CSS selector of the key: any character may be in a slide id)
  for (const tr of document.querySelectorAll("#slides tr.slide")) if (tr.dataset.slide === key) return tr;
  return null;
}
function applyFilter() {
  G.filter = $("#filter").value.trim().toLowerCase();
  let shown = 0;
  const byKey = new Map(G.state.slides.map(s => [s.key, s]));
  for (const tr of document.querySelectorAll("#slides tr.slide")) {
    const s = byKey.get(tr.dataset.slide), ok = s !== undefined && matches(s);
    shown += ok;
    tr.hidden = !ok;
  }
  const n = G.state.slides.length;
  $("#slide-count").textContent = G.filter ? `(${shown} of ${n})` : `(${n})`;
}

function renderSlides() {
  const runs = G.state.runs.map(r => r.name);
  $("#slides thead").replaceChildren(el("tr", {}, el("th", {}, "slide"), el("th", {}, "status"),
    ...runs.map(r => el("th", {title: "label / held-out P(last class) (fold)"}, r))));
  const rows = G.state.slides.map(s => slideRow(s, runs));
  if (!rows.length) rows.push(el("tr", {}, el("td", {colspan: 2 + runs.length, class: "hint"}, "No slides: see the notes above.")));
  $("#slides tbody").replaceChildren(...rows);
  applyFilter();
}

// A slide's row once its status is known (opened by the server in the background, or by the page): replaced in place.
function updateSlide(s) {
  const i = G.state.slides.findIndex(r => r.key === s.key);
  if (i < 0) return;
  G.state.slides[i] = {...G.state.slides[i], ...s};
  const tr = rowOf(s.key);
  if (tr) tr.replaceWith(slideRow(G.state.slides[i], G.state.runs.map(r => r.name)));
}

// The slides not opened yet are opened by the server one after the other: their rows fill in as they are.
async function fillSlides() {
  let checked = G.state.checked || 0, pending = G.state.pending || 0;
  while (pending > 0) {
    await new Promise(r => setTimeout(r, 1000));
    const res = await getJSON(`api/slides?since=${checked}`);
    res.slides.forEach(updateSlide);
    checked = res.checked; pending = res.pending;
  }
}

// -- viewer ---------------------------------------------------------------------------------------
function slideSource(info) {
  return {width: info.width, height: info.height, tileSize: info.tile_size, tileOverlap: info.overlap,
          minLevel: 0, maxLevel: info.levels - 1,
          getTileUrl: (level, x, y) =>
            `api/slides/${enc(info.key)}/dz/${level}/${x}_${y}.jpeg?v=${enc(G.state.version)}`};
}

function overlaySource(info, layer) {
  // v: this server's version; cached tiles of an earlier viewer on this port (other runs, folders) are not reused
  const q = new URLSearchParams({threshold: layer.threshold, cmap: layer.cmap, v: G.state.version});
  if (layer.fold) q.set("fold", layer.fold);
  return {width: info.width, height: info.height, tileSize: info.overlay_tile_size, tileOverlap: 0,
          minLevel: 0, maxLevel: info.levels - 1,
          getTileUrl: (level, x, y) => `api/slides/${enc(info.key)}/overlay/${enc(layer.id)}/${level}/${x}_${y}.png?${q}`};
}

function makeViewer() {
  G.viewer = OpenSeadragon({
    id: "osd", showNavigationControl: false, showNavigator: false, animationTime: 0.3, maxZoomPixelRatio: 4,
    gestureSettingsMouse: {clickToZoom: false}, crossOriginPolicy: false, imageLoaderLimit: 8,
    // the needed level only, not every blurrier level first: far fewer tile requests before the first screenful
    immediateRender: true,
    // the 2D canvas drawer: exact colour blending of the overlays, and no software-WebGL stalls on machines without a GPU
    drawer: "canvas",
  });
  G.viewer.addHandler("canvas-click", e => { if (e.quick) clickAt(e.position); });
  G.viewer.addHandler("tile-load-failed", tileFailed);
  G.viewer.addHandler("animation", updateScaleBar);
  G.viewer.addHandler("open", updateScaleBar);
  G.viewer.addHandler("resize", updateScaleBar);
}

function openSlide(key) {
  // the pyramid opens at once from the slide list's geometry; the slide's details (layers, mpp) arrive meanwhile
  const row = (G.state.slides || []).find(s => s.key === key);
  // the last slide asked for wins: the details of one opened before it (slower to come) are dropped, not shown on it
  const gen = ++G.opening;
  const keep = new Map(G.layers.map(l => [l.id, l]));
  G.layers.forEach(l => { clearTimeout(l.timer); l.timer = null; l.gen++; });
  G.layers = []; G.ready = false; G.slide = null; G.selected = null; G.highlight = null; G.current = key;
  document.querySelectorAll("#slides tr").forEach(tr => tr.classList.toggle("current", tr.dataset.slide === key));
  const tr = rowOf(key);
  if (tr && tr.scrollIntoView) tr.scrollIntoView({block: "nearest"});  // a neighbour's slide far down the list
  const opened = new Promise(resolve => G.viewer.addOnceHandler("open", () => {
    G.slideItem = G.viewer.world.getItemAt(0); resolve();
  }));
  const early = row && row.width;
  if (early) G.viewer.open(slideSource(row));
  return getJSON(`api/slides/${enc(key)}`).then(info => {
    if (gen !== G.opening) return null;
    if (!early) G.viewer.open(slideSource(info));
    G.slide = info;
    if (row && row.status === "pending") {  // opened first by the page: its row says so now
      const {status: st, reason, width, height, levels, tile_size, overlap} = info;
      updateSlide({key, status: st, reason, width, height, levels, tile_size, overlap});
    }
    status(`${info.slide_id}: ${info.width}×${info.height} px, ${info.mpp ? fmt(info.mpp, 4) + " µm/px (" + info.mpp_source + ")" : "no mpp"}, ${info.n_tiles} tiles`);
    G.layers = info.layers.map(l => {
      const old = keep.get(l.id);
      return {...l, on: old ? old.on && l.available : false, opacity: old ? old.opacity : 0.5,
              threshold: old ? old.threshold : 0, cmap: old ? old.cmap : (l.cmap || "jet"), fold: l.fold || null,
              item: null, gen: 0};
    });
    renderLayers();
    $("#tile").replaceChildren(el("p", {class: "hint"}, "Click a tile on the slide."));
    return opened.then(() => {
      if (gen !== G.opening) return null;
      G.layers.filter(l => l.on).forEach(addLayer);
      updateScaleBar();
      G.ready = true;
      return info;
    });
  }).catch(err => {
    if (gen !== G.opening) return null;
    status(`cannot open ${key}: ${err.message}`);
    // a slide not opened before: its row says now why it does not open
    if (row && row.status === "pending") updateSlide({key, status: "broken", reason: err.message});
    return null;
  });
}

// -- layers ---------------------------------------------------------------------------------------
// A tiled image is only removed once none of its tiles is in flight (OpenSeadragon warns about tiles that
// arrive after their image was destroyed): until then it is hidden (opacity 0, still loading: preload).
function retire(item) {
  item.setOpacity(0);
  const go = () => {
    if (G.viewer.world.getIndexOfItem(item) < 0) return;
    if (item.getFullyLoaded()) G.viewer.world.removeItem(item);
    else item.addOnceHandler("fully-loaded-change", go);
  };
  go();
}
function addLayer(layer) {
  const gen = ++layer.gen;
  G.viewer.addTiledImage({
    tileSource: overlaySource(G.slide, layer), x: 0, y: 0, width: 1, opacity: layer.opacity, preload: true,
    success: ev => { if (gen !== layer.gen || !layer.on) retire(ev.item); else layer.item = ev.item; },
    error: ev => status(`layer ${layer.name}: ${ev.message}`),
  });
}
// A tile the server refused (a damaged GeoJSON, feature file or model): its one-line reason under the layer and in
// the status line, once per layer drawing -- OpenSeadragon alone leaves the layer empty and says nothing.
function tileFailed(e) {
  const layer = G.layers.find(l => l.item && l.item === e.tiledImage);
  if (layer && layer.failed === layer.gen) return;
  if (!layer && e.tiledImage !== G.slideItem) return;
  if (layer) layer.failed = layer.gen;
  const say = why => {
    status(layer ? `layer ${layer.name}: ${why}` : `slide tiles: ${why}`);
    const box = layer && document.querySelector(`#layers [data-layer="${layer.id}"]`);
    if (box) (box.querySelector(".layer-error") || box.appendChild(el("div", {class: "layer-error"}))).textContent = why;
  };
  fetch(e.tile.getUrl()).then(r => r.json()).then(b => say(b.detail || e.message)).catch(() => say(e.message));
}
function removeLayer(layer) {
  layer.gen++;
  if (layer.item) { retire(layer.item); layer.item = null; }
}
function refreshLayer(layer) {  // new threshold / colours / model: new tile URLs (debounced while a slider moves)
  clearTimeout(layer.timer);
  layer.timer = setTimeout(() => { layer.timer = null; removeLayer(layer); if (layer.on) addLayer(layer); }, 250);
}

function renderLayers() {
  const rows = G.layers.map(layer => {
    const box = el("div", {class: "layer" + (layer.available ? "" : " unavailable"), "data-layer": layer.id});
    const toggle = el("input", {type: "checkbox", class: "toggle", disabled: !layer.available, checked: layer.on,
      onchange: e => { layer.on = e.target.checked; if (layer.on) addLayer(layer); else removeLayer(layer); }});
    box.append(el("label", {class: "name"}, toggle, " ", layer.name));
    if (!layer.available) { box.append(el("div", {class: "hint"}, layer.reason)); return box; }
    const controls = el("div", {class: "controls"});
    controls.append(el("div", {}, el("label", {}, "opacity"), el("input", {type: "range", class: "opacity", min: 0, max: 1,
      step: 0.05, value: layer.opacity, oninput: e => { layer.opacity = +e.target.value; if (layer.item) layer.item.setOpacity(layer.opacity); }})));
    if (layer.kind === "score") {
      const thv = el("span", {class: "thv"}, fmt(layer.threshold, 2));
      controls.append(el("div", {}, el("label", {}, "threshold"), el("input", {type: "range", class: "threshold", min: 0, max: 1,
        step: 0.05, value: layer.threshold, oninput: e => { thv.textContent = fmt(e.target.value, 2); },
        onchange: e => { layer.threshold = +e.target.value; refreshLayer(layer); updateColourBar(layer); }}),
        " ", thv));
      const cmap = el("select", {class: "cmap", onchange: e => {
        layer.cmap = e.target.value; refreshLayer(layer); updateColourBar(layer); }},
        ...G.state.colormaps.map(c => el("option", {value: c, selected: c === layer.cmap}, c)));
      const fold = el("select", {class: "fold", onchange: e => { layer.fold = e.target.value; refreshLayer(layer); }},
        ...layer.folds.map(f => el("option", {value: f, selected: f === layer.fold},
          f + (f === layer.fold && layer.held_out ? " (held out)" : ""))));
      controls.append(el("div", {}, el("label", {}, "colours"), cmap, " ", el("label", {}, "model"), fold));
      controls.append(colourBar(layer));
    }
    if (layer.kind === "category" && layer.palette) {  // one colour per cluster / prototype id
      controls.append(el("div", {class: "legend"}, ...layer.palette.map((c, i) =>
        el("span", {class: "swatch", "data-id": i, title: `id ${i}`, style: `background:${c}`}, String(i)))));
    }
    box.append(controls);
    return box;
  });
  $("#layers").replaceChildren(...rows);
}

// A score layer's colour scale: the server's colour strip (value v drawn in the colour at v along it), values 0 to 1;
// the part below the threshold, which the layer leaves undrawn, is greyed out.
function colourBar(layer) {
  layer.bar = {img: el("img", {class: "cbar-img", alt: layer.cmap}), cut: el("div", {class: "cbar-cut"})};
  updateColourBar(layer);
  return el("div", {class: "cbar"}, el("label", {}, "scale"),
    el("span", {class: "cbar-box"}, layer.bar.img, layer.bar.cut,
      el("span", {class: "cbar-ticks"}, el("span", {}, "0"), el("span", {}, "0.5"), el("span", {}, "1"))));
}
function updateColourBar(layer) {
  if (!layer.bar) return;
  layer.bar.img.src = `api/colormaps/${enc(layer.cmap)}.png?v=${enc(G.state.version)}`;
  layer.bar.img.alt = layer.cmap;
  layer.bar.cut.style.width = `${100 * layer.threshold}%`;
}

// -- scale bar ------------------------------------------------------------------------------------
function updateScaleBar() {
  const item = G.viewer && G.viewer.world.getItemAt(0);
  const mpp = G.slide && G.slide.mpp;
  if (!item || !mpp) { $("#scalebar").style.display = "none"; return; }
  const umPerScreenPx = mpp / item.viewportToImageZoom(G.viewer.viewport.getZoom(true));
  const want = 120 * umPerScreenPx;
  const p = Math.pow(10, Math.floor(Math.log10(want)));
  const nice = [5, 2, 1].map(m => m * p).find(v => v <= want) || p;
  $("#scalebar").style.display = "block";
  $("#scalebar-bar").style.width = `${Math.round(nice / umPerScreenPx)}px`;
  $("#scalebar-label").textContent = nice >= 1000 ? `${nice / 1000} mm` : `${nice >= 1 ? nice : nice.toPrecision(1)} µm`;
}

// -- tiles: click, info, neighbours ---------------------------------------------------------------
function clickAt(pixel) {
  if (!G.slideItem || !G.slide) return;
  const p = G.slideItem.viewportToImageCoordinates(G.viewer.viewport.pointFromPixel(pixel));
  const key = G.slide.key;
  fetch(`api/slides/${enc(key)}/tile_at?x=${p.x.toFixed(1)}&y=${p.y.toFixed(1)}`).then(async r => {
    const body = await r.json();
    if (!G.slide || G.slide.key !== key) return;  // another slide was opened meanwhile
    if (!r.ok) { $("#tile").replaceChildren(el("p", {class: "hint"}, `No tile at (${Math.round(p.x)}, ${Math.round(p.y)}).`)); return; }
    showTile(body);
  });
}

function showTile(t) {
  G.selected = t;
  const rect = G.slideItem.imageToViewportRectangle(t.x, t.y, t.size0, t.size0);
  if (G.highlight) G.viewer.removeOverlay(G.highlight);
  G.highlight = el("div", {class: "selected-tile"});
  G.viewer.addOverlay({element: G.highlight, location: rect});
  const rows = [["tile", `#${t.index}`], ["x, y (level 0)", `${t.x}, ${t.y}`], ["size (level 0)", `${Math.round(t.size0)} px`],
                ["tissue fraction", fmt(t.tissue, 2)]];
  for (const s of t.scores) {
    const tag = `${s.run} ${s.fold}${s.held_out ? " (held out)" : ""}`;
    if (s.error) { rows.push([tag, s.error]); continue; }
    rows.push([tag + " attention", `${fmt(s.attention, 4)} (pct ${fmt(s.attention_percentile, 2)})`]);
    if (s.tile_probs) rows.push([tag + " tile P", s.tile_probs.map(v => fmt(v, 3)).join(" / ")]);
    rows.push([tag + " slide P", s.slide_probs.map(v => fmt(v, 3)).join(" / ")]);
  }
  for (const c of t.clusters || []) {
    const v = c.error ? c.error : c.cluster === null ? "none" : el("span", {}, el("span", {class: "swatch", style: `background:${c.colour}`}),
      ` #${c.cluster} of ${c.k}`);
    rows.push([`${c.run} ${c.method === "slpd" ? "prototype" : "cluster"}`, v]);
  }
  const nb = el("div", {class: "neighbours"}, el("span", {class: "hint"}, "searching similar tiles…"));
  $("#tile").replaceChildren(el("table", {class: "tile-info"}, ...rows.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, v)))),
                             el("h3", {}, "Most similar tiles (cosine)"), nb);
  $("#tile").scrollIntoView({block: "nearest"});
  getJSON(`api/slides/${enc(t.slide)}/tiles/${t.index}/neighbours?k=8`).then(res => {
    if (!G.selected || G.selected.index !== t.index || G.selected.slide !== t.slide) return;
    nb.replaceChildren(...res.neighbours.map(n => el("div", {class: "neighbour", "data-slide": n.slide, "data-index": n.index,
        title: `${n.slide} tile ${n.index}`, onclick: () => jumpTo(n.slide, n.index)},
      el("img", {src: `api/slides/${enc(n.slide)}/tiles/${n.index}.jpeg?v=${enc(G.state.version)}`,
                 alt: `${n.slide} #${n.index}`}),
      `${n.slide} #${n.index}`, el("br"), `cos ${fmt(n.similarity, 3)}`)));
    nb.scrollIntoView({block: "nearest"});
  }).catch(err => nb.replaceChildren(el("span", {class: "hint"}, `no search: ${err.message}`)));
}

async function jumpTo(slide, index) {
  if (!G.slide || G.slide.key !== slide) await openSlide(slide);
  const t = await getJSON(`api/slides/${enc(slide)}/tiles/${index}`);
  if (!G.slide || G.slide.key !== slide) return;  // another slide was opened meanwhile
  const pad = t.size0 * 3;
  G.viewer.viewport.fitBounds(G.slideItem.imageToViewportRectangle(t.x - pad, t.y - pad, t.size0 + 2 * pad, t.size0 + 2 * pad));
  showTile(t);
}

// -- start ---------------------------------------------------------------------------------------
async function main() {
  makeViewer();
  G.state = await getJSON("api/state");  // preloaded by the page's <link rel="preload">
  renderProblems(G.state.problems);
  renderSlides();
  $("#filter").addEventListener("input", applyFilter);
  $("#filter").addEventListener("keydown", e => {  // Enter: the first slide shown
    const s = e.key === "Enter" && G.state.slides.find(r => matches(r) && r.status !== "broken");
    if (s) openSlide(s.key);
  });
  fillSlides().catch(err => status(`slide list: ${err.message}`));
  // the first slide that opens (a slide not opened before may turn out broken: then the next one)
  for (const s of G.state.slides) {
    if (s.status === "broken") continue;
    const gen = G.opening + 1;
    if (await openSlide(s.key)) return;
    if (G.opening !== gen) return;  // the user opened another slide meanwhile
  }
  status("nothing to show: " + (G.state.slides.length ? "every slide is broken" : "no slides"));
}
main().catch(err => status(`error: ${err.message}`));
