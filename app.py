"""Paint a label map, see the photo: a local web page on a trained generator.

    python app.py --model_path ./checkpoints/generator.pth     # then open http://127.0.0.1:8000/

Serves the page in web/ (no build step; nothing is loaded from any other address) and
`POST /api/translate`: a PNG or JPEG label map in, a PNG photo of the same size out. Every
pixel is first snapped to the nearest Cityscapes colour (canvas strokes and JPEGs blur the
colours); the model is loaded and run by inference.py's load_translator.

The server is the standard library's ThreadingHTTPServer: one thread per connection, so
decoding and PNG encoding overlap, while the generator runs one request at a time (a lock).
"""

import argparse
import io
import ipaddress
import json
import re
import socket
import sys
import threading
import time
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

import devices
from cityscapes import COLORS, PALETTE, nearest_colors
from dataset import decode
from utils import UserError, one_line, run_cli

WEB_DIR = Path(__file__).resolve().parent / "web"
EXAMPLES_DIR = WEB_DIR / "examples"
EXAMPLE_SEEDS = (3, 7, 11, 20)  # make_scene seeds of the shipped examples (web/examples/)

# The classes the page paints, in the palette's order; "void" is Cityscapes' "unlabeled".
PAINT_CLASSES = ("road", "sidewalk", "building", "wall", "fence", "pole", "traffic light",
                 "traffic sign", "vegetation", "terrain", "sky", "person", "rider", "car",
                 "truck", "bus", "train", "motorcycle", "bicycle", "void")
VOID_CLASS = "unlabeled"
CANVAS_SIZES = ((256, 256), (512, 256))  # (width, height); the first is the default

MAX_BODY_BYTES = 8 * 2**20
MAX_PIXELS = 2048 * 2048  # checked from the image header, before decoding
MAX_ASPECT = 4  # the long side over the short one: the short side is scaled to the model's size
IMAGE_TYPES = {"image/png": "PNG", "image/jpeg": "JPEG"}
STATIC_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
                ".css": "text/css; charset=utf-8", ".png": "image/png"}
# The browser enforces what the page promises: nothing from any other address, and no other
# site may frame it.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'; "
                           "frame-ancestors 'none'")
# What a client may cost the server: every request (its reading, decoding, snapping and
# waiting for the generator) has a total deadline; connections and concurrent decodes are
# capped. A connection over its cap is answered 503 at once; a request waits for a decode slot
# up to DECODE_WAIT_SECONDS (a few users, or live mode beside a download, are served in turn),
# then 503.
REQUEST_SECONDS = 30.0
MAX_CONNECTIONS = 32
MAX_DECODES = 2  # a 2048x2048 decode and snap takes ~100 MB: two at a time
DECODE_WAIT_SECONDS = 10.0
MAX_PATH_CHARS = 200
BUSY_BODY = b'{"error": "the server is busy; try again in a moment"}'
BUSY_RESPONSE = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\nRetry-After: 1\r\nConnection: close\r\n\r\n%s"
                 % (len(BUSY_BODY), BUSY_BODY))


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# --- Label maps in, photos out ----------------------------------------------------------------

class RequestTimeout(Exception):
    """The request's total deadline passed (not a TimeoutError: the standard library's handler
    would close the connection without an answer)."""


class Deadline:
    """A moment in time.monotonic() seconds; `check()` raises RequestTimeout after it."""

    def __init__(self, seconds):
        self.at = time.monotonic() + seconds

    def remaining(self):
        return self.at - time.monotonic()

    def check(self):
        if self.remaining() <= 0:
            raise RequestTimeout("the request took too long")


def snap_to_palette(label, deadline=None):
    """(H, W, 3) uint8 -> every pixel replaced by its nearest Cityscapes colour (the project's
    one nearest-colour rule, cityscapes.nearest_colors, in bounded chunks of distinct colours,
    checking `deadline` between them)."""
    return PALETTE[nearest_colors(label, between_chunks=deadline and deadline.check)[0]]


