"""Driving app.py's page in a real headless Chromium (Debian's `chromium`, through Playwright
for Python; `playwright install` is never needed): for tests/test_app.py, and for the README's
screenshot:

    python tests/app_browser.py --model_path checkpoints/generator.pth --out docs/app.png
"""

import argparse
import base64
import os
import queue
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_NAMES = ("chromium", "chromium-browser")
VIEWPORT = {"width": 1280, "height": 800}


def system_chromium():
    """The path of the system's Chromium, or None."""
    found = (shutil.which(name) for name in CHROMIUM_NAMES)
    return next((path for path in found if path), None)


# --- The server -----------------------------------------------------------------------------

class RunningApp:
    """`python app.py --port 0 ...` started, its address read from its first lines."""

    def __init__(self, model_path, *flags, timeout=120):
        env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, str(REPO / "app.py"), "--model_path", str(model_path),
             "--port", "0", *map(str, flags)], cwd=REPO, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        self.lines = queue.Queue()
        self.thread = threading.Thread(target=self._read, daemon=True)
        self.thread.start()
        self.output = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            except queue.Empty:
                self.stop()
                raise RuntimeError(f"app.py did not start in {timeout} s:\n{self.text}")
            if line is None:
                raise RuntimeError(f"app.py exited ({self.process.wait()}):\n{self.text}")
            self.output.append(line)
            if line.startswith("serving on "):
                self.url = line.split()[2]
                return

    def _read(self):
        for line in self.process.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    @property
    def text(self):
        """All it has printed so far."""
        while True:
            try:
                line = self.lines.get_nowait()
            except queue.Empty:
                return "\n".join(self.output)
            if line is not None:
                self.output.append(line)

    def stop(self):
        if self.process.poll() is None:
            self.process.terminate()
            self.process.wait(timeout=10)

    def __enter__(self):
        return self

    def __exit__(self, *exc_info):
        self.stop()


# --- The page -------------------------------------------------------------------------------

def open_page(browser, url):
    """A page on the app; (page, list of the addresses it tried outside the server, which are
    refused)."""
    page = browser.new_page(viewport=VIEWPORT)
    outside = []

    def only_the_server(route):
        if route.request.url.startswith(url) or route.request.url.startswith(("blob:", "data:")):
            route.continue_()
        else:
            outside.append(route.request.url)
            route.abort()

    page.route("**/*", only_the_server)
    page.on("request", lambda r: None if r.url.startswith((url, "blob:", "data:"))
            else outside.append(r.url))
    page.goto(url)
    page.wait_for_selector("body[data-ready=true]")
    return page, outside


def paint(page, points, class_name=None, brush=None, tool=None):
    """One mouse stroke through `points`, in canvas pixels."""
    if class_name:
        page.click(f'[data-class="{class_name}"]')
    if brush:
        page.select_option("#brush-size", str(brush))
    if tool:
        page.click(f'[data-tool="{tool}"]')
    box = page.locator("#label-canvas").bounding_box()
    width, height = page.evaluate("[document.getElementById('label-canvas').width, "
                                  "document.getElementById('label-canvas').height]")

    def to_page(x, y):
        return box["x"] + x * box["width"] / width, box["y"] + y * box["height"] / height

    page.mouse.move(*to_page(*points[0]))
    page.mouse.down()
    for point in points[1:]:
        page.mouse.move(*to_page(*point), steps=4)
    page.mouse.up()


def _pixels(page, script):
    width, height, data = page.evaluate(script)
    return np.frombuffer(base64.b64decode(data), np.uint8).reshape(height, width, 4)[..., :3]


_TO_BASE64 = """
    const bytes = context.getImageData(0, 0, w, h).data; let text = "";
    for (let i = 0; i < bytes.length; i += 32768) {
      text += String.fromCharCode.apply(null, bytes.subarray(i, i + 32768));
    }
    return [w, h, btoa(text)];"""


def canvas_pixels(page):
    """The label canvas as an (H, W, 3) uint8 array."""
    return _pixels(page, "() => { const c = document.getElementById('label-canvas'); "
                         "const context = c.getContext('2d'); const w = c.width, h = c.height;"
                   + _TO_BASE64 + "}")


def photo_pixels(page):
    """The generated photo, at its own resolution, as an (H, W, 3) uint8 array."""
    return _pixels(page, "() => { const img = document.getElementById('photo'); "
                         "const w = img.naturalWidth, h = img.naturalHeight; "
                         "const c = new OffscreenCanvas(w, h); "
                         "const context = c.getContext('2d'); context.drawImage(img, 0, 0);"
                   + _TO_BASE64 + "}")


def wait_for_photo(page, timeout_ms=30000):
    """Until #photo shows the canvas's current drawing."""
    page.wait_for_function(
        "() => { const p = document.getElementById('photo'); return !p.hidden && p.complete && "
        "p.naturalWidth > 0 && p.dataset.version === "
        "document.getElementById('label-canvas').dataset.version; }", timeout=timeout_ms)


def generate(page):
    page.click("#generate")
    wait_for_photo(page)
    return photo_pixels(page)


def launch(playwright, chromium):
    return playwright.chromium.launch(executable_path=chromium, headless=True,
                                      args=["--no-sandbox"])  # CI runs as root


# --- The screenshot -------------------------------------------------------------------------

def screenshot(model_path, out, example="examples/street_2.png", size="512x256"):
    """The page with an example, a few strokes and its photo, saved as `out`."""
    from playwright.sync_api import sync_playwright

    chromium = system_chromium()
    if chromium is None:
        raise SystemExit("no chromium on this machine: apt-get install -y chromium")
    with RunningApp(model_path, "--channels_last") as app, sync_playwright() as playwright:
        browser = launch(playwright, chromium)
        page, outside = open_page(browser, app.url)
        page.select_option("#canvas-size", size)
        page.select_option("#example", example)
        page.wait_for_function("() => document.getElementById('label-canvas').dataset.version"
                               " === '2'")
        paint(page, [(300, 200), (360, 200), (360, 230), (300, 230)], "car", 32)
        page.click('[data-class="vegetation"]')
        generate(page)
        bottom = page.evaluate("document.getElementById('actions').getBoundingClientRect()"
                               ".bottom")
        page.screenshot(path=str(out), clip={"x": 0, "y": 0, "width": VIEWPORT["width"],
                                             "height": bottom + 16})
        browser.close()
        if outside:
            raise SystemExit(f"the page requested other addresses: {outside}")
    print(f"wrote {out}")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Screenshot of app.py's page with a photo.")
    parser.add_argument("--model_path", default="./checkpoints/generator.pth")
    parser.add_argument("--out", default="docs/app.png")
    args = parser.parse_args(argv)
    screenshot(args.model_path, args.out)


if __name__ == "__main__":
    main()
