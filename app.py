"""Paint a label map, see the photo: a local web page on a trained generator.

    python app.py --model_path ./checkpoints/generator.pth     # then open http://127.0.0.1:8000/

Serves the page in web/ (no build step; nothing is loaded from any other address) and
`POST /api/translate`: a PNG or JPEG label map in, a PNG photo of the same size out. Every
pixel is first snapped to the nearest Cityscapes colour (canvas strokes and JPEGs blur the
colours); the model is loaded and run by inference.py's load_generator and Translator.

The server is the standard library's ThreadingHTTPServer: one thread per connection, so
decoding and PNG encoding overlap, while the generator runs one request at a time (a lock).
"""

import argparse
import io
import ipaddress
import json
import socket
import sys
import threading
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import numpy as np
from PIL import Image, UnidentifiedImageError

import runtime
from cityscapes import COLORS, PALETTE, nearest_colors
from utils import UserError, choose_device, one_line, run_cli

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
# The browser enforces what the page promises: nothing from any other address.
CONTENT_SECURITY_POLICY = ("default-src 'self'; img-src 'self' blob: data:; "
                           "connect-src 'self'; object-src 'none'; base-uri 'none'")


class RequestError(Exception):
    """A bad request: answered with `status` and {"error": message}."""

    def __init__(self, status, message):
        super().__init__(message)
        self.status = status


# --- Label maps in, photos out ----------------------------------------------------------------

def snap_to_palette(label):
    """(H, W, 3) uint8 -> every pixel replaced by its nearest Cityscapes colour (the project's
    one nearest-colour rule, cityscapes.nearest_colors)."""
    return PALETTE[nearest_colors(label)[0]]


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
        image.load()
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

    def translate(self, label):
        snapped = snap_to_palette(label)
        with self.lock:
            return self.translator.translate([snapped])[0]

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
    """The file of web/ that a URL path names, or None (outside web/, missing, another kind)."""
    file = (WEB_DIR / (path.lstrip("/") or "index.html")).resolve()
    if file.is_relative_to(WEB_DIR) and file.is_file() and file.suffix in STATIC_TYPES:
        return file
    return None


class AppServer(ThreadingHTTPServer):
    daemon_threads = True  # Ctrl-C does not wait for open connections
    block_on_close = False

    def __init__(self, address, service, max_body_bytes=MAX_BODY_BYTES, verbose=False):
        self.address_family = socket.AF_INET6 if ":" in address[0] else socket.AF_INET
        super().__init__(address, AppHandler)
        self.service = service
        self.max_body_bytes = max_body_bytes
        self.verbose = verbose


class AppHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive: live mode reuses one connection
    server_version = "pix2pix-app"
    timeout = 30  # seconds a client may stall mid-request before its thread is freed

    def do_GET(self):
        path = unquote(urlsplit(self.path).path)
        if path == "/api/config":
            self.send_body(HTTPStatus.OK, json.dumps(page_config()).encode(), "application/json")
        elif path.startswith("/api/"):
            self.refuse(*self.route_error(path))
        else:
            self.send_static(path)

    def do_POST(self):
        path = unquote(urlsplit(self.path).path)
        if path not in ("/api/translate", "/api/snap"):
            self.close_connection = True  # the unread body must not be read as a request
            self.refuse(*self.route_error(path))
            return
        try:
            body = self.read_body()
            label = decode_label_map(body, self.headers.get("Content-Type"))
            if path == "/api/snap":  # a dropped file, in exact palette colours for the canvas
                photo = snap_to_palette(label)
            else:
                photo = self.server.service.translate(label)
        except RequestError as e:
            self.refuse(e.status, str(e))
            return
        except Exception as e:  # noqa: BLE001 (one failed request must not stop the server)
            self.log_error("translation failed: %r", e)
            self.refuse(HTTPStatus.INTERNAL_SERVER_ERROR, f"translation failed: {one_line(e)}")
            return
        self.send_body(HTTPStatus.OK, encode_png(photo), "image/png")

    def do_PUT(self):
        self.close_connection = True
        self.refuse(*self.route_error(unquote(urlsplit(self.path).path)))

    do_DELETE = do_PATCH = do_OPTIONS = do_PUT

    def route_error(self, path):
        """(status, message) for a method or path the server does not answer."""
        allowed = {"/api/translate": "POST", "/api/snap": "POST", "/api/config": "GET"}.get(path)
        if allowed is None and path.startswith("/api/"):
            return HTTPStatus.NOT_FOUND, f"unknown address {path}; the API is POST " \
                                         "/api/translate, POST /api/snap and GET /api/config"
        if allowed is None and static_file(path) is None:
            return HTTPStatus.NOT_FOUND, f"unknown address {path}"
        allowed = allowed or "GET"
        return HTTPStatus.METHOD_NOT_ALLOWED, f"{self.command} {path}: method not allowed " \
                                              f"(use {allowed})"

    def read_body(self):
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "chunked bodies are not accepted; "
                               "send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            self.close_connection = True
            raise RequestError(HTTPStatus.LENGTH_REQUIRED, "no Content-Length header")
        if not length.isdigit():
            self.close_connection = True
            raise RequestError(HTTPStatus.BAD_REQUEST, f"Content-Length {length!r} is not a "
                               "number")
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
            self.refuse(HTTPStatus.NOT_FOUND, f"unknown address {path}")
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
        if status == HTTPStatus.METHOD_NOT_ALLOWED:
            self.send_header("Allow", "POST" if "/api/translate" in self.path
                             or "/api/snap" in self.path else "GET")
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()
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
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", choices=runtime.PRECISIONS,
                        help="as inference.py's: auto is bf16 autocast where the device "
                             "computes bf16 natively, else fp32")
    runtime.add_channels_last_flag(parser)
    parser.add_argument("--compile", action="store_true",
                        help="torch.compile the generator: a slower start, faster photos")
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
                        "`python train.py --demo` (a few minutes on a CPU) or pass --model_path")