def decode_label_map(body, content_type, max_pixels=MAX_PIXELS):
    """Request body -> (H, W, 3) uint8 colour label map, or a RequestError saying why not."""
    kind = (content_type or "").split(";")[0].strip().lower()
    if kind not in IMAGE_TYPES:
        raise RequestError(HTTPStatus.UNSUPPORTED_MEDIA_TYPE,
                           f"Content-Type {kind or '(none)'!r}: send the label map as "
                           "image/png or image/jpeg")
    try:
        image = Image.open(io.BytesIO(body), formats=tuple(IMAGE_TYPES.values()))
    except Image.DecompressionBombError as e:  # a header claiming hundreds of megapixels
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the label map has too many pixels ({one_line(e)})") from None
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError):
        raise RequestError(HTTPStatus.BAD_REQUEST, "the body is not a PNG or JPEG image "
                           f"({len(body)} bytes)") from None
    width, height = image.size
    if width * height > max_pixels:
        raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                           f"the label map is {width}x{height} = {width * height} pixels; at "
                           f"most {max_pixels} are accepted")
    if min(width, height) < 1 or max(width, height) > MAX_ASPECT * min(width, height):
        raise RequestError(HTTPStatus.BAD_REQUEST, f"the label map is {width}x{height}; its "
                           f"long side may be at most {MAX_ASPECT} times its short side")
    try:
        image = decode(image)  # EXIF rotation applied, as inference reads files
        if image.mode in ("L", "1", "LA", "I", "I;16", "F"):
            raise RequestError(HTTPStatus.BAD_REQUEST, "the label map is single-channel; "
                               "send a colour label map in the Cityscapes colours")
        return np.array(image.convert("RGB"))
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise RequestError(HTTPStatus.BAD_REQUEST,
                           f"the image is corrupt or truncated ({one_line(e)})") from None


def encode_png(array):
    buffer = io.BytesIO()
    # Level 1: a few ms instead of tens at 512x256, for files ~10 % larger (pixels identical).
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


class PhotoService:
    """The translator behind a lock: one generator call at a time, from any thread."""

    def __init__(self, translator):
        self.translator = translator
        self.lock = threading.Lock()

    def translate(self, label, deadline=None):
        snapped = snap_to_palette(label, deadline)
        if not self.lock.acquire(timeout=max(0.0, deadline.remaining()) if deadline else -1):
            raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the generator is busy; try "
                               "again in a moment")
        try:
            return self.translator.translate([snapped])[0]
        finally:
            self.lock.release()

    def warm_up(self, sizes=CANVAS_SIZES):
        """One translation per canvas size, so that the first painter waits no longer than
        the next (torch.compile compiles here, once per shape)."""
        for width, height in sizes:
            self.translate(np.zeros((height, width, 3), np.uint8))


def page_config():
    """What the page needs to know: the palette (names and colours), sizes, examples, limits."""
    palette = [{"name": name, "color": list(COLORS[VOID_CLASS if name == "void" else name])}
               for name in PAINT_CLASSES]
    examples = sorted(f"examples/{p.name}" for p in EXAMPLES_DIR.glob("*.png"))
    return {"palette": palette, "sizes": [list(s) for s in CANVAS_SIZES],
            "examples": examples, "max_body_bytes": MAX_BODY_BYTES, "max_pixels": MAX_PIXELS}


# --- The server -------------------------------------------------------------------------------

def static_file(path):
    """The file of web/ that a URL path names, or None (outside web/, missing, another kind,
    a control character or an over-long path)."""
    if len(path) > MAX_PATH_CHARS or re.search(r"[\x00-\x1f\x7f\\]", path):
        return None
    try:
        file = (WEB_DIR / (path.lstrip("/") or "index.html")).resolve()
        if file.is_relative_to(WEB_DIR) and file.is_file() and file.suffix in STATIC_TYPES:
            return file
    except (OSError, ValueError):
        pass
    return None


LOOPBACK_NAMES = ("localhost",)


def host_name(header):
    """The name of a Host header (`localhost:8000` -> `localhost`, `[::1]:80` -> `::1`),
    lower case, or None if it is not one."""
    match = re.fullmatch(r"(\[[0-9a-fA-F:.]+\]|[A-Za-z0-9.-]+)(:[0-9]{1,5})?", header or "")
    return match[1].strip("[]").lower() if match else None


def is_allowed_host(name, allowed=()):
    """Loopback names always; other names only if listed (--allowed_hosts): a web page the user
    visits can make its own name resolve to 127.0.0.1 (DNS rebinding), but cannot change the
    Host its requests carry."""
    return name is not None and (name in LOOPBACK_NAMES or name in allowed or is_loopback(name))


class AppServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open connections
    block_on_close = False

    def __init__(self, address, service, max_body_bytes=MAX_BODY_BYTES, verbose=False,
                 allowed_hosts=(), request_seconds=REQUEST_SECONDS,
                 max_connections=MAX_CONNECTIONS, max_decodes=MAX_DECODES,
                 decode_wait_seconds=DECODE_WAIT_SECONDS):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, AppHandler)
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.verbose = verbose
        self.allowed_hosts = {name.lower() for name in allowed_hosts}
        bound = address[0].lower()
        if bound not in ("", "0.0.0.0", "::"):  # the address it was told to listen on
            self.allowed_hosts.add(bound)
        self.request_seconds = request_seconds
        self.connections = threading.BoundedSemaphore(max_connections)
        self.decodes = threading.BoundedSemaphore(max_decodes)
        self.decode_wait_seconds = decode_wait_seconds

    def process_request(self, request, client_address):
        """A thread per connection, up to max_connections; over that, 503 and close."""
        if not self.connections.acquire(blocking=False):
            try:
                request.settimeout(1.0)
                request.sendall(BUSY_RESPONSE)
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.connections.release()
            raise

    def process_request_thread(self, request, client_address):
        try:
            super().process_request_thread(request, client_address)
        finally:
            self.connections.release()


