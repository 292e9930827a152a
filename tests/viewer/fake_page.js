// Runs the viewer's page script (argv[2]) in node with a fake DOM, OpenSeadragon and fetch (test_viewer_js.py);
// argv[3] names a scenario (argv[4]: its input, JSON); prints one JSON line of what the page did.
"use strict";
const vm = require("vm");
const fs = require("fs");

// an object any property or call of which is another such object (the DOM the page writes into, unread here)
const stub = () => new Proxy(function () {}, {
  get: (t, k) => (k === "then" ? undefined : k === Symbol.toPrimitive ? () => "" : stub()),
  apply: () => stub(), set: () => true,
});
const slide = (key, w) => ({key, slide_id: key, status: "ok", predictions: {}, width: w, height: 768, levels: 11,
                            tile_size: 254, overlap: 1});
const WIDTH = {A: 1024, B: 2048, C: 512};
const state = {slides: ["A", "B", "C"].map(k => slide(k, WIDTH[k])), runs: [], problems: [], colormaps: ["jet"],
               version: "v1"};
const layer = {id: "run0-attention", name: "attention", kind: "score", available: true, folds: ["fold0"],
               fold: "fold0", cmap: "jet"};
const details = key => ({...slide(key, WIDTH[key]), mpp: 0.5, mpp_source: "slide metadata", n_tiles: 3,
                         overlay_tile_size: 256, layers: [layer]});

const slow = {};  // url -> answers it when called
let statusText = "";
const item = src => ({src, getFullyLoaded: () => true, setOpacity() {}, addOnceHandler() {},
                      viewportToImageZoom: z => z});
const world = {
  items: [],
  getItemAt(i) { return this.items[i] || null; },
  getItemCount() { return this.items.length; },
  getIndexOfItem(it) { return this.items.indexOf(it); },
  removeItem(it) { this.items.splice(this.items.indexOf(it), 1); },
};
let onOpen = [];
const viewer = {
  world, viewport: stub(), addHandler() {}, removeOverlay() {}, addOverlay() {},
  addOnceHandler(name, fn) { if (name === "open") onOpen.push(fn); },
  open(src) {  // like OpenSeadragon: the world holds the new image alone, "open" fires afterwards
    world.items = [item(src)];
    setTimeout(() => { const h = onOpen; onOpen = []; h.forEach(f => f()); }, 0);
  },
  addTiledImage(o) { const it = item(o.tileSource); world.items.push(it); setTimeout(() => o.success({item: it}), 0); },
};
const slowUrls = new Set(process.argv[3] === "race" ? ["api/slides/B"] : []);
function fetch(url) {
  const body = url === "api/state" ? state : details(decodeURIComponent(url.split("/")[2]));
  const answer = {ok: true, json: async () => body};
  if (slowUrls.has(url)) return new Promise(resolve => { slow[url] = () => resolve(answer); });
  return Promise.resolve(answer);
}
const shown = {};  // the scale bar's elements, read by the "scalebar" scenario
for (const id of ["#scalebar", "#scalebar-bar", "#scalebar-label"]) shown[id] = {style: {}, textContent: ""};
const document = new Proxy({}, {
  get: (t, k) => (k === "querySelector"
    ? sel => (sel === "#status" ? {set textContent(v) { statusText = v; }} : shown[sel] || stub())
    : stub()),
});
const ctx = vm.createContext({window: {}, document, Node: function Node() {}, OpenSeadragon: () => viewer,
                              URLSearchParams, encodeURIComponent, setTimeout, clearTimeout, console, fetch});
vm.runInContext(fs.readFileSync(process.argv[2], "utf8"), ctx);
const G = vm.runInContext("G", ctx);
const tick = () => new Promise(r => setTimeout(r, 5));

const scenarios = {
  async urls() {
    G.state = {version: "a1b2c3"};
    const info = {key: "s 0", width: 1024, height: 768, tile_size: 254, overlap: 1, levels: 11, overlay_tile_size: 256};
    const att = {id: "run0-attention", threshold: 0.5, cmap: "jet", fold: "fold1"};
    return {version: "a1b2c3", slide: vm.runInContext("slideSource", ctx)(info).getTileUrl(10, 1, 2),
            overlay: vm.runInContext("overlaySource", ctx)(info, att).getTileUrl(10, 3, 1)};
  },
  async sources() {  // the OpenSeadragon tile sources of the slide and of an overlay, for the details in argv[4]
    G.state = {version: "v1"};
    const info = JSON.parse(process.argv[4]);
    const plain = src => Object.fromEntries(Object.entries(src).filter(([, v]) => typeof v !== "function"));
    return {slide: plain(vm.runInContext("slideSource", ctx)(info)),
            overlay: plain(vm.runInContext("overlaySource", ctx)(info, {id: "grid", threshold: 0, cmap: "jet"}))};
  },
  async scalebar() {  // the scale bar for each [mpp, screen px per level-0 px] of argv[4]
    await tick(); await tick();  // the page has opened slide A
    const update = vm.runInContext("updateScaleBar", ctx);
    const out = [];
    for (const [mpp, zoom] of JSON.parse(process.argv[4])) {
      G.slide = {...G.slide, mpp};
      viewer.viewport = {getZoom: () => 1};
      world.items[0].viewportToImageZoom = z => z * zoom;
      update();
      out.push([shown["#scalebar-bar"].style.width, shown["#scalebar-label"].textContent]);
    }
    return {bars: out};
  },
  async race() {
    await tick(); await tick();  // the page has opened slide A
    const open = vm.runInContext("openSlide", ctx);
    G.layers.forEach(l => { l.on = true; });  // A's attention layer is on
    open("B");  // B: its details are slow
    await tick();
    await open("C"); await tick();  // C: before B's details arrive
    slow["api/slides/B"](); await tick(); await tick();  // then they do
    return {slide: G.slide && G.slide.key, ready: G.ready, status: statusText,
            shown: world.items.map(it => it.src.getTileUrl(10, 0, 0))};
  },
};
scenarios[process.argv[3]]().then(r => console.log(JSON.stringify(r)));