def load_service(model_path, device, precision="auto", channels_last="auto", compile=False):
    """A warmed-up PhotoService on the checkpoint, through inference.py's loading and
    translation code."""
    from inference import Translator, load_generator, optimize_generator, runs_in_pytorch

    require_checkpoint(model_path)
    precision, why = runtime.resolve_precision(precision, device)
    runtime.set_math_mode(device, precision)
    generator, config = load_generator(model_path, device)
    in_pytorch = runs_in_pytorch(generator, model_path, compile=compile)
    if not in_pytorch:
        precision, why = "fp32", "onnxruntime runs the exported graph in fp32"
    channels_last = in_pytorch and runtime.resolve_channels_last(channels_last, precision)
    print(f"device {device}, precision {precision} ({why})"
          f"{', channels_last' if channels_last else ''}", flush=True)
    if config.get("direction", "label2photo") != "label2photo":
        raise UserError(f"{model_path}: the model translates photos to label maps; the page "
                        "needs a label2photo model")
    if compile:
        import torch._dynamo
        # The page sends two shapes: compiled for each (measured 70 ms at 512x256 vs 91 ms
        # with the dynamic-shape graph torch falls back to at the second shape).
        torch._dynamo.config.automatic_dynamic_shapes = False
    generator = optimize_generator(generator, channels_last, compile, freeze=True)
    service = PhotoService(Translator(generator, config, device, precision=precision,
                                      channels_last=channels_last))
    service.warm_up()
    return service


def main(argv=None):
    args = parse(argv)
    if args.write_examples:
        for path in write_examples():
            print(f"wrote {path}")
        return
    device = choose_device(args.device)
    require_checkpoint(args.model_path)  # before binding and loading: one line, at once
    try:  # bound before the model loads: a busy port fails at once
        server = AppServer((args.host, args.port), None, verbose=args.verbose)
    except OSError as e:
        raise UserError(f"--host {args.host} --port {args.port}: cannot listen there "
                        f"({e.strerror or e}); pick another --port") from None
    with server:
        try:  # Ctrl-C while loading or serving: one line, exit status 0
            print(f"loading {args.model_path} ...", flush=True)
            server.service = load_service(args.model_path, device, args.precision,
                                          args.channels_last, args.compile)
            host, port = server.server_address[:2]
            if not is_loopback(args.host):
                print(f"warning: --host {args.host}: the model is reachable from the network; "
                      "anyone who can reach this machine can use it", file=sys.stderr)
            shown = f"[{host}]" if ":" in host else host
            print(f"serving on http://{shown}:{port}/ (Ctrl-C to stop)", flush=True)
            server.serve_forever()
        except KeyboardInterrupt:
            print("stopped", file=sys.stderr)


if __name__ == "__main__":
    run_cli(main)
