"""app.py: palette snapping, the HTTP handler (sizes, bad requests, limits, concurrency), the
command line, and the page painted and generated in a real headless Chromium."""

import http.client
import io
import json
import os
import re
import signal
import socket
import struct
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from app_browser import (RunningApp, canvas_pixels, generate, launch, open_page, paint,
                         photo_pixels, system_chromium, wait_for_photo)
from conftest import CAMVID, cli_flags, run_in_process, run_script, tiny_config
from PIL import Image

import app
from cityscapes import COLORS, PALETTE, nearest_colors
from inference import Translator, load_generator, load_translator

# --- Palette snapping -----------------------------------------------------------------------


def test_snapping_keeps_palette_colours_and_moves_blends_to_the_nearest():
    label = np.array([[COLORS["road"], COLORS["car"], COLORS["sky"]]], np.uint8)
    assert np.array_equal(app.snap_to_palette(label), label)
    road, car = np.array(COLORS["road"]), np.array(COLORS["car"])
    blended = np.array([[road + 9, 0.8 * road + 0.2 * car, 0.2 * road + 0.8 * car]], np.uint8)
    snapped = app.snap_to_palette(blended)
    assert [tuple(p) for p in snapped[0]] == [COLORS["road"], COLORS["road"], COLORS["car"]]


def test_snapping_is_the_projects_nearest_colour_rule(rng):
    noisy = rng.integers(0, 256, (17, 23, 3), dtype=np.uint8)
    snapped = app.snap_to_palette(noisy)
    assert snapped.shape == noisy.shape and snapped.dtype == np.uint8
    assert np.array_equal(snapped, PALETTE[nearest_colors(noisy)[0]])


def test_snapping_a_real_profile_label_map_recovers_its_classes(tmp_path):
    """A label map as the public set's are (drawn large, downscaled, JPEG 4:2:0 at quality 95:
    blended borders and ringing) snaps back to the palette, mostly onto its drawn classes."""
    from demo.data import real_profile_pair, save_real_profile_jpeg
    label, _ = real_profile_pair(np.random.default_rng(5), 256)
    save_real_profile_jpeg(label, tmp_path / "label.jpg")
    jpeg = np.asarray(Image.open(tmp_path / "label.jpg").convert("RGB"))
    assert not np.array_equal(jpeg, label)  # the JPEG moved its colours
    snapped = app.snap_to_palette(jpeg)
    assert np.array_equal(snapped, PALETTE[nearest_colors(jpeg)[0]])
    assert (nearest_colors(snapped)[1] == 0).all()  # every pixel exactly on the palette
    assert (nearest_colors(snapped)[0] == nearest_colors(label)[0]).mean() > 0.9


# --- The handler, on a real server in this process ------------------------------------------

def png_bytes(array, format="PNG", **options):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=format, **options)
    return buffer.getvalue()


