"""Download the public LINCS / sci-Plex3 releases listed in releases.toml: resumable (HTTP Range into `<name>.part`),
atomic (the final name appears only once the file is complete and verified), verified (publisher checksum, else the
catalogue size, else the server's announced size), optional gunzip of `.gz` downloads after verification.

A file already in the output folder (a previous run, or downloaded by hand) is verified and skipped. Every download is
recorded in `<out>/.scpert-fetch.json` (url, size, how it was verified), which lets a rerun skip a decompressed file
whose compressed original is gone.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import json
import os
import re
import shutil
import time
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from dataclasses import dataclass, field
from http.client import HTTPException
from pathlib import Path

import tomllib

from ..errors import ConfigError, FetchError, OutputError
from ..paths import atomic_write_bytes, ensure_writable_dir

CATALOGUE = Path(__file__).with_name("releases.toml")
ENV_BASE_URL = "SCPERT_FETCH_BASE_URL"
MANIFEST = ".scpert-fetch.json"
USER_AGENT = "scpert-dist (scpert data fetch)"
CHUNK = 1 << 20
DIGESTS = ("sha512", "sha256", "md5")


@dataclass
class Entry:
    """One file of a release: where it is, what its name is here, and what it is checked against."""

    key: str
    url: str
    name: str
    note: str = ""
    size: int | None = None
    digest: tuple[str, str] | None = None  # (algorithm, hex)
    digest_source: str = ""
    decompress: bool = False

    @property
    def final_name(self) -> str:
        return self.name[:-3] if self.decompress and self.name.endswith(".gz") else self.name


@dataclass
class Release:
    dataset: str
    name: str
    description: str
    base_url: str
    files: dict[str, Entry]
    default_what: list[str]
    checksums: dict | None = None


@dataclass
class Result:
    key: str
    path: Path
    action: str  # downloaded | present | would-download | partial
    size: int | None = None
    verified: str = ""
    notes: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------------------ catalogue


def load_catalogue(path: str | os.PathLike | None = None) -> dict:
    p = Path(path) if path is not None else CATALOGUE
    try:
        return tomllib.loads(p.read_text())
    except (OSError, tomllib.TOMLDecodeError) as e:
        raise ConfigError(f"cannot read the release catalogue ({e})", path=str(p),
                          hint="reinstall scpert-dist, or pass a valid catalogue") from None


def _join(base: str, path: str) -> str:
    return base.rstrip("/") + "/" + path.lstrip("/") if path else base


def get_release(dataset: str, release: str | None = None, *, base_url: str | None = None,
                catalogue: dict | None = None) -> Release:
    """The release `release` (default: the dataset's default) of `dataset`, URLs rebased on `base_url` (or
    $SCPERT_FETCH_BASE_URL) when given."""
    cat = catalogue if catalogue is not None else load_catalogue()
    if dataset not in cat:
        raise ConfigError(f"unknown dataset '{dataset}'", field="DATASET", hint=f"one of: {', '.join(cat)}")
    ds = cat[dataset]
    names = [k for k, v in ds.items() if isinstance(v, dict)]
    name = release or ds.get("default_release") or names[0]
    if name not in names:
        raise ConfigError(f"unknown release '{name}' of {dataset}", field="--release", hint=f"one of: {', '.join(names)}")
    spec = ds[name]
    base = base_url or os.environ.get(ENV_BASE_URL) or spec["base_url"]
    files = {}
    for key, f in spec["files"].items():
        digest = next(((a, f[a].lower()) for a in DIGESTS if f.get(a)), None)
        files[key] = Entry(key=key, url=_join(base, f["path"]), name=f.get("name") or Path(f["path"]).name,
                           note=f.get("note", ""), size=f.get("size"), digest=digest,
                           digest_source="catalogue" if digest else "", decompress=bool(f.get("decompress")))
    return Release(dataset, name, spec.get("description", ""), base, files, list(spec.get("default_what", files)),
                   spec.get("checksums"))


def select(rel: Release, what: str | None) -> list[Entry]:
    """The entries named in `what` ('a,b', 'all', or None for the release's default set)."""
    if what is None:
        keys = rel.default_what
    elif what.strip() == "all":
        keys = list(rel.files)
    else:
        keys = [k.strip() for k in what.split(",") if k.strip()]
    bad = [k for k in keys if k not in rel.files]
    if bad or not keys:
        raise ConfigError(f"unknown file(s) {bad} for {rel.dataset} release {rel.name}", field="--what",
                          hint=f"a comma-separated list of {', '.join(rel.files)}, or all")
    return [rel.files[k] for k in keys]


# ------------------------------------------------------------------------------------------------ HTTP


def _request(url: str, timeout: float, method: str = "GET", headers: dict | None = None):
    req = urllib.request.Request(url, method=method, headers={"User-Agent": USER_AGENT, **(headers or {})})
    return urllib.request.urlopen(req, timeout=timeout)  # noqa: S310 (https/http URLs of the catalogue)


def _unreachable(url: str, reason, out: Path | None, name: str | None) -> FetchError:
    where = f" into {out} (as {name})" if out is not None and name else ""
    return FetchError(f"cannot reach the server for {url} ({reason}); this machine may have no internet access",
                      field="url", hint=f"download the file by hand{where} and rerun the same command: it verifies "
                                        "and skips files already there; or pass --base-url with a reachable mirror")


def _http_error(e: urllib.error.HTTPError, url: str) -> FetchError:
    if e.code == 404:
        return FetchError(f"HTTP 404 Not Found: {url}", field="url",
                          hint="the file is not (or no longer) at this address; check the release on its publisher's "
                               "page, or pass --base-url with a mirror that has it")
    return FetchError(f"HTTP {e.code} {e.reason}: {url}", field="url",
                      hint="retry later; if it persists, download the file by hand into the output folder")


def _open(url: str, timeout: float, out: Path | None = None, name: str | None = None, **kw):
    try:
        return _request(url, timeout, **kw)
    except urllib.error.HTTPError:
        raise
    except urllib.error.URLError as e:
        raise _unreachable(url, e.reason, out, name) from None
    except (OSError, HTTPException) as e:
        raise _unreachable(url, e, out, name) from None


def remote_size(url: str, timeout: float) -> tuple[int | None, str]:
    """(size in bytes, '') from a HEAD request (or a 1-byte Range GET where HEAD is refused), else (None, why)."""
    for method, headers in (("HEAD", {}), ("GET", {"Range": "bytes=0-0"})):
        try:
            with _open(url, timeout, method=method, headers=headers) as r:
                total = _content_range_total(r.headers.get("Content-Range"))
                if total is None and r.status == 200 and r.headers.get("Content-Length"):
                    total = int(r.headers["Content-Length"])
                return total, "" if total is not None else "the server announces no size"
        except urllib.error.HTTPError as e:
            if e.code == 404:
                return None, "HTTP 404 Not Found"
            why = f"HTTP {e.code}"
        except FetchError:
            return None, "server unreachable"
    return None, why


def _content_range_total(value: str | None) -> int | None:
    m = re.match(r"bytes\s+(\d+|\*)-?(\d*)/(\d+|\*)", value or "")
    return int(m.group(3)) if m and m.group(3) != "*" else None


# ------------------------------------------------------------------------------------------------ checksum lists


def _parse_sha512sums(data: bytes) -> dict[str, tuple[str, str]]:
    if data[:2] == b"\x1f\x8b":
        data = gzip.decompress(data)
    out = {}
    for line in data.decode("utf-8", "replace").splitlines():
        m = re.match(r"^([0-9a-fA-F]{128})\s+\*?(.+?)\s*$", line)
        if m:
            out[Path(m.group(2)).name] = ("sha512", m.group(1).lower())
    return out


def _parse_zenodo(data: bytes) -> dict[str, tuple[str, str]]:
    doc = json.loads(data)
    files = doc.get("entries", doc.get("files", [])) if isinstance(doc, dict) else doc
    if isinstance(files, dict):
        files = files.get("entries", files)
        files = list(files.values()) if isinstance(files, dict) else files
    out = {}
    for f in files:
        algo, _, hexd = str(f.get("checksum", "")).partition(":")
        if f.get("key") and algo in DIGESTS and hexd:
            out[f["key"]] = (algo, hexd.lower())
    return out


def load_checksums(rel: Release, timeout: float) -> tuple[dict[str, tuple[str, str]], str]:
    """The publisher's checksum list of the release: ({file name: (algorithm, hex)}, its name); ({}, why) when the
    release has none or it cannot be read (the files are then verified by size)."""
    if not rel.checksums:
        return {}, "the publisher lists no checksums"
    url = _join(rel.base_url, rel.checksums.get("path", ""))
    parse = {"sha512sums": _parse_sha512sums, "zenodo": _parse_zenodo}[rel.checksums["kind"]]
    label = "Zenodo record file list" if rel.checksums["kind"] == "zenodo" else Path(url).name
    try:
        with _open(url, timeout) as r:
            sums = parse(r.read())
        return (sums, label) if sums else ({}, f"checksum list {url} lists no file")
    except urllib.error.HTTPError as e:
        return {}, f"checksum list {url} not read (HTTP {e.code})"
    except FetchError:
        return {}, f"checksum list {url} not read (server unreachable)"
    except (ValueError, OSError, EOFError) as e:
        return {}, f"checksum list {url} not readable ({e})"


def apply_checksums(entries: list[Entry], sums: dict[str, tuple[str, str]], source: str) -> None:
    for e in entries:
        if e.digest is None and e.name in sums:
            e.digest, e.digest_source = sums[e.name], source


# ------------------------------------------------------------------------------------------------ files


def file_digest(path: Path, algo: str) -> str:
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        while b := f.read(CHUNK):
            h.update(b)
    return h.hexdigest()


def _corrupt(path: Path, message: str, hint: str) -> FetchError:
    bad = path.with_name(path.name.removesuffix(".part") + ".corrupt")
    os.replace(path, bad)
    _validator_path(path).unlink(missing_ok=True)
    return FetchError(f"{message}; the file is kept as {bad.name} for inspection", path=str(bad), hint=hint)


def verify(path: Path, entry: Entry, expected_size: int | None, size_source: str) -> str:
    """Check `path` (a download or a file already there) against the entry's checksum, else the expected size;
    a mismatch moves it to `<name>.corrupt` and raises FetchError. Returns how it was verified."""
    size = path.stat().st_size
    if entry.digest is not None:
        algo, want = entry.digest
        got = file_digest(path, algo)
        if got != want:
            raise _corrupt(path, f"{algo} mismatch for {entry.name}: expected {want} ({entry.digest_source}), "
                                 f"got {got}", hint=f"delete {entry.name}.corrupt and rerun to download it again; "
                                                    "if it fails again the server or mirror serves a different file")
        return f"{algo} ok ({entry.digest_source})"
    if expected_size is not None:
        if size != expected_size:
            raise _corrupt(path, f"size mismatch for {entry.name}: expected {expected_size} bytes ({size_source}), "
                                 f"got {size}", hint=f"delete {entry.name}.corrupt and rerun to download it again")
        return f"size ok, {size} bytes ({size_source}; no checksum published)"
    return f"not verified: no checksum or size known ({size_source}; {size} bytes)"


class _Interrupted(Exception):
    """The connection ended before the announced size."""


def _validator_path(part: Path) -> Path:
    return part.with_name(part.name + ".meta")


def _start_request(url: str, part: Path, timeout: float, out: Path, name: str):
    start = part.stat().st_size if part.exists() else 0
    headers = {}
    if start:
        headers["Range"] = f"bytes={start}-"
        vp = _validator_path(part)
        meta = json.loads(vp.read_text()) if vp.exists() else {}
        if meta.get("url") == url and meta.get("validator"):
            headers["If-Range"] = meta["validator"]
    return start, _open(url, timeout, out, name, headers=headers)


def download(url: str, part: Path, *, timeout: float, out: Path, name: str, bar_factory) -> int | None:
    """Append the rest of `url` to `part` (Range from its size); returns the total size the server announced.
    Raises _Interrupted when the connection ends early (the part file keeps what arrived)."""
    try:
        start, resp = _start_request(url, part, timeout, out, name)
    except urllib.error.HTTPError as e:
        if e.code == 416 and part.exists():  # the part already holds everything
            return None
        raise _http_error(e, url) from None
    with resp:
        total = _content_range_total(resp.headers.get("Content-Range")) if resp.status == 206 else None
        if resp.status != 206:  # the server ignored the Range (or the file changed): start over
            start = 0
            total = int(resp.headers["Content-Length"]) if resp.headers.get("Content-Length") else None
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        atomic_write_bytes(_validator_path(part), json.dumps({"url": url, "validator": validator}).encode())
        _need_space(out, (total or 0) - start, name)
        got = _copy(resp, part, "ab" if start else "wb", start, total, bar_factory, name)
    if total is not None and start + got < total:
        raise _Interrupted(f"connection closed after {start + got} of {total} bytes")
    return total


def _copy(resp, part: Path, mode: str, start: int, total: int | None, bar_factory, name: str) -> int:
    """Append the response body to `part`; a failed write (also at the final flush) is an OutputError."""
    got = 0
    try:
        with open(part, mode) as f, bar_factory(total=total, initial=start, desc=name) as bar:
            while b := _read(resp, start + got):
                f.write(b)
                got += len(b)
                bar.update(len(b))
    except OSError as e:
        raise _write_error(e, part) from None
    return got


def _read(resp, at: int) -> bytes:
    try:
        return resp.read(CHUNK)
    except (HTTPException, OSError) as e:  # IncompleteRead, reset, timeout
        raise _Interrupted(f"connection lost after {at} bytes ({type(e).__name__})") from None


def _write_error(e: OSError, path: Path) -> OutputError:
    if e.errno == errno.ENOSPC:
        return OutputError("disk full while writing the download", path=str(path),
                           hint="free space (or choose another --out); the .part file is kept and a rerun resumes")
    return OutputError(f"cannot write the download ({e.strerror})", path=str(path),
                       hint="choose an output folder you can write to")


def _need_space(out: Path, need: int, name: str) -> None:
    free = shutil.disk_usage(out).free
    if need > free:
        raise OutputError(f"not enough free space for {name}: needs {need} more bytes, {free} free", path=str(out),
                          hint="free space or choose another --out; a rerun resumes where it stopped")


def gunzip(src: Path, dst: Path, bar_factory) -> int:
    """Decompress `src` into `dst` atomically (a `.part` then rename); returns the decompressed size."""
    tmp = dst.with_name(dst.name + ".part")
    n = 0
    try:
        with gzip.open(src, "rb") as fin, open(tmp, "wb") as fout, bar_factory(total=None, initial=0,
                                                                                  desc=f"gunzip {dst.name}") as bar:
            while b := fin.read(4 * CHUNK):
                fout.write(b)
                n += len(b)
                bar.update(len(b))
    except (gzip.BadGzipFile, EOFError, zlib.error) as e:
        tmp.unlink(missing_ok=True)
        raise _corrupt(src, f"{src.name} is not a valid gzip file ({e})",
                       hint=f"delete {src.name}.corrupt and rerun to download it again") from None
    except OSError as e:
        tmp.unlink(missing_ok=True)
        raise _write_error(e, dst) from None
    os.replace(tmp, dst)
    return n


# ------------------------------------------------------------------------------------------------ manifest


def _read_manifest(out: Path) -> dict:
    p = out / MANIFEST
    try:
        return json.loads(p.read_text()) if p.exists() else {}
    except (OSError, ValueError):
        return {}


def _record(out: Path, res: Result, entry: Entry) -> None:
    man = _read_manifest(out)
    man[res.path.name] = {"url": entry.url, "size": res.size, "verified": res.verified,
                          "decompressed_from": entry.name if entry.final_name != entry.name else None,
                          "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    atomic_write_bytes(out / MANIFEST, json.dumps(man, indent=1, sort_keys=True).encode())


# ------------------------------------------------------------------------------------------------ one file


@dataclass
class Options:
    out: Path
    timeout: float = 60.0
    retries: int = 2
    decompress: bool = True
    keep_gz: bool = False
    bar_factory: Callable = None  # type: ignore[assignment]
    echo: Callable[[str], None] = print


def _expected_size(entry: Entry, opt: Options) -> tuple[int | None, str]:
    if entry.size is not None:
        return entry.size, "catalogue size"
    size, why = remote_size(entry.url, opt.timeout)
    return (size, "server Content-Length") if size is not None else (None, why)


def _present_final(entry: Entry, opt: Options) -> Result | None:
    """The entry's final file when it is already in the output folder and passes verification."""
    final = opt.out / entry.final_name
    if not final.exists():
        return None
    rec = _read_manifest(opt.out).get(final.name)
    if rec and rec.get("size") == final.stat().st_size and rec.get("url") == entry.url:
        return Result(entry.key, final, "present", rec["size"], f"as recorded when fetched: {rec.get('verified')}")
    if final.name != entry.name:  # a decompressed file placed by hand: the checksum is of the .gz
        return Result(entry.key, final, "present", final.stat().st_size,
                      "not verified (placed by hand, decompressed; the published checksum is of the .gz)")
    size, src = (None, "") if entry.digest else _expected_size(entry, opt)
    return Result(entry.key, final, "present", final.stat().st_size, verify(final, entry, size, src))


def _download_verified(entry: Entry, opt: Options) -> tuple[Path, str]:
    """Download (resuming) the entry into `<name>.part`, verify it, rename it to its name. Returns (path, how)."""
    dest = opt.out / entry.name
    part = dest.with_name(dest.name + ".part")
    total = None
    for attempt in range(opt.retries + 1):
        try:
            total = download(entry.url, part, timeout=opt.timeout, out=opt.out, name=entry.name,
                             bar_factory=opt.bar_factory) or total
            break
        except _Interrupted as e:
            if attempt == opt.retries:
                raise FetchError(f"download of {entry.url} interrupted: {e}", path=str(part),
                                 hint="rerun the same command: it resumes from the partial file") from None
            opt.echo(f"  {entry.name}: {e}; resuming (try {attempt + 2} of {opt.retries + 1})")
            time.sleep(min(1.0 * (attempt + 1), 10.0))
    size, src = (entry.size, "catalogue size") if entry.size is not None else (total, "server Content-Length")
    if total is None and entry.size is None and not entry.digest:
        size, src = _expected_size(entry, opt)
    if size is not None and part.stat().st_size > size:
        raise _corrupt(part, f"{entry.name} has {part.stat().st_size} bytes, more than the expected {size} ({src})",
                       hint=f"delete {entry.name}.corrupt and rerun to download it again")
    how = verify(part, entry, size, src)
    os.replace(part, dest)
    _validator_path(part).unlink(missing_ok=True)
    return dest, how


def fetch_one(entry: Entry, opt: Options) -> Result:
    present = _present_final(entry, opt)
    if present is not None:
        return present
    dest = opt.out / entry.name
    if dest.exists():  # the (compressed) download is there (by hand or an interrupted gunzip): verify it
        size, src = (None, "") if entry.digest else _expected_size(entry, opt)
        how, action = verify(dest, entry, size, src), "present"
    else:
        dest, how = _download_verified(entry, opt)
        action = "downloaded"
    res = Result(entry.key, dest, action, dest.stat().st_size, how)
    if opt.decompress and entry.final_name != entry.name:
        final = opt.out / entry.final_name
        n = gunzip(dest, final, opt.bar_factory)
        res.notes.append(f"decompressed {dest.name} -> {final.name} ({n} bytes)")
        if not opt.keep_gz:
            dest.unlink()
        res.path, res.size = final, n
    _record(opt.out, res, entry)
    return res


# ------------------------------------------------------------------------------------------------ all files


def _bar_factory(progress: bool):
    from tqdm.auto import tqdm

    def make(total=None, initial=0, desc=""):
        return tqdm(total=total, initial=initial, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                    disable=not progress, mininterval=0.5, leave=False)

    return make


def plan_lines(rel: Release, entries: list[Entry], out: Path, timeout: float, checksum_note: str) -> list[str]:
    """What a dry run prints: one line per file with its URL, size (catalogue or HEAD), verification and state."""
    lines = [f"{rel.dataset} release {rel.name}: {rel.description}", f"  checksums: {checksum_note}"]
    total = 0
    for e in entries:
        size, why = _expected_size(e, Options(out=out, timeout=timeout))
        total += size or 0
        state = ("present" if (out / e.final_name).exists() else
                 f"partial, {(out / (e.name + '.part')).stat().st_size} bytes" if (out / (e.name + ".part")).exists()
                 else "to download")
        check = f"{e.digest[0]} ({e.digest_source})" if e.digest else "size only"
        lines.append(f"  {e.key:<18} {e.name}  {_human(size) if size is not None else 'size unknown (' + why + ')'}"
                     f"  [{check}; {state}]\n      {e.url}")
    lines.append(f"  total: {_human(total)} in {len(entries)} file(s) (known sizes) -> {out}")
    return lines


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{n} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def fetch(dataset: str, out: str | os.PathLike, *, release: str | None = None, what: str | None = None,
          base_url: str | None = None, dry_run: bool = False, progress: bool = True, decompress: bool = True,
          keep_gz: bool = False, retries: int = 2, timeout: float = 60.0, catalogue: dict | None = None,
          echo: Callable[[str], None] = print) -> list[Result]:
    """Download the selected files of a release into `out` (see the module docstring). Dry run: print the plan."""
    rel = get_release(dataset, release, base_url=base_url, catalogue=catalogue)
    entries = select(rel, what)
    for e in entries:
        e.decompress = e.decompress and decompress  # --no-decompress: the .gz is the final file
    out = Path(out)
    if not dry_run:
        ensure_writable_dir(out)
    sums, source = load_checksums(rel, timeout)
    apply_checksums(entries, sums, source)
    note = f"{len(sums)} from {source}" if sums else source
    if dry_run:
        for line in plan_lines(rel, entries, out, timeout, note):
            echo(line)
        return [Result(e.key, out / e.final_name, "would-download") for e in entries]
    if rel.checksums and not sums:
        echo(f"warning: {note}; verifying by size only")
    opt = Options(out=out, timeout=timeout, retries=retries, decompress=decompress, keep_gz=keep_gz,
                  bar_factory=_bar_factory(progress), echo=echo)
    results = []
    for e in entries:
        r = fetch_one(e, opt)
        results.append(r)
        echo(f"{r.action:<10} {r.path.name} ({_human(r.size or 0)}): {r.verified}"
             + "".join(f"; {n}" for n in r.notes))
    hint = next_command(dataset, {r.key: r.path for r in results})
    if hint:
        echo(f"next: {hint}")
    return results


NEXT = {  # the command that reads the fetched files, when the needed ones are there
    "lincs": ("scpert data lincs --gctx {level5} --siginfo {siginfo} --geneinfo {geneinfo} --compounds {compoundinfo} "
              "--out shards/"),
    "sciplex3": "scpert data sciplex --h5ad {h5ad} --out sciplex3_processed.h5ad",
}


def next_command(dataset: str, paths: dict[str, Path]) -> str | None:
    try:
        return NEXT[dataset].format(**{k: str(v) for k, v in paths.items()})
    except KeyError:
        return None


__all__ = ["CATALOGUE", "ENV_BASE_URL", "Entry", "Release", "Result", "fetch", "get_release", "load_catalogue",
           "select"]
