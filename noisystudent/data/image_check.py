"""A structural check of an image file: is it whole, without decoding it?

The DALI path must keep every image DALI cannot decode out of its index (one corrupt JPEG stops a DALI pipeline),
and must keep exactly the images the torch path keeps (PIL decodes them). Decoding every image with PIL to find
out costs about as much CPU as the labeling the index feeds. This check looks at what a decoder would trip over,
and decodes nothing:

- JPEG: the markers from SOI to the first SOS, each segment's length against the file's size, the frame header
  (SOF: process, precision, size, components), Huffman and quantization tables present, the EOI marker at the
  end of the file, and every marker inside the entropy-coded data (numpy finds the 0xFF bytes: a block of
  overwritten bytes or flipped bits that made a marker is what makes libjpeg stop with an error).
- PNG: the signature, IHDR's fields, every chunk's length against the file's size, every chunk's CRC (zlib's
  crc32 in C: a flipped bit anywhere in the compressed data is found this way), IDAT present, IEND reached.

It answers OK (the decoders will read it: keep), BAD (certainly not: drop, with why) or UNSURE. UNSURE is every
file the check does not vouch for: another format (WebP, GIF, text...), a JPEG process other than baseline,
extended or progressive Huffman with 8-bit samples, bytes after a JPEG's EOI, a PNG CRC mismatch. Those go to
PIL, as every image did before, so the index keeps and drops what PIL keeps and drops.

It reads every byte of the image, as a decode does, but in C (numpy, zlib) and without the inverse DCT, colour
conversion or a single pixel written. What it cannot see: damage inside a JPEG's entropy-coded data that makes no
marker (most flipped bits). PIL (libjpeg) decodes such files too, with a "Corrupt JPEG data" warning and wrong
pixels, so both index passes keep them; nvJPEG is stricter for some of them, and then DALI's pipeline raises and
the step stops with an error naming the shard (data/dali.py, PipelineRunner); `data.loader=torch` reads it."""

from __future__ import annotations

import struct
import zlib

import numpy as np
from PIL import Image

OK, BAD, UNSURE = "ok", "bad", "unsure"
IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")  # a sample's image entry, the first of these it has

JPEG_MAGIC = b"\xff\xd8\xff"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# SOF markers of the processes libjpeg and nvJPEG both decode: baseline, extended and progressive Huffman
SOF_SURE = (0xC0, 0xC1, 0xC2)
SOF_ALL = frozenset(m for m in range(0xC0, 0xD0) if m not in (0xC4, 0xC8, 0xCC))
NO_LENGTH = frozenset((0xD8, 0x01, *range(0xD0, 0xD8)))  # SOI, TEM, restart markers: no length follows
unpack_marker = struct.Struct(">BBH").unpack_from  # 0xFF, marker, segment length
unpack_frame = struct.Struct(">BHHB").unpack_from  # precision, height, width, components
TAIL = 2  # bytes at the end of a JPEG: its EOI
PNG_COLOR_DEPTHS = {0: (1, 2, 4, 8, 16), 2: (8, 16), 3: (1, 2, 4, 8), 4: (8, 16), 6: (8, 16)}


def too_many_pixels(width: int, height: int) -> bool:
    """PIL refuses an image of more than twice Image.MAX_IMAGE_PIXELS (DecompressionBombError): so does the index."""
    limit = Image.MAX_IMAGE_PIXELS
    return limit is not None and width * height > 2 * limit


def check_jpeg(data: bytes) -> tuple[str, str]:
    pos, huffman, quant, frame, size = 2, False, False, None, len(data)
    while True:
        if pos + 4 > size:
            return BAD, f"JPEG truncated at byte {pos} of {size}, before its image data"
        ff, marker, length = unpack_marker(data, pos)
        if ff != 0xFF:
            return BAD, f"JPEG: no marker at byte {pos} (0x{ff:02x})"
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in NO_LENGTH:
            pos += 2
            continue
        if marker == 0xD9:
            return BAD, "JPEG: end of image before any image data"
        if length < 2 or pos + 2 + length > size:
            return BAD, (f"JPEG truncated: segment 0x{marker:02x} at byte {pos} runs past the end of the file "
                         f"({size} bytes)")
        if marker == 0xC4:
            huffman = True
        elif marker == 0xDB:
            quant = True
        elif marker == 0xDA:  # start of scan: the entropy-coded data follows; the file must end with EOI
            if frame is None:
                return BAD, "JPEG: image data before a frame header"
            if not (huffman and quant):
                return UNSURE, "JPEG without its own Huffman or quantization tables"
            if pos + 2 + length + TAIL > size:
                return BAD, f"JPEG truncated right after its scan header ({size} bytes)"
            if data[size - TAIL:] != b"\xff\xd9":
                return UNSURE, "JPEG does not end with its EOI marker (truncated, or data after it)"
            return check_jpeg_scans(data, pos + 2 + length, progressive=frame == 0xC2)
        elif marker in SOF_ALL:
            if length < 8:
                return BAD, f"JPEG: frame header of {length} bytes"
            precision, height, width, comps = unpack_frame(data, pos + 4)
            if width == 0:
                return BAD, "JPEG: frame of width 0"
            if height and too_many_pixels(width, height):
                return BAD, f"JPEG of {width}x{height} pixels: more than PIL decodes (a decompression bomb?)"
            if marker not in SOF_SURE or precision != 8 or comps not in (1, 3, 4) or height == 0:
                return UNSURE, f"JPEG process 0x{marker:02x}, {precision}-bit, {comps} components"
            frame = marker
        pos += 2 + length