def street(height, width, seed=0):
    """A label map in exact colours: road, sky, a car; then antialiased like a canvas stroke."""
    rng = np.random.default_rng(seed)
    label = np.empty((height, width, 3), np.uint8)
    label[:] = COLORS["sky"]
    label[height // 2:] = COLORS["road"]
    top, left = int(rng.integers(height // 2, height - 2)), int(rng.integers(0, width - 2))
    label[top:top + height // 4, left:left + width // 3] = COLORS["car"]
    return label


@pytest.fixture(scope="module")
def server(tiny_checkpoint):
    generator, config = load_generator(tiny_checkpoint())
    service = app.PhotoService(Translator(generator, config, "cpu"))
    httpd = app.AppServer(("127.0.0.1", 0), service, max_body_bytes=2**20)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield httpd
    httpd.shutdown()
    httpd.server_close()


def request(server, method, path, body=None, content_type=None, headers=()):
    """(status, headers, body) of one request on a fresh connection."""
    connection = http.client.HTTPConnection(*server.server_address[:2], timeout=30)
    try:
        connection.putrequest(method, path, skip_accept_encoding=True,
                              skip_host="Host" in dict(headers))
        if content_type:
            connection.putheader("Content-Type", content_type)
        for name, value in dict(headers).items():
            connection.putheader(name, value)
        if body is not None and "Content-Length" not in dict(headers):
            connection.putheader("Content-Length", str(len(body)))
        connection.endheaders(body)
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), response.read()
    finally:
        connection.close()


def translate(server, array, format="PNG", content_type="image/png"):
    status, headers, body = request(server, "POST", "/api/translate",
                                    png_bytes(array, format), content_type)
    assert status == 200, body
    assert headers["Content-Type"] == "image/png"
    return np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))


@pytest.mark.parametrize("height, width, format", [(256, 256, "PNG"), (256, 512, "JPEG"),
                                                   (37, 50, "PNG")])
def test_translate_keeps_the_size(server, height, width, format):
    content_type = "image/png" if format == "PNG" else "image/jpeg"
    photo = translate(server, street(height, width), format, content_type)
    assert photo.shape == (height, width, 3)


def test_translate_is_inference_on_the_snapped_label_map(server, tiny_checkpoint):
    label = street(64, 64)
    blurred = np.asarray(Image.fromarray(label).resize((32, 32), Image.BILINEAR)
                         .resize((64, 64), Image.BILINEAR))  # off-palette borders
    generator, config = load_generator(tiny_checkpoint())
    expected = Translator(generator, config, "cpu").translate([app.snap_to_palette(blurred)])[0]
    assert np.array_equal(translate(server, blurred), expected)


def test_concurrent_requests_get_their_own_photos(server):
    labels = [street(48, 64, seed) for seed in range(6)]
    alone = [translate(server, label) for label in labels]
    with ThreadPoolExecutor(6) as pool:
        together = list(pool.map(lambda label: translate(server, label), labels * 2))
    for k, photo in enumerate(together):
        assert np.array_equal(photo, alone[k % len(labels)])


def test_snap_endpoint_returns_the_label_map_in_palette_colours(server):
    jpeg = png_bytes(street(40, 80), "JPEG", quality=70)
    status, headers, body = request(server, "POST", "/api/snap", jpeg, "image/jpeg")
    assert status == 200 and headers["Content-Type"] == "image/png"
    snapped = np.asarray(Image.open(io.BytesIO(body)).convert("RGB"))
    decoded = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB"))
    assert np.array_equal(snapped, app.snap_to_palette(decoded))


def big_png(width, height):
    return png_bytes(np.zeros((height, width, 3), np.uint8), compress_level=9)


def png_header_only(width, height):
    """A PNG that claims width x height pixels and holds none (a decompression bomb's header)."""
    def chunk(kind, data):
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data)))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IEND", b"")


