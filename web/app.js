// Paint a label map, see the photo. Plain JavaScript, no build step, no other address.
//
// The drawing lives in `pixels`, one 32-bit RGBA value per pixel, and is drawn without
// anti-aliasing, so every pixel is exactly a palette colour and flood fill sees clean
// regions. The server snaps to the palette anyway (files, other clients).
"use strict";

const DISPLAY_HEIGHT = 384, DISPLAY_WIDTH = 576;  // at most, in CSS pixels: side by side
const UNDO_LIMIT = 100;

const canvas = document.getElementById("label-canvas");
const context = canvas.getContext("2d", { willReadFrequently: true });
const photo = document.getElementById("photo");
const byId = (id) => document.getElementById(id);

const state = {
  palette: [],         // [{name, color: [r, g, b]}]
  colorValue: 0,       // the brush colour as a 32-bit RGBA value
  tool: "brush",
  image: null,         // ImageData of the canvas
  pixels: null,        // Uint32Array over image.data
  undo: [], redo: [],
  version: 0,          // bumped at each change of the drawing
  stroke: null,        // {last: [x, y], start: [x, y], before: Uint32Array} while drawing
  inFlight: false, wanted: false, photoUrl: null,
};

// --- Colours and the canvas -----------------------------------------------------------------

function rgbaValue([r, g, b]) {  // the value of an opaque pixel in a little-endian Uint32Array
  return ((255 << 24) | (b << 16) | (g << 8) | r) >>> 0;
}

function resize(width, height) {
  canvas.width = width;
  canvas.height = height;
  const scale = Math.min(DISPLAY_HEIGHT / height, DISPLAY_WIDTH / width);
  for (const element of [canvas, byId("photo-frame"), photo]) {
    element.style.width = `${Math.round(width * scale)}px`;
    element.style.height = `${Math.round(height * scale)}px`;
  }
  state.image = context.createImageData(width, height);
  state.pixels = new Uint32Array(state.image.data.buffer);
  byId("canvas-size").value = `${width}x${height}`;
}

function redraw() {
  context.putImageData(state.image, 0, 0);
  canvas.dataset.version = String(state.version);
}

function changed() {  // after each finished edit
  state.version += 1;
  redraw();
  updateButtons();
  if (byId("live").checked) requestPhoto();
}

function remember() {  // the drawing as it is, for undo; called before an edit
  state.undo.push(snapshot());
  if (state.undo.length > UNDO_LIMIT) state.undo.shift();
  state.redo = [];
}

function snapshot() {
  return { width: canvas.width, height: canvas.height, pixels: state.pixels.slice() };
}

function restore(saved) {
  if (saved.width !== canvas.width || saved.height !== canvas.height) {
    resize(saved.width, saved.height);
  }
  state.pixels.set(saved.pixels);
}

function undoOrRedo(from, to) {
  if (!from.length) return;
  to.push(snapshot());
  restore(from.pop());
  changed();
}

function updateButtons() {
  byId("undo").disabled = !state.undo.length;
  byId("redo").disabled = !state.redo.length;
}

// --- Tools ----------------------------------------------------------------------------------

function stamp(cx, cy, radius) {  // a filled disc
  const { width, height } = canvas, r2 = radius * radius;
  const y0 = Math.max(0, Math.ceil(cy - radius));
  const y1 = Math.min(height - 1, Math.floor(cy + radius));
  for (let y = y0; y <= y1; y++) {
    const half = Math.sqrt(Math.max(0, r2 - (y - cy) ** 2));
    const x0 = Math.max(0, Math.ceil(cx - half)), x1 = Math.min(width - 1, Math.floor(cx + half));
    if (x0 <= x1) state.pixels.fill(state.colorValue, y * width + x0, y * width + x1 + 1);
  }
}

function line([xa, ya], [xb, yb]) {  // discs along the segment, closer than half a radius
  const radius = Math.max(0.5, Number(byId("brush-size").value) / 2);
  const steps = Math.max(1, Math.ceil(Math.hypot(xb - xa, yb - ya) / Math.max(1, radius / 2)));
  for (let i = 0; i <= steps; i++) {
    stamp(xa + (xb - xa) * i / steps, ya + (yb - ya) * i / steps, radius);
  }
}

function rectangle([xa, ya], [xb, yb]) {
  const { width, height } = canvas;
  const clamp = (value, size) => Math.min(size - 1, Math.max(0, Math.floor(value)));
  const x0 = clamp(Math.min(xa, xb), width), x1 = clamp(Math.max(xa, xb), width);
  const y0 = clamp(Math.min(ya, yb), height), y1 = clamp(Math.max(ya, yb), height);
  for (let y = y0; y <= y1; y++) {
    state.pixels.fill(state.colorValue, y * width + x0, y * width + x1 + 1);
  }
}

