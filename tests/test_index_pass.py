"""The DALI path's index pass without DALI: the structural check keeps and drops what PIL's decode does, records
shared by concurrent processes stay whole, and a process reads only the records of the shards it asks for."""

from __future__ import annotations

import io
import multiprocessing as mp

import numpy as np
import pytest
from conftest import jpeg_kind
from PIL import Image

from noisystudent.data import dali_index as DI
from noisystudent.data.image_check import BAD, OK, UNSURE, check_structure
from noisystudent.data.writer import write_shard


def _jpeg(img, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85, **kw)
    return buf.getvalue()


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _images(n: int, seed: int = 0) -> list[tuple[str, bytes]]:
    """Whole images of every kind the DALI tests use and more, and broken ones of the kinds a pool holds."""
    from sklearn.datasets import load_sample_image

    rng = np.random.default_rng(seed)
    src = Image.fromarray(load_sample_image("china.jpg"))
    out = []
    for _ in range(n):
        w, h = int(rng.integers(64, 300)), int(rng.integers(64, 300))
        x, y = int(rng.integers(0, src.width - w)), int(rng.integers(0, src.height - h))
        img = src.crop((x, y, x + w, y + h))
        base = _jpeg(img)
        sos = base.find(b"\xff\xda")
        over = bytearray(base)
        at = int(rng.integers(sos + 20, len(base) - 302))
        over[at:at + 300] = rng.bytes(300)
        png = bytearray(_png(img))
        png[int(rng.integers(40, len(png) - 20))] ^= 0x10
        out += [("rgb", base), ("gray", _jpeg(img.convert("L"))), ("cmyk", _jpeg(img.convert("CMYK"))),
                ("progressive", _jpeg(img, progressive=True)), ("png", _png(img)), ("palette", _png(img.convert("P"))),
                ("truncated", base[:int(rng.integers(2, len(base) - 2))]), ("overwritten", bytes(over)),
                ("trailing", base + rng.bytes(100)), ("png_truncated", _png(img)[:int(rng.integers(8, 200))]),
                ("png_bitflip", bytes(png)), ("text", b"not an image"), ("empty", b"")]
    return out


def test_structural_check_keeps_and_drops_what_pil_does():
    verdicts = {}
    for kind, data in _images(12):
        pil, _ = DI.check_image(data, "decode")
        ours, _ = DI.check_image(data, "structure")
        assert (pil is None) == (ours is None), (kind, pil, ours)
        verdicts.setdefault(kind, set()).add(check_structure(data)[0])
    # the whole JPEGs and PNGs are vouched for without a decode; what is surely broken is dropped without one
    for kind in ("rgb", "gray", "cmyk", "progressive", "png", "palette"):
        assert verdicts[kind] == {OK}, kind
    assert verdicts["png_truncated"] == {BAD}
    # the rest goes to PIL: no EOI at the end, a CRC mismatch, another format
    assert verdicts["trailing"] == verdicts["png_bitflip"] == verdicts["text"] == verdicts["empty"] == {UNSURE}
    assert UNSURE in verdicts["overwritten"]  # a block of random bytes in the scan makes markers libjpeg stops at


def test_index_pass_reads_the_test_shards_as_pil_does(jpeg_shards, tmp_path):
    urls = sorted(str(p) for p in jpeg_shards.glob("u-*.tar"))
    for url in urls:
        fast, slow = DI._read_shard(url, "structure"), DI._read_shard(url, "decode")
        assert fast.keys == slow.keys and fast.offsets == slow.offsets and fast.cls == slow.cls
        assert [k for k, _ in fast.bad] == [k for k, _ in slow.bad]
        assert all(jpeg_kind(int(k[3:])) == "corrupt" for k, _ in fast.bad) and fast.bad
        # PIL decoded only truncated JPEGs the structure left it (cut inside the image data); none of the good ones
        assert fast.unsure == sum("Error: " in why for _, why in fast.bad) > 0
        assert slow.unsure == len(slow.keys) + len(slow.bad)


def _fill(args) -> int:
    index_dir, urls, rounds = args
    for _ in range(rounds):
        for url in urls:
            # as two runs would: the same records made again and again while the other process reads and writes them
            (index_dir / DI.record_path(index_dir, url).name).unlink(missing_ok=True)
            DI.index_shard(index_dir, url)
            assert DI.load_record(index_dir, url) is not None
    return 0


def test_processes_filling_one_shared_folder_never_corrupt_it(jpeg_shards, tmp_path):
    urls = sorted(str(p) for p in jpeg_shards.glob("u-*.tar"))
    ref = {u: DI._read_shard(u) for u in urls}
    cache = tmp_path / "cache"
    with mp.get_context("spawn").Pool(2) as pool:
        assert pool.map(_fill, [(cache, urls, 6), (cache, urls[::-1], 6)]) == [0, 0]
    records = DI.index_shards(cache, urls)
    for u in urls:
        assert records[u].keys == ref[u].keys and records[u].offsets == ref[u].offsets
        lines = records.index_file(u).read_text().splitlines()
        assert lines[0] == f"v1.2 {len(ref[u])}" and len(lines) == len(ref[u]) + 1
    assert not list(cache.glob(".*.tmp"))  # every temporary file renamed or removed
    assert len(list(cache.glob("*.rec"))) == len(urls) and len(list(cache.glob("*.idx"))) == len(urls)