class DeadlineReader(io.RawIOBase):
    """The connection's bytes, read against the request's total deadline: the socket's own
    timeout is per read, so a client sending a byte at a time would hold its thread forever."""

    def __init__(self, handler):
        self.handler = handler

    def readable(self):
        return True

    def readinto(self, buffer):
        remaining = self.handler.deadline.remaining()
        if remaining <= 0:
            raise RequestTimeout("the request took too long")
        self.handler.connection.settimeout(remaining)
        try:
            count = self.handler.connection.recv_into(buffer)
        except TimeoutError:
            raise RequestTimeout("the request took too long") from None
        self.handler.received += count
        return count


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: live mode reuses one connection
    server_version = "pix2pix-app"
    timeout = REQUEST_SECONDS  # replaced by each request's total deadline (DeadlineReader)

    def setup(self):
        super().setup()
        self.rfile = io.BufferedReader(DeadlineReader(self))

    def handle_one_request(self):
        """One request within its total deadline; an idle kept-alive connection is closed
        silently at it, a request under way is answered 408."""
        self.deadline = Deadline(self.server.request_seconds)
        self.received = 0
        self.command, self.requestline, self.request_version = "", "", self.protocol_version
        try:
            super().handle_one_request()
        except RequestTimeout:
            self.close_connection = True
            if self.received:
                self.connection.settimeout(5.0)
                try:
                    self.refuse(HTTPStatus.REQUEST_TIMEOUT, "the request took too long; "
                                f"send it within {self.server.request_seconds:g} s")
                except OSError:
                    pass

    def url_path(self):
        """The decoded path of the request's URL, or None if it is not one."""
        try:
            return unquote(urlsplit(self.path).path)
        except ValueError:
            return None

    def refused_by_origin(self):
        """A request with a Host it does not serve (DNS rebinding) or a POST from another
        site's page is refused with 403; True if so."""
        hosts = self.headers.get_all("Host") or []
        name = host_name(hosts[0]) if len(hosts) == 1 else None
        if not is_allowed_host(name, self.server.allowed_hosts):
            self.close_connection = True
            self.refuse(HTTPStatus.FORBIDDEN, f"Host {(hosts or ['(none)'])[0][:100]!r} is not "
                        "served; open the page as http://localhost or 127.0.0.1 (or list the "
                        "name with --allowed_hosts)")
            return True
        origin = self.headers.get_all("Origin") or []
        if self.command == "POST" and origin and origin != [f"http://{hosts[0]}"]:
            self.close_connection = True
            self.refuse(HTTPStatus.FORBIDDEN, "requests from another site's page are refused")
            return True
        return False

    def do_GET(self):
        path = self.url_path()
        if self.refused_by_origin():
            return
        if path is None:
            self.close_connection = True
            self.refuse(HTTPStatus.BAD_REQUEST, "the address is not a valid URL path")
        elif path == "/api/config":
            self.send_body(HTTPStatus.OK, json.dumps(page_config()).encode(), "application/json")
        elif path.startswith("/api/"):
            self.refuse(*self.route_error(path))
        else:
            self.send_static(path)

    def do_POST(self):
        path = self.url_path()
        if self.refused_by_origin():
            return
        if path not in ("/api/translate", "/api/snap"):
            self.close_connection = True  # the unread body must not be read as a request
            self.refuse(*self.route_error(path or "?"))
            return
        try:
            body = self.read_body()
            wait = min(self.server.decode_wait_seconds, max(0.0, self.deadline.remaining())) \
                if self.deadline else self.server.decode_wait_seconds
            if not self.server.decodes.acquire(timeout=wait):
                raise RequestError(HTTPStatus.SERVICE_UNAVAILABLE, "the server is busy; try "
                                   "again in a moment")
            try:  # decoding and snapping: the memory a request costs, bounded by the cap
                label = decode_label_map(body, self.headers.get("Content-Type"))
                snapped = snap_to_palette(label, self.deadline)
            finally:
                self.server.decodes.release()
            if path == "/api/snap":  # a dropped file, in exact palette colours for the canvas
                photo = snapped
            else:
                photo = self.server.service.translate(snapped, self.deadline)
        except RequestError as e:
            self.refuse(e.status, str(e))
            return
        except RequestTimeout:
            raise  # answered 408 by handle_one_request
        except Exception as e:  # noqa: BLE001 (one failed request must not stop the server)
            self.log_error("translation failed: %r", e)  # the details stay in the server's log
            self.refuse(HTTPStatus.INTERNAL_SERVER_ERROR, "translation failed; the server's "
                        "log says why")
            return
        self.send_body(HTTPStatus.OK, encode_png(photo), "image/png")

    def do_PUT(self):
        self.close_connection = True
        if not self.refused_by_origin():
            self.refuse(*self.route_error(self.url_path() or "?"))

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def route_error(self, path):
        """(status, message) for a method or path the server does not answer."""
        allowed = {"/api/translate": "POST", "/api/snap": "POST", "/api/config": "GET"}.get(path)
        shown = path[:100].encode("ascii", "backslashreplace").decode()
        if allowed is None and path.startswith("/api/"):
            return HTTPStatus.NOT_FOUND, f"unknown address {shown}; the API is POST " \
                                         "/api/translate, POST /api/snap and GET /api/config"
        if allowed is None and static_file(path) is None:
            return HTTPStatus.NOT_FOUND, f"unknown address {shown}"
        allowed = allowed or "GET"
        return HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {path}: method not allowed " \
                                              f"(use {allowed})"

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; "
                               "send a Content-Length")
        lengths = self.headers.get_all("Content-Length") or []
        if not lengths:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "no Content-Length header")
        length = lengths[0].strip()
        # ASCII digits only (str.isdigit takes "²"), a sane count of them, and only one header.
        if len(lengths) > 1 or not re.fullmatch(r"[0-9]{1,15}", length):
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "Content-Length must be one decimal "
                               "number of bytes")
        if int(length) > self.server.max_body_bytes:
            self.close_connection = True  # not read: the connection cannot be reused
            raise RequestError(HTTPStatus.REQUEST_ENTITY_TOO_LARGE,
                               f"the body is {int(length)} bytes; at most "
                               f"{self.server.max_body_bytes} are accepted")
        body = self.rfile.read(int(length))
        if len(body) < int(length):
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, "the body ended before Content-Length")
        return body

    def send_static(self, path):
        file = static_file(path)
        if file is None:
            self.refuse(*self.route_error(path))
            return
        self.send_body(HTTPStatus.OK, file.read_bytes(), STATIC_TYPES[file.suffix])

    def refuse(self, status, message):
        body = json.dumps({"error": message}).encode()
        self.send_body(status, body, "application/json")

    def send_body(self, status, body, content_type):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Content-Security-Policy", CONTENT_SECURITY_POLICY)
        self.send_header("X-Frame-Options", "DENY")
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "POST" if "/api/translate" in self.path
                             or "/api/snap" in self.path else "GET")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
        # A client that does not read its answer is dropped after this (sendall's timeout
        # is the whole send's).
        self.connection.settimeout(self.server.request_seconds)
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_error(self, code, message=None, explain=None):
        """The standard library's own refusals (bad request line, unknown method, headers too
        long) as JSON too."""
        if code == HTTPStatus.NOT_IMPLEMENTED and self.command:
            code, message = HTTPStatus.METHOD_NOT_ALLOWED, f"method {self.command} not allowed"
        self.close_connection = True
        self.refuse(code, message or HTTPStatus(code).phrase)

    def log_request(self, code="-", size="-"):
        if self.server.verbose or int(code) >= 400:
            super().log_request(code, size)

    def log_message(self, format, *args):
        # Request lines and paths come from the client: no control characters in the log.
        text = (format % args).encode("ascii", "backslashreplace").decode()
        super().log_message("%s", re.sub(r"[\x00-\x1f\x7f]", "?", text)[:400])