function floodFill(x, y) {  // 4-connected region of the clicked colour
  const { width, height } = canvas, pixels = state.pixels;
  const target = pixels[y * width + x], color = state.colorValue;
  if (target === color) return false;
  const stack = [y * width + x];
  while (stack.length) {
    const i = stack.pop();
    if (pixels[i] !== target) continue;
    let left = i, right = i;
    const rowStart = i - (i % width), rowEnd = rowStart + width - 1;
    while (left > rowStart && pixels[left - 1] === target) left--;
    while (right < rowEnd && pixels[right + 1] === target) right++;
    pixels.fill(color, left, right + 1);
    for (let j = left; j <= right; j++) {
      if (j >= width && pixels[j - width] === target) stack.push(j - width);
      if (j < width * (height - 1) && pixels[j + width] === target) stack.push(j + width);
    }
  }
  return true;
}

function canvasPoint(event) {  // pointer position in canvas pixels
  const box = canvas.getBoundingClientRect();
  return [(event.clientX - box.left) * canvas.width / box.width,
          (event.clientY - box.top) * canvas.height / box.height];
}

function onPointerDown(event) {
  if (event.button !== 0) return;
  const point = canvasPoint(event);
  if (state.tool === "fill") {
    const x = Math.floor(point[0]), y = Math.floor(point[1]);
    if (x < 0 || y < 0 || x >= canvas.width || y >= canvas.height) return;
    const before = snapshot();
    if (floodFill(x, y)) {
      state.undo.push(before);
      state.redo = [];
      changed();
    }
    return;
  }
  canvas.setPointerCapture(event.pointerId);
  remember();
  state.stroke = { start: point, last: point, before: state.pixels.slice() };
  if (state.tool === "brush") line(point, point); else rectangle(point, point);
  redraw();
}

function onPointerMove(event) {
  if (!state.stroke) return;
  const point = canvasPoint(event);
  if (state.tool === "brush") {
    line(state.stroke.last, point);
  } else {
    state.pixels.set(state.stroke.before);
    rectangle(state.stroke.start, point);
  }
  state.stroke.last = point;
  redraw();
}

function onPointerUp() {
  if (!state.stroke) return;
  state.stroke = null;
  changed();
}

// --- Label maps from examples and files -----------------------------------------------------

function nearestSize(width, height) {  // the canvas size of the closest aspect ratio
  const aspect = width / height;
  return [...state.sizes].sort((a, b) => Math.abs(Math.log(a[0] / a[1] / aspect))
                                         - Math.abs(Math.log(b[0] / b[1] / aspect)))[0];
}

async function loadLabelMap(blob, fitCanvas) {
  const bitmap = await createImageBitmap(blob);
  remember();
  if (fitCanvas) resize(...nearestSize(bitmap.width, bitmap.height));
  // Nearest neighbour keeps the colours exact (256x256 examples become 512x256 by doubling
  // the columns: the public set's squares are 2:1 Cityscapes frames squeezed).
  context.imageSmoothingEnabled = false;
  context.drawImage(bitmap, 0, 0, canvas.width, canvas.height);
  state.image = context.getImageData(0, 0, canvas.width, canvas.height);
  state.pixels = new Uint32Array(state.image.data.buffer);
  changed();
}

async function openFile(file) {
  // The server snaps the file's pixels to the palette (the project's one nearest-colour
  // rule): JPEG label maps and antialiased drawings come back in exact colours.
  try {
    if (!["image/png", "image/jpeg"].includes(file.type)) {
      throw new Error(`${file.name}: not a PNG or JPEG file`);
    }
    const response = await fetch("api/snap", { method: "POST", body: file,
                                                headers: { "Content-Type": file.type } });
    if (!response.ok) throw new Error(`${file.name}: ${await errorText(response)}`);
    await loadLabelMap(await response.blob(), true);
    showError("");
  } catch (error) {
    showError(error.message);
  }
}

// --- Photos ---------------------------------------------------------------------------------

function requestPhoto() {  // one request in flight; the latest drawing is sent next
  state.wanted = true;
  if (!state.inFlight) sendLatest();
}

async function sendLatest() {
  state.wanted = false;
  state.inFlight = true;
  const version = state.version, started = performance.now();
  byId("status").textContent = "generating…";
  try {
    const body = await new Promise((resolve) => canvas.toBlob(resolve, "image/png"));
    const response = await fetch("api/translate", { method: "POST", body,
                                                    headers: { "Content-Type": "image/png" } });
    if (!response.ok) throw new Error(await errorText(response));
    showPhoto(await response.blob(), version);
    byId("status").textContent = `photo in ${Math.round(performance.now() - started)} ms`;
    showError("");
  } catch (error) {
    byId("status").textContent = "";
    showError(error instanceof TypeError ? "the server did not answer; is app.py still running?"
                                         : error.message);
  } finally {
    state.inFlight = false;
    if (state.wanted) sendLatest();
  }
}