def test_a_process_reads_only_the_records_it_asks_for(jpeg_shards, tmp_path, monkeypatch):
    from noisystudent.data import dali as D

    urls = sorted(str(p) for p in jpeg_shards.glob("u-*.tar"))
    DI.index_shards(tmp_path, urls)
    loaded = []
    real = DI.load_record
    monkeypatch.setattr(DI, "load_record", lambda d, u: loaded.append(u) or real(d, u))
    records = DI.index_shards(tmp_path, urls)
    found = D.index_summary(records, urls)
    assert D.kept(records, urls) == urls and loaded == []  # counts, corrupt keys, readable: from the headers
    n_bad = sum(len(DI._read_shard(u).bad) for u in urls)
    assert found["corrupt"] == n_bad and found["indexed"] == sum(records.count(u) for u in urls)
    assert records[urls[1]].url == urls[1] and loaded == [urls[1]]


def test_a_shard_changed_on_disk_is_indexed_again_and_an_old_record_is_not_read(tmp_path):
    shard = tmp_path / "s-000000.tar"
    img = Image.new("RGB", (32, 32), (10, 200, 30))
    write_shard(shard, [{"__key__": f"k{i}", "jpg": _jpeg(img)} for i in range(4)])
    records = DI.index_shards(tmp_path / "idx", [str(shard)])
    first = records.index_file(str(shard))
    write_shard(shard, [{"__key__": f"k{i}", "jpg": _jpeg(img)} for i in range(6)])
    records = DI.index_shards(tmp_path / "idx", [str(shard)])
    assert records.count(str(shard)) == 6 and records.index_file(str(shard)) != first
    # a record in the format before (one JSON object) is made again, not misread
    DI.record_path(tmp_path / "idx", str(shard)).write_text('{"version": 1, "keys": []}')
    assert DI.load_head(tmp_path / "idx", str(shard)) is None
    assert DI.index_shards(tmp_path / "idx", [str(shard)]).count(str(shard)) == 6
    with pytest.raises(ValueError, match="check='fast'"):
        DI.index_shards(tmp_path / "idx", [str(shard)], check="fast")


def _tarfile_members(path):
    import tarfile

    try:
        with tarfile.open(path, "r:") as tar:
            return [(m.name, m.offset_data, m.size, m.isfile()) for m in tar]
    except tarfile.ReadError:
        return "error"


def _our_members(path):
    import os
    import tarfile

    from noisystudent.data.tar_headers import BlockReader, members

    fd = os.open(path, os.O_RDONLY)
    try:
        return [(m.name, m.offset, m.size, m.regular) for m in members(BlockReader(fd, block=4096))]
    except tarfile.ReadError:
        return "error"
    finally:
        os.close(fd)


def test_tar_headers_read_as_tarfile_does(tmp_path):
    import tarfile

    rng = np.random.default_rng(0)
    files = {}
    for fmt, name in ((tarfile.PAX_FORMAT, "pax"), (tarfile.GNU_FORMAT, "gnu"), (tarfile.USTAR_FORMAT, "ustar")):
        path = tmp_path / f"{name}.tar"
        with tarfile.open(path, "w", format=fmt) as tar:
            for i in range(20):
                data = rng.bytes(int(rng.integers(0, 3000)))
                # long names (ustar splits them into prefix + name, GNU and PAX use their own records), non-ASCII
                # names (a PAX path record), a float mtime (a PAX record without a path), a directory
                stem = ("d" * 60 + "/" + "x" * 70 + f"{i}") if i % 3 == 0 else f"é{i}"
                info = tarfile.TarInfo(f"{stem}.jpg")
                info.size, info.mtime = len(data), 1.5e9 + 0.25
                tar.addfile(info, io.BytesIO(data))
            d = tarfile.TarInfo("adir")
            d.type = tarfile.DIRTYPE
            tar.addfile(d)
        files[name] = path.read_bytes()
    cases = dict(files)
    whole = files["pax"]
    cases.update({"cut_in_data": whole[:5000], "cut_in_header": whole[:512 * 7 + 100], "empty": b"",
                  "garbage_after": whole[:-1024] + rng.bytes(4096), "not_a_tar": b"not a tar archive " * 100,
                  "zeros": bytes(4096), "flipped_header": whole[:1536] + bytes([whole[1536] ^ 1]) + whole[1537:]})
    for name, data in cases.items():
        path = tmp_path / f"case-{name}.tar"
        path.write_bytes(data)
        ref = _tarfile_members(path)
        assert _our_members(path) == ref, name
    assert len(_tarfile_members(tmp_path / "case-pax.tar")) == 21 and _tarfile_members(tmp_path / "case-empty.tar") \
        == "error"


def test_a_bad_shard_in_a_worker_process_stops_the_pass_with_its_name(tmp_path):
    from noisystudent.errors import DataError

    img = Image.new("RGB", (16, 16), (200, 10, 30))
    good = [{"__key__": f"k{i}", "jpg": _jpeg(img)} for i in range(8)]
    urls = []
    for s in range(3):
        url = tmp_path / f"s-{s:06d}.tar"
        write_shard(url, good if s != 1 else good + [{"__key__": "nothing", "txt": b"no image here"}])
        urls.append(str(url))
    with pytest.raises(DataError, match=r"s-000001.tar, sample 'nothing': no image entry"):
        DI.index_shards(tmp_path / "idx", urls, 3)
    # the good shards' records that were made stay, and a pass over them needs no worker process
    records = DI.index_shards(tmp_path / "idx", [urls[0], urls[2]], 3)
    assert records.count(urls[0]) == records.count(urls[2]) == 8
