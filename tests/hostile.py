"""A corpus of hostile, broken and odd requests, built in code (nothing downloaded).

Each `Case` is one HTTP request against imgserve (`request`: keyword arguments for
`httpx.Client.request`) and what the service must answer: the status, and for an error the code
(and the field to blame) of the one JSON error shape `{"error": {"code", "message", "field"?, "type", "param"}}`.
Cases with `code=None` must succeed: odd but valid inputs (1×1, CMYK, 16-bit, palettes, every EXIF
orientation, animations, lying content types and filenames) are served, and `headers` lists
response headers they must carry.

What is refused and what is accepted (docs/architecture.md, "Hostile input"):
- animated GIF / WebP / PNG (APNG) and multi-page TIFF: accepted, the first frame is used;
- formats outside `preprocess.formats` (PPM, ICO, TGA, PCX, …): 415 `unsupported_format`;
- anything Pillow cannot decode (empty, truncated, corrupt, PDF, SVG, ZIP): 400 `bad_image`;
- a second image file in one request: 400 `bad_image` naming the field (every task takes one image);
- more pixels than `preprocess.max_pixels` in the header (bombs), bodies over `max_bytes`: 413;
- fields: out of range, NaN/inf, unknown, duplicated, not UTF-8, path-like names: 422.

`build_corpus()` takes the service's limits so the byte-limit cases stay just over them.
"""

from __future__ import annotations

import io
import struct
import zlib
import dataclasses
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

# Every case that runs a diffusion model asks for few steps and sends a small image.
FAST = {"steps": "2", "seed": "1"}
FAST_LAYERS = {"steps": "2", "seed": "1", "layers": "2"}


@dataclass(frozen=True)
class Case:
    name: str
    category: str
    request: dict[str, Any]
    """Keyword arguments of `httpx.Client.request` (method, url, files, data, params, content, headers)."""
    status: int
    code: str | None = None
    """Error code the JSON body must carry; None: the request must succeed."""
    field: str | None = None
    """The `field` the error must name (None: not checked)."""
    headers: dict[str, str] = dataclasses.field(default_factory=dict)
    """Response headers (lower-case names) that must have exactly these values."""
    absent_headers: tuple[str, ...] = ()
    """Response headers that must not be there (header injection)."""
    media_type: str | None = None
    """Expected Content-Type of a successful answer (None: not checked)."""

    @property
    def ok(self) -> bool:
        return self.code is None


# -- building images ---------------------------------------------------------------------------------
def encode(im: Image.Image, fmt: str, **params: Any) -> bytes:
    buffer = io.BytesIO()
    im.save(buffer, fmt, **params)
    return buffer.getvalue()


