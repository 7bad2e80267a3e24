"""`scpert data fetch` against a real HTTP server on 127.0.0.1 (python's http.server with Range, ETag/If-Range and
a connection it can cut mid-file), serving small files under the real catalogue's paths (--base-url rewrites the
publisher's address to it): a complete download, an interrupted download resumed by the next call, a checksum
mismatch, a 404, an unreachable host, an unwritable output folder, files placed by hand, a gzipped GCTX."""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import re
import socket
import threading
import urllib.parse
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from conftest import run_cli

from scpert_dist.data.fetch import MANIFEST, get_release, load_catalogue
from scpert_dist.errors import FetchError, OutputError

SERVER_LIFETIME_S = 120  # the server shuts itself down after this, whatever the tests do


class _Store:
    def __init__(self):
        self.files: dict[str, bytes] = {}
        self.cut_once: set[str] = set()  # paths whose next GET is cut after half its bytes
        self.announce: dict[str, int] = {}  # paths served with this (false) Content-Length
        self.log: list[tuple[str, str, str | None]] = []


class _Handler(BaseHTTPRequestHandler):
    timeout = 10

    def log_message(self, *args):  # keep the test console clean
        pass

    def do_HEAD(self):
        self._serve(body=False)

    def do_GET(self):
        self._serve(body=True)

    def _serve(self, body: bool) -> None:
        store: _Store = self.server.store
        path = urllib.parse.urlsplit(self.path).path
        store.log.append((self.command, path, self.headers.get("Range")))
        data = store.files.get(path)
        if data is None:
            self.send_error(404)
            return
        etag = f'"{hashlib.sha1(data).hexdigest()}"'
        start, end, status = 0, len(data) - 1, 200
        rng, if_range = self.headers.get("Range"), self.headers.get("If-Range")
        m = re.fullmatch(r"bytes=(\d+)-(\d*)", rng or "")
        if m and if_range in (None, etag):
            start, status = int(m.group(1)), 206
            end = min(int(m.group(2)), len(data) - 1) if m.group(2) else len(data) - 1
            if start >= len(data):
                self.send_response(416)
                self.send_header("Content-Range", f"bytes */{len(data)}")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        chunk = data[start:end + 1]
        self.send_response(status)
        self.send_header("Content-Length", str(store.announce.get(path, len(chunk))))
        self.send_header("ETag", etag)
        self.send_header("Accept-Ranges", "bytes")
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if not body:
            return
        if path in store.cut_once:
            store.cut_once.discard(path)
            self.wfile.write(chunk[: len(chunk) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(chunk)


@pytest.fixture(scope="module")
def server():
    srv = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    srv.daemon_threads = True
    srv.store = _Store()
    threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True).start()
    stopper = threading.Timer(SERVER_LIFETIME_S, srv.shutdown)
    stopper.daemon = True
    stopper.start()
    yield srv
    stopper.cancel()
    srv.shutdown()
    srv.server_close()


@pytest.fixture
def store(server) -> _Store:
    server.store.files.clear()
    server.store.cut_once.clear()
    server.store.announce.clear()
    server.store.log.clear()
    return server.store


def _base(server, prefix: str) -> str:
    return f"http://127.0.0.1:{server.server_address[1]}/{prefix}/"


def _serve_release(store: _Store, dataset: str, release: str, prefix: str, sizes: dict[str, int]) -> dict[str, bytes]:
    """Serve random bytes under the catalogue's own paths of the release; returns {file name: bytes}."""
    spec = load_catalogue()[dataset][release]
    rng = __import__("random").Random(0)
    served = {}
    for key, f in spec["files"].items():
        data = rng.randbytes(sizes.get(key, 1000))
        store.files[f"/{prefix}/{f['path']}"] = data
        served[f.get("name") or Path(f["path"]).name] = data
    return served


def _sha512sums(store: _Store, prefix: str, name: str, entries: dict[str, bytes]) -> None:
    text = "".join(f"{hashlib.sha512(b).hexdigest()}  {n}\n" for n, b in entries.items())
    store.files[f"/{prefix}/{name}"] = gzip.compress(text.encode())


def _gets(store: _Store) -> list[tuple[str, str, str | None]]:
    return [r for r in store.log if r[0] == "GET"]


# ------------------------------------------------------------------------------------------------ complete


def test_complete_download_then_rerun_skips(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    served = _serve_release(store, "lincs", "beta", "beta", {"level5": 300_000, "siginfo": 50_000})
    out = tmp_path / "lincs"
    lines = []
    res = fetch("lincs", out, base_url=_base(server, "beta"), progress=False, echo=lines.append)
    assert lines[-1] == (f"next: scpert data lincs --gctx {out / 'level5_beta_trt_cp_n720216x12328.gctx'} --siginfo "
                         f"{out / 'siginfo_beta.txt'} --geneinfo {out / 'geneinfo_beta.txt'} --compounds "
                         f"{out / 'compoundinfo_beta.txt'} --out shards/")
    assert [r.key for r in res] == ["level5", "siginfo", "geneinfo", "compoundinfo"]  # the release's default set
    for r in res:
        assert r.action == "downloaded" and r.path.read_bytes() == served[r.path.name], r
        assert "size ok" in r.verified and "server Content-Length" in r.verified  # no checksum published: size
    assert sorted(p.name for p in out.iterdir()) == sorted([*(r.path.name for r in res), MANIFEST])  # no .part left
    assert (out / "level5_beta_trt_cp_n720216x12328.gctx").stat().st_size == 300_000

    store.log.clear()
    again = fetch("lincs", out, base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    assert {r.action for r in again} == {"present"} and not _gets(store)  # verified from the record, not re-read


def test_files_placed_by_hand_are_verified_and_skipped(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    served = _serve_release(store, "lincs", "beta", "beta", {})
    out = tmp_path / "hand"
    out.mkdir()
    (out / "siginfo_beta.txt").write_bytes(served["siginfo_beta.txt"])
    res = fetch("lincs", out, what="siginfo", base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    assert res[0].action == "present" and "size ok" in res[0].verified and not _gets(store)

    (out / "geneinfo_beta.txt").write_bytes(served["geneinfo_beta.txt"][:-10])  # a truncated hand download
    with pytest.raises(FetchError, match="size mismatch for geneinfo_beta.txt") as ex:
        fetch("lincs", out, what="geneinfo", base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    assert "geneinfo_beta.txt.corrupt" in str(ex.value) and not (out / "geneinfo_beta.txt").exists()


# ------------------------------------------------------------------------------------------------ resume


def test_interrupted_download_resumes_on_the_next_call(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    served = _serve_release(store, "lincs", "beta", "beta", {"siginfo": 400_000})
    path = "/beta/siginfo_beta.txt"
    store.cut_once.add(path)
    out = tmp_path / "resume"
    kw = dict(what="siginfo", base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    with pytest.raises(FetchError, match="interrupted") as ex:
        fetch("lincs", out, retries=0, **kw)
    part = out / "siginfo_beta.txt.part"
    assert "rerun the same command" in str(ex.value) and part.exists()
    assert 0 < part.stat().st_size < 400_000 and not (out / "siginfo_beta.txt").exists()
    have = part.stat().st_size

    res = fetch("lincs", out, retries=0, **kw)
    assert res[0].action == "downloaded"
    assert (out / "siginfo_beta.txt").read_bytes() == served["siginfo_beta.txt"]  # byte-identical
    assert _gets(store)[-1] == ("GET", path, f"bytes={have}-")  # the second call asked only for the rest
    assert not part.exists()


def test_a_file_changed_on_the_server_is_downloaded_again_not_spliced(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    _serve_release(store, "lincs", "beta", "beta", {"siginfo": 100_000})
    store.cut_once.add("/beta/siginfo_beta.txt")
    kw = dict(what="siginfo", base_url=_base(server, "beta"), progress=False, retries=0, echo=lambda s: None)
    with pytest.raises(FetchError, match="interrupted"):
        fetch("lincs", tmp_path, **kw)
    store.files["/beta/siginfo_beta.txt"] = new = os.urandom(90_000)  # a new version: its ETag differs
    res = fetch("lincs", tmp_path, **kw)
    assert res[0].path.read_bytes() == new and _gets(store)[-1][2] is not None  # asked If-Range, got it whole


def test_a_dropped_connection_is_resumed_within_one_call(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    served = _serve_release(store, "lincs", "beta", "beta", {"compoundinfo": 200_000})
    store.cut_once.add("/beta/compoundinfo_beta.txt")
    lines = []
    res = fetch("lincs", tmp_path / "o", what="compoundinfo", base_url=_base(server, "beta"), progress=False,
                retries=1, echo=lines.append)
    assert res[0].path.read_bytes() == served["compoundinfo_beta.txt"]
    assert any("resuming" in s for s in lines) and [g[2] is not None for g in _gets(store)] == [False, True]


# ------------------------------------------------------------------------------------------------ checksums, gzip


def test_geo_release_verified_by_its_sha512sums_and_gunzipped(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    gctx = os.urandom(120_000)
    served = _serve_release(store, "lincs", "gse92742", "geo", {})
    level5 = "GSE92742_Broad_LINCS_Level5_COMPZ.MODZ_n473647x12328.gctx.gz"
    served[level5] = gzip.compress(gctx)
    store.files[f"/geo/{level5}"] = served[level5]
    _sha512sums(store, "geo", "GSE92742_SHA512SUMS.txt.gz", served)
    out = tmp_path / "geo"
    res = fetch("lincs", out, release="gse92742", base_url=_base(server, "geo"), progress=False,
                echo=lambda s: None)
    by = {r.key: r for r in res}
    assert by["level5"].path.name == level5[:-3] and by["level5"].path.read_bytes() == gctx
    assert not (out / level5).exists()  # the verified .gz is removed after decompression (--keep-gz keeps it)
    assert all(r.verified == "sha512 ok (GSE92742_SHA512SUMS.txt.gz)" for r in res), [r.verified for r in res]
    assert by["siginfo"].path.read_bytes() == served["GSE92742_Broad_LINCS_sig_info.txt.gz"]  # tables stay .gz

    kept = fetch("lincs", tmp_path / "gz", release="gse92742", what="level5", base_url=_base(server, "geo"),
                 progress=False, decompress=False, echo=lambda s: None)
    assert kept[0].path.name == level5 and kept[0].path.read_bytes() == served[level5]  # --no-decompress


def test_checksum_mismatch_is_named_and_nothing_is_left_under_the_final_name(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    served = _serve_release(store, "lincs", "gse70138", "p2", {})
    sig = "GSE70138_Broad_LINCS_sig_info_2017-03-06.txt.gz"
    _sha512sums(store, "p2", "GSE70138_SHA512SUMS.txt.gz", {**served, sig: b"what the publisher released"})
    out = tmp_path / "bad"
    with pytest.raises(FetchError, match=f"sha512 mismatch for {re.escape(sig)}") as ex:
        fetch("lincs", out, release="gse70138", what="siginfo", base_url=_base(server, "p2"), progress=False,
              echo=lambda s: None)
    assert ex.value.path == str(out / f"{sig}.corrupt") and (out / f"{sig}.corrupt").read_bytes() == served[sig]
    assert not (out / sig).exists() and not (out / f"{sig}.part").exists()


def test_real_gctx_served_gzipped_is_readable_after_fetch(server, store, tmp_path, shared_data):
    """The real 272-signature GCTX (cmapR), gzipped and served as GEO's level-5 file, comes out readable."""
    from scpert_dist.data.fetch import fetch
    from scpert_dist.data.readers.l1000 import read_l1000

    real = (shared_data / "lincs" / "original" / "modzs_n272x978.gctx").read_bytes()
    level5 = "GSE70138_Broad_LINCS_Level5_COMPZ_n118050x12328_2017-03-06.gctx.gz"
    store.files[f"/p2/{level5}"] = gzip.compress(real)
    _sha512sums(store, "p2", "GSE70138_SHA512SUMS.txt.gz", {level5: store.files[f"/p2/{level5}"]})
    res = fetch("lincs", tmp_path / "real", release="gse70138", what="level5", base_url=_base(server, "p2"),
                progress=False, echo=lambda s: None)
    assert res[0].path.read_bytes() == real
    t = read_l1000(res[0].path)
    assert t.values.shape == (272, 978) and t.level == 5


# ------------------------------------------------------------------------------------------------ errors


def test_404_is_named_with_its_url(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    out = tmp_path / "nf"
    with pytest.raises(FetchError, match="HTTP 404 Not Found") as ex:
        fetch("sciplex3", out, base_url=_base(server, "empty"), progress=False, echo=lambda s: None)
    assert "sciplex_complete_middle_subset.h5ad" in str(ex.value) and list(out.iterdir()) == []


def test_unreachable_host_says_so_and_how_to_download_by_hand(tmp_path):
    from scpert_dist.data.fetch import fetch

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    out = tmp_path / "offline"
    with pytest.raises(FetchError, match="cannot reach the server") as ex:
        fetch("lincs", out, what="geneinfo", base_url=f"http://127.0.0.1:{port}/", progress=False, timeout=5,
              echo=lambda s: None)
    msg = str(ex.value)
    assert f"http://127.0.0.1:{port}/geneinfo_beta.txt" in msg and "no internet" in msg
    assert f"by hand into {out} (as geneinfo_beta.txt)" in msg


def test_unwritable_out_dir_is_named(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    with pytest.raises(OutputError) as ex:
        fetch("lincs", blocker / "out", base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    assert ex.value.path == str(blocker / "out") and not store.log  # refused before any request


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full (Linux)")
def test_disk_full_is_named_and_the_part_is_kept(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    _serve_release(store, "lincs", "beta", "beta", {})
    out = tmp_path / "full"
    out.mkdir()
    (out / "geneinfo_beta.txt.part").symlink_to("/dev/full")  # every write fails with ENOSPC
    with pytest.raises(OutputError, match="disk full") as ex:
        fetch("lincs", out, what="geneinfo", base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    assert ex.value.path == str(out / "geneinfo_beta.txt.part") and "rerun resumes" in str(ex.value)
    assert not (out / "geneinfo_beta.txt").exists()


def test_a_file_larger_than_the_free_space_is_refused_before_writing(server, store, tmp_path):
    from scpert_dist.data.fetch import fetch

    _serve_release(store, "lincs", "beta", "beta", {})
    store.announce["/beta/level5/level5_beta_trt_cp_n720216x12328.gctx"] = 1 << 60  # an exabyte
    with pytest.raises(OutputError, match="not enough free space for level5_beta_trt_cp_n720216x12328.gctx"):
        fetch("lincs", tmp_path, what="level5", base_url=_base(server, "beta"), progress=False, echo=lambda s: None)
    assert not (tmp_path / "level5_beta_trt_cp_n720216x12328.gctx").exists()


def test_catalogue_entries_and_bad_choices(monkeypatch):
    from scpert_dist.errors import ConfigError

    beta = get_release("lincs")
    assert beta.files["level5"].url == ("https://s3.amazonaws.com/macchiato.clue.io/builds/LINCS2020/level5/"
                                        "level5_beta_trt_cp_n720216x12328.gctx")
    geo = get_release("lincs", "gse92742")
    assert geo.checksums["kind"] == "sha512sums" and geo.files["level5"].final_name.endswith(".gctx")
    assert all(e.digest is None and e.size is None for e in beta.files.values())  # none invented
    monkeypatch.setenv("SCPERT_FETCH_BASE_URL", "http://mirror.example/x")
    assert get_release("sciplex3", "scperturb").files["h5ad"].url == (
        "http://mirror.example/x/files/SrivatsanTrapnell2020_sciplex3.h5ad/content")
    with pytest.raises(ConfigError, match="--release"):
        get_release("lincs", "gse1")
    from scpert_dist.data.fetch import select
    with pytest.raises(ConfigError, match="--what"):
        select(beta, "level5,level9")


# ------------------------------------------------------------------------------------------------ CLI




def test_cli_dry_run_lists_sizes_and_downloads_nothing(server, store, tmp_path, monkeypatch, capsys):
    served = _serve_release(store, "sciplex3", "scperturb", "zen", {"h5ad": 4096})
    h5ad = served["SrivatsanTrapnell2020_sciplex3.h5ad"]
    store.files["/zen/files"] = json.dumps({"entries": [{"key": "SrivatsanTrapnell2020_sciplex3.h5ad", "size": 4096,
                                                         "checksum": "md5:" + hashlib.md5(h5ad).hexdigest()}]}).encode()
    out = tmp_path / "dry"
    code, text = run_cli(monkeypatch, capsys, "data", "fetch", "sciplex3", "--release", "scperturb", "--out", str(out),
                      "--base-url", _base(server, "zen"), "--dry-run")
    assert code == 0, text
    assert "SrivatsanTrapnell2020_sciplex3.h5ad  4.0 KiB" in text and "md5 (Zenodo record file list)" in text and "to download" in text
    assert not out.exists() and [g[1] for g in _gets(store)] == ["/zen/files"]  # only the checksum list was read

    code, text = run_cli(monkeypatch, capsys, "data", "fetch", "sciplex3", "--release", "scperturb", "--out", str(out),
                      "--base-url", _base(server, "zen"), "--quiet")
    assert code == 0 and "md5 ok (Zenodo record file list)" in text, text
    assert (out / "SrivatsanTrapnell2020_sciplex3.h5ad").read_bytes() == h5ad


def test_cli_errors_exit_2_without_traceback(server, store, tmp_path, monkeypatch, capsys):
    code, text = run_cli(monkeypatch, capsys, "data", "fetch", "lincs", "--out", str(tmp_path / "o"), "--what", "geneinfo",
                      "--base-url", _base(server, "nothing"), "--quiet")
    assert code == 2 and "error: FetchError: HTTP 404 Not Found" in text and "Traceback" not in text, text
    code, text = run_cli(monkeypatch, capsys, "data", "fetch", "lincs", "--out", str(tmp_path / "o"), "--what", "nope")
    assert code == 2 and "error: ConfigError" in text and "level5" in text, text
