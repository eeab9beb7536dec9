"""A tar file's members from their headers alone: name, data offset and size, without reading any member's data.

Python's tarfile does the same but costs about 100 us per member in its header objects and PAX handling
(webdataset shards written by Python's tarfile carry a PAX header per member, so four headers per sample):
more than the structural check of the image itself (data/image_check.py). This parses the few fields of each
512-byte header an index needs. It follows tarfile's reading mode "r:" on what is found: a bad first header
is an error, a zero block or an unreadable later header ends the archive, a member whose data runs past the
end of the file is an error ("unexpected end of data"); PAX `path` and `size` records and GNU long names apply
to the next member. Tests compare it with tarfile member by member. The reads go through a 1 MiB buffer
(BlockReader): a shard is read once, in large reads, whatever the size of its members.

Hand-written because neither tarfile (slow, above) nor webdataset (streams every byte of every member) nor
DALI's wds2idx (a command-line tool over a whole tar, no per-image check) gives offsets at this cost."""

from __future__ import annotations

import os
import tarfile
import zlib
from collections.abc import Iterator
from typing import NamedTuple

BLOCK = 512
ZERO = bytes(BLOCK)
REGULAR = (b"0", b"\0", b"7")  # what tarfile's isfile() accepts: regular, old regular, contiguous


class Member(NamedTuple):
    name: str
    offset: int  # of the data
    size: int
    regular: bool


def _number(field: bytes) -> int:
    """A header's numeric field: octal text, or base-256 (GNU) when its first byte has the high bit set."""
    if field[0] & 0x80:
        value = int.from_bytes(field[1:], "big")
        return value - (1 << (8 * len(field) - 8)) if field[0] & 0x40 else value
    text = field.split(b"\0", 1)[0].strip()
    return int(text, 8) if text else 0


def _text(field: bytes) -> str:
    return field.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def _checksum_ok(head: bytes) -> bool:
    """The header's checksum field equals the sum of its 512 bytes with that field counted as spaces. The sum is
    taken in C: adler32's low half is 1 + the byte sum modulo 65521, and a header's byte sum is below 2 x 65521,
    so the stored value is compared modulo 65521 and checked to be in range (tarfile sums in Python: 5 us here)."""
    stored = _number(head[148:156])
    byte_sum = stored + sum(head[148:156]) - 256  # what the header's own bytes must sum to
    return 0 <= byte_sum <= 255 * BLOCK and (zlib.adler32(head) & 0xFFFF) - 1 == byte_sum % 65521


def _pax(data: bytes) -> dict[str, str]:
    """`length key=value\\n` records of a PAX header."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.find(b" ", pos)
        if space < 0:
            break
        length = int(data[pos:space])
        if length <= 0:
            break
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key.decode("utf-8", "surrogateescape")] = value.decode("utf-8", "surrogateescape")
        pos += length
    return out


class BlockReader:
    """Reads of a file through one buffer of `block` bytes, refilled in place by one `os.preadv` where a read leaves
    it: a shard's headers and small members cost one system call per block, not one per read, and no allocation
    (a fresh megabyte per refill costs page faults that show at this rate). A read returns a memoryview into the
    buffer, valid until the next read; one larger than the buffer gets bytes of its own."""

    def __init__(self, fd: int, block: int = 1 << 20):
        self.fd = fd
        self.size = os.fstat(fd).st_size
        self.buf = bytearray(block)
        self.view = memoryview(self.buf)
        self.start, self.filled = 0, 0

    def read(self, pos: int, n: int) -> memoryview | bytes:
        at = pos - self.start
        if at >= 0 and at + n <= self.filled:
            return self.view[at:at + n]
        if n > len(self.buf):
            return os.pread(self.fd, n, pos)
        self.start, self.filled = pos, os.preadv(self.fd, [self.buf], pos)
        return self.view[:min(n, self.filled)]


def members(f: BlockReader) -> Iterator[Member]:
    """Every member of the tar `f` reads, in order. Raises tarfile.ReadError where tarfile would."""
    pos, override, file_size = 0, {}, f.size
    while True:
        if pos > file_size:  # the previous member's data ran past the end of the file
            raise tarfile.ReadError("unexpected end of data")
        head = bytes(f.read(pos, BLOCK))
        if len(head) < BLOCK:
            if pos == 0:
                raise tarfile.ReadError("empty file" if not head else "truncated header")
            return
        if head == ZERO:  # the end-of-archive blocks
            return
        try:
            ok = _checksum_ok(head)
            size, kind = _number(head[124:136]), head[156:157]
        except ValueError:
            ok = False
        if not ok:
            if pos == 0:
                raise tarfile.ReadError("invalid header")
            return  # tarfile stops here too, without an error
        data = pos + BLOCK
        pos = data + -(-size // BLOCK) * BLOCK
        if kind in (b"x", b"g", b"L", b"K"):  # PAX, global PAX, GNU long name / long link: data for the next member
            body = f.read(data, size)
            if len(body) < size:
                raise tarfile.ReadError("unexpected end of data")
            body = bytes(body)
            if kind == b"x" and (b"path=" in body or b"size=" in body):  # Python's tarfile writes one for a float mtime
                override = {**override, **_pax(body)}
            elif kind == b"L":
                override = {**override, "path": body.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")}
            continue
        name = _text(head[:100])
        if kind == b"\0" and name.endswith("/"):  # an old-style directory
            kind = b"5"
        if kind == b"5":
            name = name.rstrip("/")
        prefix = _text(head[345:500])
        if prefix and kind != b"S":  # a ustar long name (tarfile joins it for every type but GNU's)
            name = f"{prefix}/{name}"
        if "path" in override:
            name = override["path"]
        if "size" in override:
            size = int(override["size"])
            pos = data + -(-size // BLOCK) * BLOCK
        override = {}
        if data + size > file_size:
            raise tarfile.ReadError("unexpected end of data")
        yield Member(name, data, size, kind in REGULAR)