# --- Shipped examples -------------------------------------------------------------------------

def write_examples(folder=EXAMPLES_DIR, seeds=EXAMPLE_SEEDS, size=256):
    """The example label maps: street scenes drawn by demo/scenes.py (no Cityscapes pixels)."""
    from demo.scenes import make_scene

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for number, seed in enumerate(seeds, 1):
        label, _ = make_scene(np.random.default_rng(seed), size)
        paths.append(folder / f"street_{number}.png")
        Image.fromarray(label).save(paths[-1], optimize=True)
    return paths


# --- Command line -----------------------------------------------------------------------------

def is_loopback(host):
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name: it may resolve to any address


def parse(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("--model_path", default="./checkpoints/generator.pth",
                        help="generator.pth, latest.pth, an epoch snapshot, a run folder "
                             "(runs/NAME), or export.py's .safetensors or .onnx")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (0.0.0.0: reachable from the network)")
    parser.add_argument("--port", type=int, default=8000, help="0: any free port")
    parser.add_argument("--allowed_hosts", nargs="+", default=[], metavar="NAME",
                        help="host names the page may be opened by besides localhost and "
                             "loopback addresses (with --host 0.0.0.0: this machine's names "
                             "on the network); others are refused (DNS rebinding)")
    devices.add_inference_speed_flags(parser)
    parser.add_argument("--verbose", action="store_true", help="log every request")
    parser.add_argument("--write_examples", action="store_true",
                        help=f"(re)write the example label maps in {EXAMPLES_DIR} and exit")
    args = parser.parse_args(argv)
    if not 0 <= args.port <= 65535:
        raise UserError(f"--port must be in 0..65535, got {args.port}")
    return args


def require_checkpoint(model_path):
    if not Path(model_path).exists():
        raise UserError(f"{model_path}: checkpoint not found; train one with "
                        "`python train.py --demo` (6-10 min on 2 CPU cores) or pass "
                        "--model_path")


def load_service(model_path, device, precision="auto", channels_last="auto", compile=False,
                 fold=True):
    """A warmed-up PhotoService on the checkpoint, through inference.py's loading and
    translation code."""
    from inference import load_translator

    require_checkpoint(model_path)
    if compile:
        import torch._dynamo
        # The page sends two shapes: compiled for each (measured 70 ms at 512x256 vs 91 ms
        # with the dynamic-shape graph torch falls back to at the second shape).
        torch._dynamo.config.automatic_dynamic_shapes = False
    translator, line = load_translator(model_path, device, precision, channels_last, compile,
                                       label2photo_for="the page", fold=fold)
    print(line, flush=True)
    service = PhotoService(translator)
    service.warm_up()
    return service


def main(argv=None):
    args = parse(argv)
    if args.write_examples:
        for path in write_examples():
            print(f"wrote {path}")
        return
    device = devices.choose_device(args.device)
    require_checkpoint(args.model_path)  # before binding and loading: one line, at once
    try:  # bound before the model loads: a busy port fails at once
        server = AppServer((args.host, args.port), None, verbose=args.verbose,
                           allowed_hosts=args.allowed_hosts)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there "
                        f"({e.strerror or e}); pick another --port") from None
    with server:
        try:  # Ctrl-C while loading or serving: one line, exit status 0
            print(f"loading {args.model_path} ...", flush=True)
            server.service = load_service(args.model_path, device, args.precision,
                                          args.channels_last, args.compile,
                                          args.fold_batch_norm)
            host, port = server.server_address[:2]
            if not is_loopback(args.host):
                print(f"warning: --host {args.host}: the model is reachable from the network; "
                      "anyone who can reach this machine can use it (it answers only to the "
                      "host names given with --allowed_hosts, and loopback ones)",
                      file=sys.stderr)
            shown = f"[{host}]" if ":" in host else host
            print(f"serving on http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