BAD_REQUESTS = {
    "not an image": ("POST", "/api/translate", b"hello", "image/png", 400, "not a PNG or JPEG"),
    "a GIF": ("POST", "/api/translate", None, "image/png", 400, "not a PNG or JPEG"),
    "truncated": ("POST", "/api/translate", None, "image/png", 400, "corrupt or truncated"),
    "wrong type": ("POST", "/api/translate", b"x", "text/plain", 415, "image/png or image/jpeg"),
    "no type": ("POST", "/api/translate", b"x", None, 415, "image/png or image/jpeg"),
    "too many pixels": ("POST", "/api/translate", None, "image/png", 413, "pixels"),
    "bomb header": ("POST", "/api/translate", None, "image/png", 413, "pixels"),
    "too narrow": ("POST", "/api/translate", None, "image/png", 400, "long side"),
    "single channel": ("POST", "/api/translate", None, "image/png", 400, "single-channel"),
    "GET translate": ("GET", "/api/translate", None, None, 405, "use POST"),
    "PUT translate": ("PUT", "/api/translate", b"x", "image/png", 405, "use POST"),
    "DELETE page": ("DELETE", "/", None, None, 405, "use GET"),
    "unknown method": ("BREW", "/", None, None, 405, "BREW"),
    "unknown page": ("GET", "/nowhere.html", None, None, 404, "/nowhere.html"),
    "POST elsewhere": ("POST", "/nowhere", b"x", "image/png", 404, "/nowhere"),
    "POST the page": ("POST", "/app.js", b"x", "image/png", 405, "use GET"),
    "unknown API": ("POST", "/api/nowhere", b"x", "image/png", 404, "/api/nowhere"),
    "outside web/": ("GET", "/../app.py", None, None, 404, "app.py"),
    "escaped outside": ("GET", "/%2e%2e/app.py", None, None, 404, "app.py"),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_requests_get_a_json_error_and_the_server_keeps_serving(server, case):
    method, path, body, content_type, status, words = BAD_REQUESTS[case]
    good = png_bytes(street(32, 32))
    body = {"a GIF": png_bytes(street(32, 32), "GIF"), "truncated": good[:len(good) // 2],
            "too many pixels": big_png(2049, 2048), "too narrow": big_png(100, 20),
            "bomb header": png_header_only(30000, 30000),
            "single channel": png_bytes(np.zeros((32, 32), np.uint8))}.get(case, body)
    got, headers, answer = request(server, method, path, body, content_type)
    assert got == status, answer
    assert headers["Content-Type"] == "application/json"
    assert words in json.loads(answer)["error"]
    assert translate(server, street(32, 32)).shape == (32, 32, 3)


def test_the_body_is_capped_before_it_is_read(server):
    cap = server.max_body_bytes
    headers = {"Content-Length": str(cap + 1)}
    status, _, answer = request(server, "POST", "/api/translate", b"", "image/png", headers)
    assert status == 413 and str(cap) in json.loads(answer)["error"]
    status, _, answer = request(server, "POST", "/api/translate", None, "image/png")
    assert status == 411 and "Content-Length" in json.loads(answer)["error"]
    assert translate(server, street(32, 32)).shape == (32, 32, 3)


def test_page_config_and_static_files(server):
    status, headers, body = request(server, "GET", "/")
    assert status == 200 and headers["Content-Type"].startswith("text/html")
    for element in ('id="label-canvas"', 'id="generate"', 'id="photo"'):
        assert element in body.decode()
    assert "default-src 'self'" in headers["Content-Security-Policy"]
    status, headers, body = request(server, "GET", "/api/config")
    config = json.loads(body)
    assert [entry["name"] for entry in config["palette"]] == list(app.PAINT_CLASSES)
    assert {e["name"]: tuple(e["color"]) for e in config["palette"]}["void"] == (0, 0, 0)
    for path in ("/app.js", "/app.css", *(f"/{p}" for p in config["examples"])):
        assert request(server, "GET", path)[0] == 200, path


def test_the_page_names_no_other_address():
    for path in app.WEB_DIR.rglob("*"):
        if path.suffix in (".html", ".js", ".css"):
            text = path.read_text()
            assert not re.search(r"(https?:)?//[a-z0-9.-]+\.[a-z]{2,}", text, re.I), path
            assert "@import" not in text and "@font-face" not in text, path


def test_shipped_examples_are_the_scene_codes_drawings(tmp_path):
    shipped = sorted(app.EXAMPLES_DIR.glob("*.png"))
    written = app.write_examples(tmp_path)
    assert [p.name for p in shipped] == [p.name for p in written] and len(shipped) >= 3
    for ours, fresh in zip(shipped, written):
        label = np.asarray(Image.open(ours).convert("RGB"))
        assert label.shape == (256, 256, 3)
        assert np.array_equal(label, np.asarray(Image.open(fresh).convert("RGB"))), \
            f"{ours} is stale: rerun `python app.py --write_examples`"
        assert np.array_equal(app.snap_to_palette(label), label)


# --- The command line -----------------------------------------------------------------------

def test_without_a_checkpoint_one_line_says_how_to_make_one(tmp_path, capsys):
    status, _, err = run_in_process(app.main, ["--model_path", tmp_path / "none.pth"], capsys)
    assert status == 2 and "Traceback" not in err
    assert len(err.strip().splitlines()) == 1 and "python train.py --demo" in err


def test_a_busy_port_is_one_line(tiny_checkpoint, capsys):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        status, _, err = run_in_process(app.main, ["--model_path", tiny_checkpoint(),
                                                   "--port", port], capsys)
    assert status == 2 and "cannot listen" in err and "Traceback" not in err


def test_only_loopback_hosts_pass_without_a_warning():
    assert all(app.is_loopback(h) for h in ("127.0.0.1", "localhost", "::1", "127.0.0.2"))
    assert not any(app.is_loopback(h) for h in ("0.0.0.0", "::", "192.0.2.1", "example.org"))


def test_the_script_serves_and_stops_on_ctrl_c(tiny_checkpoint):
    with RunningApp(tiny_checkpoint()) as running:
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", running.url)
        running.process.send_signal(signal.SIGINT)
        assert running.process.wait(timeout=20) == 0
        running.thread.join(timeout=5)
    assert "stopped" in running.text and "Traceback" not in running.text


# --- The page in a real browser -------------------------------------------------------------

def browser_or_skip():
    """The system Chromium and Playwright; skipped where either is missing, except in CI."""
    chromium = system_chromium()
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright = None
    missing = [name for name, found in (("chromium", chromium), ("playwright", sync_playwright))
               if not found]
    if missing:
        reason = f"{' and '.join(missing)} not installed (apt-get install chromium; " \
                 "pip install playwright)"
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the browser test: {reason}")
        pytest.skip(reason)
    return chromium, sync_playwright


@pytest.fixture(scope="module")
def trained_checkpoint(tmp_path_factory, demo_set):
    """A tiny generator trained for 24 steps by train.py itself (about 5 s)."""
    folder = tmp_path_factory.mktemp("app_run")
    config = tiny_config(folder, demo_set, epochs=6, lr=2e-3)  # enough to follow the input
    result = run_script("train.py", *cli_flags(config))
    assert result.returncode == 0, result.stderr
    return folder / "checkpoints" / "generator.pth"


def palette_only(pixels):
    return np.array_equal(app.snap_to_palette(np.ascontiguousarray(pixels)), pixels)


def test_paint_generate_undo_in_chromium(trained_checkpoint):
    chromium, sync_playwright = browser_or_skip()
    # fp32: the photo is compared with this process's fp32 translation of the canvas.
    with RunningApp(trained_checkpoint, "--precision", "fp32") as running, \
            sync_playwright() as playwright:
        browser = launch(playwright, chromium)
        page, outside = open_page(browser, running.url)
        paint(page, [(20, 200), (120, 150), (230, 210)], "car", brush=32)
        first = canvas_pixels(page)
        assert first.shape == (256, 256, 3) and palette_only(first)
        assert (first == COLORS["car"]).all(axis=-1).mean() > 0.05
        photo = generate(page)
        assert photo.shape == first.shape and not palette_only(photo)
        model, _ = load_translator(trained_checkpoint, "cpu", "fp32")  # as the page loads it
        assert np.array_equal(photo, model.translate([first])[0])  # the model's photo of it

        paint(page, [(40, 40), (200, 60)], "sky", brush=64)
        second = canvas_pixels(page)
        assert not np.array_equal(second, first)
        changed = generate(page)
        assert np.abs(changed.astype(int) - photo).mean() > 1
        page.click("#undo")
        assert np.array_equal(canvas_pixels(page), first)
        assert np.array_equal(generate(page), photo)  # eval mode: the same drawing, the same
        page.click("#redo")
        assert np.array_equal(canvas_pixels(page), second)

        page.check("#live")  # regenerates after each stroke, without Generate
        paint(page, [(10, 10), (60, 120)], "building", brush=16, tool="rect")
        wait_for_photo(page)
        assert photo_pixels(page).shape == (256, 256, 3)

        page.select_option("#canvas-size", "512x256")
        page.select_option("#example", "examples/street_1.png")
        page.wait_for_function("() => document.getElementById('label-canvas').width === 512")
        wait_for_photo(page)
        assert photo_pixels(page).shape == (256, 512, 3) and palette_only(canvas_pixels(page))

        page.route("**/api/translate", lambda route: route.fulfill(
            status=413, content_type="application/json", body='{"error": "too big, sorry"}'))
        page.click("#generate")
        page.wait_for_selector("#error:has-text('too big, sorry')")
        browser.close()
    assert not outside, f"the page requested other addresses: {outside}"


# --- Against a hostile image and a hostile website ------------------------------------------

def all_colours(side):
    """(side, side, 3) uint8 with every pixel a different colour (a 34 KB PNG at 2048)."""
    codes = np.arange(side * side, dtype=np.uint32).reshape(side, side) * 4
    return np.stack([(codes >> 16) & 255, (codes >> 8) & 255, codes & 255], -1).astype(np.uint8)


def test_snapping_takes_distinct_colours_in_bounded_chunks():
    image = all_colours(64)  # 4096 distinct colours
    calls = []
    chunked, distance = nearest_colors(image, chunk=1000, between_chunks=lambda: calls.append(1))
    assert len(calls) == 5  # ceil(4096 / 1000) distance matrices of at most 1000 x 35
    whole, whole_distance = nearest_colors(image, chunk=1 << 20)
    assert np.array_equal(chunked, whole) and np.array_equal(distance, whole_distance)


def test_chunked_snapping_is_exact_on_real_profile_halves(tmp_path):
    """Both halves of a pair with the real set's profile (a dark grey photo; a JPEG-ringed
    label map with blended borders), and a real CamVid pair where ../shared/camvid is: chunks
    give the whole computation's colours and distances, photo half and label half alike."""
    from demo.data import real_profile_pair, save_real_profile_jpeg
    label, photo = real_profile_pair(np.random.default_rng(3), 128)
    halves = []
    for name, half in (("label", label), ("photo", photo)):
        save_real_profile_jpeg(half, tmp_path / f"{name}.jpg")
        halves.append(np.asarray(Image.open(tmp_path / f"{name}.jpg").convert("RGB")))
    camvid = CAMVID / "val" / "1.jpg"
    if camvid.is_file():
        pair = np.asarray(Image.open(camvid).convert("RGB"))
        halves += [pair[:, :pair.shape[1] // 2], pair[:, pair.shape[1] // 2:]]
    for half in halves:
        assert len(np.unique(half.reshape(-1, 3), axis=0)) > 1000  # many colours: many chunks
        chunked, distance = nearest_colors(half, chunk=257)
        whole, whole_distance = nearest_colors(half, chunk=1 << 20)
        assert np.array_equal(chunked, whole) and np.array_equal(distance, whole_distance)


def test_an_injected_deadline_stops_the_snapping_between_chunks():
    with pytest.raises(app.RequestTimeout):
        app.snap_to_palette(all_colours(32), app.Deadline(-1))
    assert app.snap_to_palette(all_colours(32), app.Deadline(60)).shape == (32, 32, 3)


@pytest.fixture
def small_server(tiny_checkpoint):
    """A server of its own with small caps, to be filled by a test: make(**AppServer options)."""
    made = []

    def make(**options):
        generator, config = load_generator(tiny_checkpoint())
        httpd = app.AppServer(("127.0.0.1", 0), app.PhotoService(Translator(generator, config,
                                                                            "cpu")), **options)
        threading.Thread(target=httpd.serve_forever, daemon=True).start()
        made.append(httpd)
        return httpd
    yield make
    for httpd in made:
        httpd.shutdown()
        httpd.server_close()


def raw_exchange(server, data, timeout=10.0, drip=None):
    """Send `data` (or drip it a byte every `drip` seconds until the server answers); return
    what the server sent until it closed."""
    with socket.create_connection(server.server_address[:2], timeout=timeout) as sock:
        if drip is None:
            sock.sendall(data)
        else:
            sock.settimeout(drip)
            for byte in data:
                try:
                    sock.sendall(bytes([byte]))
                    if sock.recv(1, socket.MSG_PEEK):
                        break
                except TimeoutError:
                    continue
                except OSError:
                    break
        sock.settimeout(timeout)
        received = b""
        while chunk := sock.recv(65536):
            received += chunk
        return received


def test_a_full_decode_cap_answers_503(small_server):
    server = small_server(max_decodes=1, decode_wait_seconds=0.3)
    server.decodes.acquire()  # a decode in progress, for longer than a request waits
    try:
        started = time.monotonic()
        status, headers, answer = request(server, "POST", "/api/translate",
                                          png_bytes(street(32, 32)), "image/png")
        assert status == 503 and "busy" in json.loads(answer)["error"]
        assert time.monotonic() - started >= 0.3  # it waited its turn first
    finally:
        server.decodes.release()
    assert translate(server, street(32, 32)).shape == (32, 32, 3)


def test_a_request_waits_for_a_decode_slot_and_is_served(small_server):
    server = small_server(max_decodes=1, decode_wait_seconds=10)
    server.decodes.acquire()  # a decode in progress, ending in 0.3 s
    threading.Timer(0.3, server.decodes.release).start()
    assert translate(server, street(32, 32)).shape == (32, 32, 3)


def test_a_trickling_client_gets_408_at_the_total_deadline(small_server):
    server = small_server(request_seconds=1.0)
    head = b"POST /api/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
    started = time.monotonic()
    answer = raw_exchange(server, head + b"Content-Length: 100\r\n\r\n" + b"x" * 100, drip=0.2)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]
    assert time.monotonic() - started < 5  # one read at a time would never end
    answer = raw_exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: " + b"y" * 60,
                          drip=0.2)
    assert answer.startswith(b"HTTP/1.1 408"), answer[:200]


def test_connections_over_the_cap_get_503_and_are_closed(small_server):
    server = small_server(max_connections=2, request_seconds=20)
    idle = [socket.create_connection(server.server_address[:2]) for _ in range(2)]
    try:
        time.sleep(0.2)  # both taken by their threads
        answer = raw_exchange(server, b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert answer.startswith(b"HTTP/1.1 503") and b"busy" in answer, answer[:200]
    finally:
        for sock in idle:
            sock.close()
    time.sleep(0.3)
    assert request(server, "GET", "/api/config")[0] == 200


@pytest.mark.parametrize("host, allowed, status", [
    ("attacker.example", (), 403), ("attacker.example:8000", (), 403), ("", (), 403),
    ("localhost:8000", (), 200), ("LOCALHOST", (), 200), ("127.0.0.1:1", (), 200),
    ("[::1]:8000", (), 200), ("pix2pix.lan:8000", ("pix2pix.lan",), 200),
    ("evil.lan", ("pix2pix.lan",), 403)])
def test_only_loopback_and_listed_host_names_are_served(small_server, host, allowed, status):
    server = small_server(allowed_hosts=allowed)
    for method, path, body in (("GET", "/api/config", None),
                               ("POST", "/api/snap", png_bytes(street(16, 16)))):
        got, _, answer = request(server, method, path, body, "image/png",
                                 headers={"Host": host})
        assert got == status, answer[:200]


def test_a_post_from_another_sites_page_is_refused(server):
    host = "127.0.0.1:%d" % server.server_address[1]
    body = png_bytes(street(16, 16))
    for origin, status in ((f"http://{host}", 200), ("http://attacker.example", 403),
                           ("null", 403)):
        got, _, answer = request(server, "POST", "/api/snap", body, "image/png",
                                 headers={"Host": host, "Origin": origin})
        assert got == status, (origin, answer[:200])
    _, headers, _ = request(server, "GET", "/")
    assert "frame-ancestors 'none'" in headers["Content-Security-Policy"]


@pytest.mark.parametrize("length", ["\u00b2", "1" * 5000, "12, 12", "-1", " 1e3"],
                         ids=["superscript two", "5000 digits", "two numbers", "negative",
                              "exponent"])
def test_a_malformed_content_length_is_400_without_internals(server, length):
    head = (f"POST /api/translate HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
            f"Content-Length: {length}\r\n\r\n").encode("latin-1")  # as headers are read
    answer = raw_exchange(server, head)
    assert answer.startswith(b"HTTP/1.1 400"), answer[:300]
    error = json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "Content-Length" in error and "Error" not in error and "int" not in error, error


@pytest.mark.parametrize("path", ["/%00", "/" + "a" * 300, "/%ff%fe", "//[x", "/a%0d%0ab"],
                         ids=["NUL", "300 characters", "not UTF-8", "bracket", "CR LF"])
def test_odd_paths_get_an_answer_and_no_traceback(server, path, capsys):
    answer = raw_exchange(server, f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                                  "Connection: close\r\n\r\n".encode())
    assert answer[:12] in (b"HTTP/1.1 404", b"HTTP/1.1 400"), answer[:300]
    assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]
    assert "Traceback" not in capsys.readouterr().err


def test_a_failed_translation_does_not_echo_the_exception(server, monkeypatch):
    def broken(label, deadline=None):
        raise RuntimeError("/secret/path/model.pth: internal detail")
    monkeypatch.setattr(server.service, "translate", broken)
    status, _, answer = request(server, "POST", "/api/translate", png_bytes(street(16, 16)),
                                "image/png")
    assert status == 500 and b"secret" not in answer and b"internal" not in answer


def test_the_page_turns_an_exif_rotated_jpeg_as_inference_does(server, tmp_path):
    from dataset import read_rgb
    exif = Image.Exif()
    exif[0x0112] = 6  # shown rotated: 32 wide, 48 high
    path = tmp_path / "rotated.jpg"
    Image.fromarray(street(32, 48)).save(path, exif=exif, quality=95)
    status, _, answer = request(server, "POST", "/api/snap", path.read_bytes(), "image/jpeg")
    assert status == 200, answer
    snapped = np.asarray(Image.open(io.BytesIO(answer)).convert("RGB"))
    assert np.array_equal(snapped, app.snap_to_palette(read_rgb(path, "label map")))