async function errorText(response) {
  try {
    return (await response.json()).error || `${response.status} ${response.statusText}`;
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function showPhoto(blob, version) {
  if (state.photoUrl) URL.revokeObjectURL(state.photoUrl);
  state.photoUrl = URL.createObjectURL(blob);
  photo.onload = () => {
    photo.dataset.version = String(version);  // the drawing this photo was made from
    photo.hidden = false;
    byId("photo-placeholder").hidden = true;
  };
  photo.src = state.photoUrl;
  const link = byId("download-photo");
  link.href = state.photoUrl;
  link.removeAttribute("aria-disabled");
}

function showError(message) {
  byId("error").textContent = message;
  byId("error").hidden = !message;
}

// --- Setting up -----------------------------------------------------------------------------

function buildPalette(palette) {
  const box = byId("palette");
  for (const { name, color } of palette) {
    const button = document.createElement("button");
    button.type = "button";
    button.dataset.class = name;
    button.setAttribute("role", "radio");
    button.title = `${name} (${color.join(", ")})`;
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.style.background = `rgb(${color.join(",")})`;
    button.append(swatch, name);
    button.addEventListener("click", () => choose(name));
    box.append(button);
  }
}

function choose(name) {
  const entry = state.palette.find((e) => e.name === name);
  state.colorValue = rgbaValue(entry.color);
  for (const button of byId("palette").children) {
    const active = button.dataset.class === name;
    button.classList.toggle("active", active);
    button.setAttribute("aria-checked", String(active));
  }
}

function fillWith(name) {
  const entry = state.palette.find((e) => e.name === name);
  state.pixels.fill(rgbaValue(entry.color));
}

function wire() {
  canvas.addEventListener("pointerdown", onPointerDown);
  canvas.addEventListener("pointermove", onPointerMove);
  canvas.addEventListener("pointerup", onPointerUp);
  canvas.addEventListener("pointercancel", onPointerUp);
  for (const button of document.querySelectorAll(".tool")) {
    button.addEventListener("click", () => {
      state.tool = button.dataset.tool;
      for (const other of document.querySelectorAll(".tool")) {
        other.classList.toggle("active", other === button);
      }
    });
  }
  byId("undo").addEventListener("click", () => undoOrRedo(state.undo, state.redo));
  byId("redo").addEventListener("click", () => undoOrRedo(state.redo, state.undo));
  byId("clear").addEventListener("click", () => { remember(); fillWith("void"); changed(); });
  byId("canvas-size").addEventListener("change", (event) => {
    remember();
    resize(...event.target.value.split("x").map(Number));
    fillWith("void");
    changed();
  });
  byId("example").addEventListener("change", async (event) => {
    if (!event.target.value) return;
    const response = await fetch(event.target.value);
    await loadLabelMap(await response.blob(), false);
    event.target.value = "";
  });
  byId("file").addEventListener("change", (event) => {
    if (event.target.files.length) openFile(event.target.files[0]);
    event.target.value = "";
  });
  canvas.addEventListener("dragover", (event) => {
    event.preventDefault();
    canvas.classList.add("dropping");
  });
  canvas.addEventListener("dragleave", () => canvas.classList.remove("dropping"));
  canvas.addEventListener("drop", (event) => {
    event.preventDefault();
    canvas.classList.remove("dropping");
    if (event.dataTransfer.files.length) openFile(event.dataTransfer.files[0]);
  });
  byId("generate").addEventListener("click", requestPhoto);
  byId("live").addEventListener("change", (event) => { if (event.target.checked) requestPhoto(); });
  byId("download-label").addEventListener("click", (event) => {
    event.currentTarget.href = canvas.toDataURL("image/png");
  });
  document.addEventListener("keydown", (event) => {
    if (!(event.ctrlKey || event.metaKey) || event.target.tagName === "INPUT") return;
    const key = event.key.toLowerCase();
    if (key === "z" && !event.shiftKey) undoOrRedo(state.undo, state.redo);
    else if (key === "y" || (key === "z" && event.shiftKey)) undoOrRedo(state.redo, state.undo);
    else return;
    event.preventDefault();
  });
}

async function start() {
  const config = await (await fetch("api/config")).json();
  state.palette = config.palette;
  state.sizes = config.sizes;
  buildPalette(config.palette);
  for (const [width, height] of config.sizes) {
    byId("canvas-size").add(new Option(`${width}×${height}`, `${width}x${height}`));
  }
  for (const path of config.examples) {
    byId("example").add(new Option(path.split("/").pop().replace(/\.png$/, ""), path));
  }
  wire();
  resize(...config.sizes[0]);
  fillWith("void");
  choose("road");
  redraw();
  updateButtons();
  document.body.dataset.ready = "true";
}

start().catch((error) => showError(`could not start the page: ${error.message}`));