# markers a progressive JPEG has between its scans (tables, restart interval, comments, APPn): skipped by length
BETWEEN_SCANS = {0xC4, 0xDA, 0xDB, 0xDD, 0xFE, *range(0xE0, 0xF0)}


def check_jpeg_scans(data: bytes, start: int, progressive: bool) -> tuple[str, str]:
    """The entropy-coded data from `start` to the EOI at the end of `data`: a 0xFF byte there is always followed
    by 0x00 (a stuffed byte), a restart marker, or, in a progressive JPEG, a table or scan header whose length
    is in bounds and which is followed by another marker unless it is a scan header. Anything else (an
    overwritten block or flipped bits that made a marker) is what makes libjpeg stop with an error: such a file
    is left to PIL. numpy finds the 0xFF bytes; Python looks only at the few that are real markers (one, the EOI,
    in a baseline JPEG)."""
    arr = np.frombuffer(data, np.uint8)
    marks = (arr[start:-1] == 0xFF) & (arr[start + 1:] != 0x00)  # 0xFF not followed by a stuffed zero
    if np.count_nonzero(marks) == 1:  # only the EOI at the end (the caller checked it is there)
        return OK, ""
    ff = np.flatnonzero(marks) + start
    nxt = arr[ff + 1]
    real = ff[(nxt != 0xFF) & ((nxt < 0xD0) | (nxt > 0xD7))].tolist()
    end = len(data) - TAIL
    skip_to = start
    for p in real:
        if p < skip_to:  # inside a table segment skipped by its length
            continue
        if p == end:  # the EOI at the end
            return OK, ""
        marker = data[p + 1]
        if not progressive or marker not in BETWEEN_SCANS or p + 4 > end:
            return UNSURE, f"JPEG: marker 0x{marker:02x} inside the image data at byte {p}"
        length = (data[p + 2] << 8) | data[p + 3]
        skip_to = p + 2 + length
        if length < 2 or skip_to > end or (marker != 0xDA and data[skip_to] != 0xFF):
            return UNSURE, f"JPEG: segment 0x{marker:02x} at byte {p} of the image data is not where one can be"
    return UNSURE, "JPEG: no EOI found after the image data"


def check_png(data: bytes) -> tuple[str, str]:
    pos, first, idat, size = 8, True, False, len(data)
    while True:
        head = data[pos:pos + 8]
        if len(head) < 8:
            return BAD, f"PNG truncated at byte {pos} of {size}: no IEND chunk"
        length, kind = struct.unpack(">I4s", head)
        if pos + 12 + length > size:
            return BAD, f"PNG truncated: chunk {kind!r} at byte {pos} runs past the end of the file ({size} bytes)"
        body = data[pos + 8:pos + 12 + length]
        if zlib.crc32(body[:length], zlib.crc32(kind)) != struct.unpack(">I", body[length:])[0]:
            return UNSURE, f"PNG: chunk {kind!r} at byte {pos} fails its CRC"
        if first:
            if kind != b"IHDR" or length != 13:
                return BAD, "PNG does not start with its IHDR chunk"
            width, height, depth, color, _, _, interlace = struct.unpack(">IIBBBBB", body[:13])
            if width == 0 or height == 0 or depth not in PNG_COLOR_DEPTHS.get(color, ()) or interlace > 1:
                return BAD, f"PNG header: {width}x{height}, bit depth {depth}, color type {color}"
            if too_many_pixels(width, height):
                return BAD, f"PNG of {width}x{height} pixels: more than PIL decodes (a decompression bomb?)"
            first = False
        elif kind == b"IDAT":
            idat = True
        elif kind == b"IEND":
            return (OK, "") if idat else (BAD, "PNG without image data (no IDAT chunk)")
        pos += 12 + length


def check_structure(data: bytes | memoryview) -> tuple[str, str]:
    """(OK | BAD | UNSURE, why) for the image file `data` (see the module's docstring)."""
    if data[:3] == JPEG_MAGIC:
        return check_jpeg(data)
    if data[:8] == PNG_MAGIC:
        return check_png(data)
    return UNSURE, "not a JPEG or PNG"