def picture(w: int, h: int, mode: str = "RGB") -> Image.Image:
    """A small asymmetric gradient (so rotations and flips would show)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([255 * x // max(w, 1), 255 * y // max(h, 1), (x + 2 * y) % 256], axis=-1).astype(np.uint8)
    im = Image.fromarray(rgb, "RGB")
    return im if mode == "RGB" else im.convert(mode)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def png_from_rows(width: int, height: int, bit_depth: int, color_type: int, rows: bytes) -> bytes:
    """A PNG written by hand: signature, IHDR, one IDAT of `rows` (filter bytes included), IEND."""
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", zlib.compress(rows, 9))
            + png_chunk(b"IEND", b""))


def bomb_png(width: int, height: int) -> bytes:
    """A valid PNG header claiming width×height (1-bit) over a tiny compressed body: a few KB."""
    compressor = zlib.compressobj(9)
    row = b"\x00" * (1 + (width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(min(height, 64))) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def big_sparse_png(width: int, height: int) -> bytes:
    """A fully decodable 1-bit PNG of width×height that compresses to a few KB (a near-bomb)."""
    compressor = zlib.compressobj(9)
    row = b"\x00" + b"\x55" * ((width + 7) // 8)
    data = b"".join(compressor.compress(row) for _ in range(height)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", data) + png_chunk(b"IEND", b"")


def png16_rgb(w: int, h: int) -> bytes:
    """16 bits per channel RGB (Pillow reads it as 8-bit RGB)."""
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 65535 // max(w - 1, 1), y * 65535 // max(h - 1, 1), np.full_like(x, 30000)], -1)
    rows = b"".join(b"\x00" + rgb[r].astype(">u2").tobytes() for r in range(h))
    return png_from_rows(w, h, 16, 2, rows)


def gif_bomb() -> bytes:
    """A small GIF whose screen and frame claim 65535×65535 pixels."""
    data = bytearray(encode(picture(8, 8).convert("P"), "GIF"))
    data[6:10] = struct.pack("<HH", 65535, 65535)
    descriptor = data.index(b"\x2c")  # the image descriptor after the colour table
    data[descriptor + 5:descriptor + 9] = struct.pack("<HH", 65535, 65535)
    return bytes(data)


def webp_bomb() -> bytes:
    """A lossless WebP whose VP8L header claims 16383×16383 (the format's maximum)."""
    data = bytearray(encode(picture(16, 16), "WEBP", lossless=True))
    at = data.index(b"VP8L") + 8
    assert data[at] == 0x2F
    bits = (16383 - 1) | ((16383 - 1) << 14) | (int.from_bytes(data[at + 1:at + 5], "little") & ~((1 << 28) - 1))
    data[at + 1:at + 5] = bits.to_bytes(4, "little")
    return bytes(data)


def jpeg_bomb() -> bytes:
    """A baseline JPEG whose SOF0 frame header claims 65500×65500."""
    data = bytearray(encode(picture(16, 16), "JPEG"))
    at = data.index(b"\xff\xc0")
    data[at + 5:at + 9] = struct.pack(">HH", 65500, 65500)
    return bytes(data)


def bmp_bomb() -> bytes:
    data = bytearray(encode(picture(4, 4), "BMP"))
    data[18:26] = struct.pack("<ii", 50000, 50000)
    return bytes(data)


def exif_jpeg(orientation: int, size=(48, 32), fmt: str = "JPEG") -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return encode(picture(*size), fmt, exif=exif.tobytes())


def broken_exif_jpeg() -> bytes:
    """A JPEG whose APP1 Exif segment holds garbage after the TIFF header."""
    data = encode(picture(48, 32), "JPEG")
    payload = b"Exif\x00\x00II*\x00\xff\xff\xff\x7f" + bytes(range(40))
    segment = b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload
    return data[:2] + segment + data[2:]


def animated(fmt: str, size=(40, 24)) -> bytes:
    frames = [Image.new("RGB", size, color) for color in ((220, 20, 20), (20, 20, 220), (20, 220, 20))]
    extra = {"loop": 0, "duration": 50}
    if fmt == "PNG":
        extra["default_image"] = False
    return encode(frames[0], fmt, save_all=True, append_images=frames[1:], **extra)


def many_frame_gif(frames: int = 500) -> bytes:
    images = [Image.new("P", (2, 2), i % 200) for i in range(frames)]
    return encode(images[0], "GIF", save_all=True, append_images=images[1:], duration=1)


def palette_with_transparency(fmt: str) -> bytes:
    im = picture(32, 24).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return encode(im, fmt, transparency=0)


# -- building requests --------------------------------------------------------------------------------
def upload(image: bytes, fields: dict[str, Any] | None = None, task: str = "real",
           filename: str = "input.png", content_type: str = "image/png", **extra: Any) -> dict[str, Any]:
    """A multipart request with an `image` file and text fields."""
    return {"method": "POST", "url": f"/v1/{task}", "files": {"image": (filename, image, content_type)},
            "data": fields if fields is not None else dict(FAST), **extra}


def raw(body: bytes, content_type: str | None, params: dict[str, Any] | None = None, task: str = "real",
        headers: dict[str, str] | None = None) -> dict[str, Any]:
    """A raw body with the fields in the query string."""
    headers = dict(headers or {})
    if content_type is not None:
        headers["content-type"] = content_type
    return {"method": "POST", "url": f"/v1/{task}", "content": body, "headers": headers,
            "params": params if params is not None else dict(FAST)}


def multipart(parts: list[tuple[bytes, bytes]], task: str = "real", boundary: bytes = b"hostile-boundary-7f3a",
              content_type: str | None = None, tail: bytes = b"--\r\n", url: str | None = None) -> dict[str, Any]:
    """A multipart body written byte by byte: each part is (header lines, payload)."""
    body = b"".join(b"--" + boundary + b"\r\n" + headers + b"\r\n\r\n" + payload + b"\r\n" for headers, payload in parts)
    body += b"--" + boundary + tail
    ctype = content_type if content_type is not None else f"multipart/form-data; boundary={boundary.decode()}"
    return {"method": "POST", "url": url or f"/v1/{task}", "content": body, "headers": {"content-type": ctype}}


def text_part(name: bytes, value: bytes) -> tuple[bytes, bytes]:
    return b'Content-Disposition: form-data; name="' + name + b'"', value


def file_part(image: bytes, name: bytes = b"image", filename: bytes = b"a.png",
              content_type: bytes = b"image/png") -> tuple[bytes, bytes]:
    return (b'Content-Disposition: form-data; name="' + name + b'"; filename="' + filename + b'"\r\n'
            b"Content-Type: " + content_type, image)


def fast_parts() -> list[tuple[bytes, bytes]]:
    return [text_part(key.encode(), value.encode()) for key, value in FAST.items()]


# -- the corpus ---------------------------------------------------------------------------------------
def build_corpus(max_bytes: int = 20 * 1024 * 1024) -> list[Case]:
    small = encode(picture(48, 32), "PNG")
    jpeg = encode(picture(48, 32), "JPEG", quality=90)
    webp = encode(picture(48, 32), "WEBP", quality=80)
    gif = encode(picture(48, 32).convert("P"), "GIF")
    bmp = encode(picture(48, 32), "BMP")
    tiff = encode(picture(48, 32), "TIFF")
    cases: list[Case] = []

    def ok(name: str, category: str, request: dict[str, Any], size: str | None = None, media_type: str = "image/png",
           **extra: Any) -> None:
        headers = {"x-imgserve-size": size} if size else {}
        headers.update(extra.pop("headers", {}))
        cases.append(Case(name, category, request, 200, headers=headers, media_type=media_type, **extra))

    def bad(name: str, category: str, request: dict[str, Any], status: int, code: str, field: str | None) -> None:
        cases.append(Case(name, category, request, status, code, field))

    # 1. broken bytes: 400 bad_image
    broken = {
        "empty-file": b"",
        "text-as-png": b"hello, this is plain text, not a picture\n" * 8,
        "html-as-image": b"<!doctype html><html><body><img src=x onerror=alert(1)></body></html>",
        "random-bytes": np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes(),
        "png-signature-only": b"\x89PNG\r\n\x1a\n",
        "png-truncated-half": small[: len(small) // 2],
        "png-truncated-after-ihdr": small[:33],
        "png-bad-crc": small[:29] + bytes([small[29] ^ 0xFF]) + small[30:],
        "png-garbage-idat": png_from_rows(16, 16, 8, 0, b"")[:41] + b"not zlib at all" * 4,
        "jpeg-truncated": jpeg[: len(jpeg) // 2],
        "jpeg-soi-only": b"\xff\xd8",
        "jpeg-header-no-scan": jpeg[: jpeg.index(b"\xff\xda")],
        "webp-truncated": webp[: len(webp) // 2],
        "webp-riff-header-only": webp[:16],
        "gif-truncated": gif[: len(gif) // 2],
        "gif-no-frames": gif[:13] + b"\x3b",
        "bmp-truncated": bmp[: len(bmp) // 3],
        "tiff-truncated": tiff[:64],
        "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"><rect width="10" height="10"/></svg>',
        "pdf": encode(picture(8, 8), "PDF"),
        "zip": b"PK\x05\x06" + bytes(18),
    }
    for name, data in broken.items():
        bad(name, "broken-image", upload(data), 400, "bad_image", "image")
    bad("empty-raw-body", "broken-image", raw(b"", "image/png"), 400, "bad_image", "image")

    # 2. decodable formats that are not accepted: 415
    for fmt, im in (("PPM", picture(8, 8)), ("ICO", picture(16, 16)), ("TGA", picture(8, 8)),
                    ("PCX", picture(8, 8)), ("QOI", picture(8, 8))):
        bad(f"format-{fmt.lower()}", "unsupported-format", upload(encode(im, fmt)), 415, "unsupported_format", "image")

    # 3. content types and framing
    bad("raw-json", "content-type", raw(b'{"image": "x"}', "application/json"), 415, "unsupported_format", "image")
    bad("raw-text", "content-type", raw(small, "text/plain"), 415, "unsupported_format", "image")
    bad("raw-no-content-type", "content-type", raw(small, None), 415, "unsupported_format", "image")
    bad("urlencoded-form", "content-type", raw(b"image=abc&steps=2", "application/x-www-form-urlencoded", {}),
        415, "unsupported_format", "image")
    bad("multipart-mixed", "content-type", multipart([file_part(small)], content_type="multipart/mixed; boundary=b"),
        415, "unsupported_format", "image")
    bad("multipart-no-boundary", "content-type",
        multipart([file_part(small)], content_type="multipart/form-data"), 400, "bad_image", "image")
    bad("multipart-wrong-boundary", "content-type",
        multipart([file_part(small)], content_type="multipart/form-data; boundary=not-the-one"), 400, "bad_image",
        "image")
    bad("multipart-truncated", "content-type", multipart([file_part(small)], tail=b""), 400, "bad_image", "image")
    ok("raw-png-labelled-jpeg", "content-type", raw(small, "image/jpeg"), "48x32")
    ok("raw-octet-stream", "content-type", raw(jpeg, "application/octet-stream"), "48x32")
    ok("raw-upper-case-type", "content-type", raw(small, "IMAGE/PNG; charset=binary"), "48x32")
    ok("part-labelled-text", "content-type", upload(small, content_type="text/plain", filename="a.txt"), "48x32")

    # 4. multipart structure and names
    bad("multipart-without-file", "multipart", {"method": "POST", "url": "/v1/real", "files": {"steps": (None, "2")}},
        400, "bad_image", "image")
    bad("image-as-text-field", "multipart", multipart([text_part(b"image", b"iVBORw0KGgo="), *fast_parts()]),
        400, "bad_image", "image")
    bad("two-image-files", "multipart", multipart([file_part(small), file_part(small), *fast_parts()]),
        400, "bad_image", "image")
    bad("three-image-files", "multipart", multipart([file_part(small)] * 3 + fast_parts()),
        400, "bad_image", "image")
    bad("field-sent-as-file", "multipart", multipart([file_part(small), file_part(b"2", b"steps", b"steps.txt",
                                                                                   b"text/plain")]),
        422, "invalid_parameter", "steps")
    bad("too-many-fields", "multipart",
        multipart([file_part(small), *(text_part(f"f{i}".encode(), b"1") for i in range(200))]),
        422, "invalid_parameter", None)
    bad("nul-in-field-name", "multipart", multipart([file_part(small), text_part(b"ste\x00ps", b"2")]),
        422, "invalid_parameter", None)
    bad("empty-field-name", "multipart", multipart([file_part(small), text_part(b"", b"2")]),
        422, "invalid_parameter", None)
    ok("filename-header-injection", "multipart",
       multipart([file_part(small, filename=b"a.png\r\nX-Injected: 1\r\nSet-Cookie: s=1"), *fast_parts()]), "48x32",
       absent_headers=("x-injected", "set-cookie"))
    ok("filename-path-traversal", "multipart",
       multipart([file_part(small, filename=b"../../../../etc/passwd"), *fast_parts()]), "48x32")
    ok("filename-nul-and-latin1", "multipart",
       multipart([file_part(small, filename=b"a\x00\xff\xfe.png"), *fast_parts()]), "48x32")
    ok("filename-3000-chars", "multipart", multipart([file_part(small, filename=b"a" * 3000 + b".png"),
                                                      *fast_parts()]), "48x32")
    # python-multipart refuses a part header over its 4 KiB limit: the form cannot be read
    bad("part-header-over-4k", "multipart", multipart([file_part(small, filename=b"a" * 9000 + b".png"),
                                                       *fast_parts()]), 400, "bad_image", "image")

    # 5. body and pixel limits: 413
    junk = b"\xff\xd8" + bytes(max_bytes)
    bad("upload-over-max-bytes", "too-large", upload(junk), 413, "too_large", "image")
    bad("raw-over-max-bytes", "too-large", raw(junk, "image/jpeg"), 413, "too_large", "image")
    bad("png-bomb-30000x30000", "too-large", upload(bomb_png(30_000, 30_000)), 413, "too_large", "image")
    bad("png-just-over-max-pixels", "too-large", upload(bomb_png(7_000, 6_000)), 413, "too_large", "image")
    bad("gif-bomb-65535x65535", "too-large", upload(gif_bomb(), filename="a.gif", content_type="image/gif"), 413,
        "too_large", "image")
    bad("webp-bomb-16383x16383", "too-large", upload(webp_bomb(), filename="a.webp", content_type="image/webp"),
        413, "too_large", "image")
    bad("jpeg-bomb-65500x65500", "too-large", upload(jpeg_bomb(), filename="a.jpg", content_type="image/jpeg"),
        413, "too_large", "image")
    bad("bmp-bomb-50000x50000", "too-large", upload(bmp_bomb()), 413, "too_large", "image")

    # 6. odd but valid geometry and modes: served
    ok("1x1", "geometry", upload(encode(picture(1, 1), "PNG")), "1x1")
    # real: the demo's small condition areas cannot hold 1:64 (the real model's can): a 422, never a 500
    bad("1x10000-real", "geometry", upload(encode(picture(1, 10_000), "PNG")), 422, "invalid_parameter", "image")
    ok("1x10000-anime", "geometry", upload(encode(picture(1, 10_000), "PNG"), {}, task="anime"), "1x1024")
    ok("100000x1", "geometry", upload(encode(Image.new("L", (100_000, 1), 90), "PNG"), {}, task="anime"), "1024x1")
    ok("39000x1000-sparse-1bit", "geometry", upload(big_sparse_png(39_000, 1_000), {}, task="anime"), "1024x26")
    ok("1x10000-layers", "geometry", upload(encode(picture(1, 10_000), "PNG"), FAST_LAYERS, task="layers"),
       "1x1024", media_type="application/zip")
    ok("cmyk-jpeg", "mode", upload(encode(picture(40, 30, "CMYK"), "JPEG"), content_type="image/jpeg"), "40x30")
    ok("cmyk-tiff", "mode", upload(encode(picture(40, 30, "CMYK"), "TIFF"), content_type="image/tiff"), "40x30")
    ok("16-bit-gray-png", "mode", upload(encode(Image.fromarray(
        np.arange(40 * 30, dtype=np.uint16).reshape(30, 40) * 50), "PNG")), "40x30")
    ok("16-bit-rgb-png", "mode", upload(png16_rgb(40, 30)), "40x30")
    ok("float32-tiff", "mode", upload(encode(Image.fromarray(
        np.linspace(0, 1, 40 * 30, dtype=np.float32).reshape(30, 40)), "TIFF"), content_type="image/tiff"), "40x30")
    ok("palette-transparency-png", "mode", upload(palette_with_transparency("PNG")), "32x24")
    ok("palette-transparency-gif", "mode", upload(palette_with_transparency("GIF"), content_type="image/gif"), "32x24")
    ok("palette-transparency-layers", "mode", upload(palette_with_transparency("PNG"), FAST_LAYERS, task="layers"),
       "32x24", media_type="application/zip")
    ok("la-png", "mode", upload(encode(picture(40, 30, "LA"), "PNG")), "40x30")
    ok("1-bit-bmp", "mode", upload(encode(picture(40, 30, "1"), "BMP"), content_type="image/bmp"), "40x30")
    ok("transparent-webp", "mode", upload(encode(Image.new("RGBA", (40, 30), (0, 0, 0, 0)), "WEBP", lossless=True),
                                          content_type="image/webp"), "40x30")
    ok("progressive-jpeg", "mode", upload(encode(picture(40, 30), "JPEG", progressive=True)), "40x30")
    ok("tiff-lzw-multipage", "mode", upload(encode(picture(40, 30), "TIFF", compression="tiff_lzw", save_all=True,
                                                   append_images=[picture(20, 20)])), "40x30")

    # 7. EXIF orientation: 5-8 swap width and height; unknown values and broken EXIF are ignored
    for orientation in range(1, 9):
        ok(f"exif-orientation-{orientation}", "exif", upload(exif_jpeg(orientation), content_type="image/jpeg"),
           "32x48" if orientation >= 5 else "48x32")
    for fmt, orientation in (("TIFF", 3), ("TIFF", 6), ("WEBP", 8), ("PNG", 5)):  # Pillow orients TIFF itself
        ok(f"exif-orientation-{orientation}-{fmt.lower()}", "exif", upload(exif_jpeg(orientation, fmt=fmt)),
           "32x48" if orientation >= 5 else "48x32")
    ok("exif-orientation-9", "exif", upload(exif_jpeg(9)), "48x32")
    ok("exif-orientation-0", "exif", upload(exif_jpeg(0)), "48x32")
    ok("exif-broken", "exif", upload(broken_exif_jpeg()), "48x32")

    # 8. animations: the first frame is used
    ok("animated-gif", "animation", upload(animated("GIF"), content_type="image/gif"), "40x24")
    ok("animated-webp", "animation", upload(animated("WEBP"), content_type="image/webp"), "40x24")
    ok("apng", "animation", upload(animated("PNG")), "40x24")
    ok("gif-500-frames", "animation", upload(many_frame_gif(), {}, task="anime"), "2x2")

    # 9. numbers
    numbers = [
        ("steps", "-1"), ("steps", "0"), ("steps", "1"), ("steps", "101"), ("steps", "1e3"), ("steps", "2.5"),
        ("steps", ""), ("steps", "99999999999999999999999999"), ("steps", "0x10"), ("steps", "２"),
        ("cfg", "nan"), ("cfg", "NaN"), ("cfg", "inf"), ("cfg", "-inf"), ("cfg", "1e309"), ("cfg", "0.5"),
        ("cfg", "-7"), ("cfg", "20.0001"), ("cfg", "seven"),
        ("seed", "-1"), ("seed", str(2**32)), ("seed", "1.5"), ("seed", "1" * 400),
    ]
    for key, value in numbers:
        bad(f"{key}={value[:24]!r}", "numbers", upload(small, {**FAST, key: value}), 422, "invalid_parameter", key)
    for key, value in (("layers", "0"), ("layers", "11"), ("layers", "-3"), ("layers", "four"),
                       ("resolution", "800"), ("resolution", "0"), ("resolution", "-640"), ("resolution", "nan"),
                       ("cfg_normalize", "maybe"), ("steps", "inf")):
        bad(f"layers-{key}={value!r}", "numbers", upload(small, {**FAST_LAYERS, key: value}, task="layers"), 422,
            "invalid_parameter", key)
    bad("query-steps-nan", "numbers", raw(small, "image/png", {"steps": "nan"}), 422, "invalid_parameter", "steps")

    # 10. text: long, not UTF-8
    for key in ("prompt", "negative_prompt"):
        bad(f"{key}-2001-chars", "text", upload(small, {**FAST, key: "x" * 2001}), 422, "invalid_parameter", key)
    bad("prompt-2mb", "text", upload(small, {**FAST, "prompt": "y" * 2_000_000}), 422, "invalid_parameter", "prompt")
    bad("prompt-not-utf8-multipart", "text",
        multipart([file_part(small), *fast_parts(), text_part(b"prompt", b"caf\xe9 \xff\xfe")]),
        422, "invalid_parameter", "prompt")
    bad("prompt-not-utf8-query", "text", {"method": "POST", "url": "/v1/real?steps=2&prompt=caf%E9%FF",
                                          "content": small, "headers": {"content-type": "image/png"}},
        422, "invalid_parameter", "prompt")
    bad("layers-prompt-not-utf8", "text",
        multipart([file_part(small), text_part(b"prompt", b"\xc3\x28")], task="layers"), 422, "invalid_parameter",
        "prompt")
    ok("prompt-unicode-nul-rtl", "text", upload(small, {**FAST, "prompt": "a\x00b \u202eevil\u202c 🙂 ☃ 東京",
                                                        "negative_prompt": "\r\n\t"}), "48x32")
    ok("prompt-2000-chars", "text", upload(small, {**FAST, "prompt": "z" * 2000}), "48x32")
    ok("prompt-utf8-multipart", "text",
       multipart([file_part(small), *fast_parts(), text_part(b"prompt", "café ÿþ".encode())]), "48x32")

    # 11. unknown and duplicated fields
    bad("unknown-field", "fields", upload(small, {**FAST, "colour": "red"}), 422, "invalid_parameter", "colour")
    bad("field-name-case", "fields", upload(small, {**FAST, "Steps": "2"}), 422, "invalid_parameter", "Steps")
    bad("task-field-on-task-route", "fields", upload(small, {**FAST, "task": "anime"}), 422, "invalid_parameter",
        "task")
    bad("style-on-real", "fields", upload(small, {**FAST, "style": "paprika"}), 422, "invalid_parameter", "style")
    bad("duplicated-field", "fields", upload(small, {"steps": ["2", "3"], "seed": "1"}), 422, "invalid_parameter",
        "steps")
    bad("duplicated-query-and-form", "fields", upload(small, FAST, params={"steps": "2"}), 422, "invalid_parameter",
        "steps")
    bad("duplicated-query", "fields", {"method": "POST", "url": "/v1/real?steps=2&steps=2", "content": small,
                                       "headers": {"content-type": "image/png"}}, 422, "invalid_parameter", "steps")
    bad("many-query-fields", "fields", raw(small, "image/png", {f"q{i}": "1" for i in range(300)}), 422,
        "invalid_parameter", "q0")
    for fmt in ("gif", "PNG", "zip", "../png", ""):
        bad(f"format={fmt!r}", "fields", upload(small, {**FAST, "format": fmt}), 422, "invalid_parameter", "format")
    bad("layers-format=png", "fields", upload(small, {**FAST_LAYERS, "format": "png"}, task="layers"), 422,
        "invalid_parameter", "format")

    # 12. names that look like paths
    hostile_names = ["../x", "/etc/passwd", "v1/../../y", "v2511-0715\x00", "v2511-0715\n", "..", ".hidden",
                     "C:\\Windows\\win.ini", "%2e%2e%2fetc", "x" * 300, "v2511-0715/", "~root", "NONE", "unknown-v9"]
    for name in hostile_names:
        bad(f"lora={name[:24]!r}", "names", upload(small, {**FAST, "lora": name}), 422, "invalid_parameter", "lora")
    for name in ["../paprika", "/etc/passwd", "paprika\x00", "x/../paprika", "paprika.pt", "PAPRIKA", "pap rika"]:
        bad(f"style={name[:24]!r}", "names", upload(small, {"style": name}, task="anime"), 422, "invalid_parameter",
            "style")
    # a style name is trimmed (lora names are not): surrounding whitespace is not part of a name
    ok("style-trailing-newline", "names", upload(small, {"style": "paprika\n"}, task="anime"), "48x32",
       headers={"x-imgserve-style": "paprika"})

    # 13. routes and jobs
    bad("unknown-task", "routes", upload(small, task="sketch"), 404, "not_found", "task")
    bad("task-path-traversal", "routes", upload(small, task="..%2F..%2Fetc%2Fpasswd"), 404, "not_found", None)
    bad("get-on-task-route", "routes", {"method": "GET", "url": "/v1/real"}, 405, "method_not_allowed", None)
    bad("job-id-traversal", "routes", {"method": "GET", "url": "/v1/jobs/..%2F..%2Fetc%2Fpasswd"}, 404, "not_found",
        None)
    bad("job-id-unknown", "routes", {"method": "GET", "url": "/v1/jobs/" + "f" * 32}, 404, "not_found", None)
    bad("job-result-unknown", "routes", {"method": "GET", "url": "/v1/jobs/" + "0" * 64 + "/result"}, 404,
        "not_found", None)
    bad("job-cancel-unknown", "routes", {"method": "DELETE", "url": "/v1/jobs/%00"}, 404, "not_found", None)
    bad("job-without-task", "routes", upload(small, FAST, task="jobs"), 422, "invalid_parameter", "task")
    bad("job-unknown-task", "routes", upload(small, {**FAST, "task": "sketch"}, task="jobs"), 404, "not_found", "task")
    bad("job-bad-steps", "routes", upload(small, {"task": "real", "steps": "0"}, task="jobs"), 422,
        "invalid_parameter", "steps")
    bad("job-path-lora", "routes", upload(small, {"task": "real", "lora": "../../x"}, task="jobs"), 422,
        "invalid_parameter", "lora")
    bad("job-task-twice", "routes", upload(small, {"task": ["real", "anime"]}, task="jobs"), 422,
        "invalid_parameter", "task")
    bad("job-no-image", "routes", {"method": "POST", "url": "/v1/jobs", "files": {"task": (None, "real")}}, 400,
        "bad_image", "image")

    names = [case.name for case in cases]
    assert len(names) == len(set(names)), "case names must be unique"
    return cases
