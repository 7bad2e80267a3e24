"""`scpert bench stream`: the training stream (data/shards/stream.py) measured side by side in one run.

On a `ray.cluster_utils.Cluster` of 2 nodes on this machine, for W = 1, 2, 4 Ray Train workers, each worker streams
one epoch of its share exactly as pretraining does (ShardStream -> EpochLoader, no model), and the bench prints:
rows and bytes decoded per worker and in total / corpus (goal 1.00, +- one row group per worker); rows per CPU-second
of the stream against a plain pyarrow read + decode of the same shards (goal >= 80%); peak RSS per worker at 1e5 and
1e6 rows (goal: within 20%); the checkpoint's data state in bytes at 1e4 and 1e6 rows (goal: within 10%); and the
shuffle's quality (Spearman correlation of training position vs source position, row groups and shards per batch).
Corpora are dense 978-gene float32 rows of simulated z-scores written with the shard format module.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

from .. import schema as S
from ..data.shards import format as SH
from ..data.shards.stream import COLUMNS, SHUFFLE_BUFFER, ShardStream
from ..train.loader import EpochLoader, quiet_ray_data
from . import load_average


# ------------------------------------------------------------------------------------------------------- corpus
def write_shard_folder(out, rows: int, *, n_genes: int = 978, rows_per_shard: int = 50_000,
                       row_group_rows: int | None = None, seed: int = 0, dtype: str = "float32",
                       legacy: bool = False) -> dict:
    """A shard folder of `rows` simulated LINCS-like signatures (low-rank z-scores + noise, clipped to +-10; 20
    cell lines, 200 compounds + DMSO, 3 doses) written with the shard format module -> its manifest. Reused when
    the folder already holds the same corpus. `legacy`: a manifest without row_group_rows (folders written before
    the key)."""
    import pandas as pd

    out = Path(out)
    rg = row_group_rows or SH.row_group_rows(n_genes, dtype)
    spec = {"rows": rows, "n_genes": n_genes, "rows_per_shard": rows_per_shard, "rg": rg, "seed": seed,
            "dtype": dtype, "legacy": legacy}
    man_path = out / S.MANIFEST
    if man_path.is_file():
        man = json.loads(man_path.read_text())
        if man.get("bench_spec") == spec:
            return man
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    basis = rng.normal(size=(16, n_genes)).astype(np.float32)
    cells = [f"CELL{i}" for i in range(20)]
    drugs = ["DMSO"] + [f"BRD-B{i:04d}" for i in range(200)]
    shards = []
    for si, a in enumerate(range(0, rows, rows_per_shard)):
        b = min(rows, a + rows_per_shard)
        n = b - a
        i = np.arange(a, b)
        x = rng.normal(size=(n, 16)).astype(np.float32) @ basis / 4 + rng.standard_normal((n, n_genes), np.float32)
        np.clip(x, -10, 10, out=x)
        vehicle = i % 10 == 0
        didx = np.where(vehicle, 0, 1 + i % 200).astype(np.int32)
        meta = pd.DataFrame({"sig_id": [f"BENCH:{k}" for k in i], "cell_id": [cells[k % 20] for k in i],
                             "pert_id": [drugs[d] for d in didx], "pert_iname": [drugs[d] for d in didx],
                             "pert_type": np.where(vehicle, S.CTL_VEHICLE, S.TRT_CP)})
        dose = np.where(vehicle, np.nan, np.array([0.1, 1.0, 10.0])[i % 3]).astype(np.float32)
        table = SH.shard_table(meta, dose, np.full(n, 24.0), [None] * n, (i % 20).astype(np.int32), didx, x, dtype)
        name = SH.SHARD_PATTERN.format(si)
        sha, size = SH.write_shard(table, out / name, row_group_rows=rg)
        shards.append({"file": name, "rows": n, "sha256": sha, "bytes": size})
    man = {"schema_version": S.SCHEMA_VERSION, "kind": "lincs", "created": time.strftime("%Y-%m-%dT%H:%M:%SZ"),
           "genes": [str(1000 + g) for g in range(n_genes)], "gene_symbols": [f"G{g}" for g in range(n_genes)],
           "n_genes": n_genes, "cells": cells, "drugs": drugs, "drug_names": drugs, "shards": shards, "n_rows": rows,
           "expr_dtype": dtype, "metadata": "bench: simulated z-scores", "semi_synthetic": True,
           "layout": "fixed_size_list", "bench_spec": spec}
    if not legacy:
        man["row_group_rows"] = rg
    SH.write_manifest(out, man)
    return man


# ------------------------------------------------------------------------------------------------------- measuring
def plain_read(shards, groups: list[tuple[str, int]] | None = None) -> dict:
    """The reference: row groups of the shards (all, or `groups`: (path, row group)) read with pyarrow (its
    defaults) and decoded to numpy (`expr` as a [rows, genes] float32 array, the other columns as arrays), nothing
    else. Rows, CPU and wall seconds."""
    import pyarrow.parquet as pq

    if groups is None:
        groups = [(p, g) for p in SH.shard_paths(shards) for g in range(pq.ParquetFile(p).metadata.num_row_groups)]
    c0, t0, rows = time.process_time(), time.perf_counter(), 0
    for p, g in groups:
        t = pq.ParquetFile(p).read_row_group(g, columns=COLUMNS)
        e = t.column(S.EXPR).combine_chunks()
        e.flatten().to_numpy(zero_copy_only=False).reshape(len(e), e.type.list_size)
        for c in COLUMNS:
            if c != S.EXPR:
                t.column(c).to_numpy()
        rows += t.num_rows
    return {"rows": rows, "cpu_s": time.process_time() - c0, "wall_s": time.perf_counter() - t0}


class _PeakRSS:
    """This process's resident set size, sampled every 10 ms in a thread: `peak` (bytes)."""

    def __init__(self):
        import psutil

        self._p, self._stop = psutil.Process(), threading.Event()
        self.start = self.peak = self._p.memory_info().rss
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()

    def _run(self):
        while not self._stop.wait(0.01):
            self.peak = max(self.peak, self._p.memory_info().rss)

    def stop(self) -> int:
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, self._p.memory_info().rss)
        return self.peak


def shuffle_quality(train_pos, source_pos, batches_groups, batches_shards) -> dict:
    """Spearman rho of training position vs source position (0: no trace of the stored order; 1: stored order),
    and the mean number of distinct row groups and shards in a batch."""
    from scipy.stats import spearmanr

    rho = float(spearmanr(train_pos, source_pos).statistic) if len(train_pos) > 2 else float("nan")
    return {"spearman": rho, "groups_per_batch": float(np.mean(batches_groups)) if batches_groups else 0.0,
            "shards_per_batch": float(np.mean(batches_shards)) if batches_shards else 0.0}


def stream_epoch(stream: ShardStream, *, rank: int, world: int, batch: int, sample: int = 50_000) -> dict:
    """One epoch of a rank's share through the EpochLoader, as a pretraining worker takes it (no model): rows,
    CPU and wall seconds, the cursor at half the rows, and the shuffle statistics (on every k-th row)."""
    firsts = np.array([u.first for u in stream.units])
    shard_first = np.array([u.first for u in stream.units if u.group <= 0])
    expect = sum(u.rows for u in stream.units) // world
    stride = max(1, expect // sample)
    loader = EpochLoader(stream, batch_size=batch, rank=rank, world=world, first=0, epochs=1, overlap=False)
    pos, src, groups, shards, half = [], [], [], [], None
    n = k = 0
    c0, t0 = time.process_time(), time.perf_counter()
    for b in loader.epoch(0):
        rows = b["row"].numpy()
        if k % 8 == 0 and len(rows) == batch:
            groups.append(len(np.unique(np.searchsorted(firsts, rows, side="right"))))
            shards.append(len(np.unique(np.searchsorted(shard_first, rows, side="right"))))
        sel = (np.arange(n, n + len(rows)) % stride) == 0
        pos.append(np.arange(n, n + len(rows))[sel])
        src.append(rows[sel])
        n, k = n + len(rows), k + 1
        if half is None and n >= expect // 2:
            half = b["cursor"]
    cpu, wall = time.process_time() - c0, time.perf_counter() - t0
    loader.close()
    q = shuffle_quality(np.concatenate(pos), np.concatenate(src), groups, shards) if pos else {}
    return {"rows": n, "cpu_s": cpu, "wall_s": wall, "half": half, **q}


def _bench_worker(config: dict) -> None:
    """A Ray Train worker of the bench: its share of one epoch, measured; results to a JSON file per rank."""
    import ray
    import ray.train
    import torch
    import torch.distributed as dist

    from ..checkpoint.resume import data_state, gather_cursor

    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    stream = ShardStream(config["shards"], seed=0, val_fraction=config["val_fraction"],
                         shuffle_buffer=config["shuffle_buffer"], readers=config["readers"])
    plain_read(None, [(stream.paths[0], 0)])  # pyarrow's first-use set-up, counted in neither
    # the same row groups read plainly in this worker before and after its stream, every worker at once (barriers),
    # so the reference runs under the contention the stream runs under
    mine = [stream.units[i] for i in stream.plan(0, world)[rank]]
    groups = [(stream.paths[u.shard], u.group) for u in mine]
    barrier = dist.barrier if world > 1 else (lambda: None)
    rss = _PeakRSS()
    barrier()
    before = plain_read(None, groups)
    barrier()
    r = stream_epoch(stream, rank=rank, world=world, batch=config["batch"])
    peak = rss.stop()
    barrier()
    after = plain_read(None, groups)
    plain = {"rows": before["rows"] + after["rows"], "cpu_s": before["cpu_s"] + after["cpu_s"]}
    cur = gather_cursor(r.pop("half"), rank, world)  # collective, as at a checkpoint
    out = {**r, "plain_rows": plain["rows"], "plain_cpu_s": plain["cpu_s"], "rank": rank,
           "node": ray.get_runtime_context().get_node_id()[:8], "rss_start": rss.start, "rss_peak": peak,
           "decoded_rows": stream.stats.rows, "units": stream.stats.units,
           "bytes_read": stream.stats.bytes_read, "bytes_decoded": stream.stats.bytes_decoded}
    if rank == 0:
        buf = io.BytesIO()
        torch.save(data_state(cur, stream.key), buf)  # what state.pt holds for the stream
        out["data_state_bytes"] = len(buf.getvalue())
        out["cursor_rows"] = cur.rows()
    Path(config["out"]).write_text(json.dumps(out))


def corpus_totals(shards) -> dict:
    """Rows, row groups, on-disk bytes of the stream's column chunks, decoded Arrow bytes: what one full read is."""
    import pyarrow.parquet as pq

    rows = groups = on_disk = 0
    for p in SH.shard_paths(shards):
        pf = pq.ParquetFile(p)
        md = pf.metadata
        for g in range(md.num_row_groups):
            rg = md.row_group(g)
            on_disk += sum(rg.column(c).total_compressed_size for c in range(rg.num_columns)
                           if rg.column(c).path_in_schema.split(".")[0] in COLUMNS)
            groups += 1
        rows += md.num_rows
    return {"rows": rows, "groups": groups, "bytes_read": on_disk}


def _fmt_mib(b: float) -> str:
    return f"{b / 2**20:,.0f} MiB"


def run_stream_bench(*, rows: tuple[int, ...] = (10_000, 100_000, 1_000_000), workers: tuple[int, ...] = (1, 2, 4),
                     batch: int = 256, shuffle_buffer: int = SHUFFLE_BUFFER, cpus_per_worker: float = 0.5,
                     genes: int = 978, workdir: Path | None = None, out: Path | None = None) -> dict:
    """The whole bench in one run (see the module docstring). Corpora are kept in `workdir` for a rerun."""
    import ray
    import ray.train
    from ray.cluster_utils import Cluster
    from ray.train.torch import TorchTrainer

    work = Path(workdir or tempfile.mkdtemp(prefix="scpert-bench-stream-"))
    work.mkdir(parents=True, exist_ok=True)
    res: dict = {"machine": f"{os.cpu_count()} CPU cores", "load_before": load_average(), "batch": batch,
                 "genes": genes,
                 "shuffle_buffer": shuffle_buffer, "cpus_per_worker": cpus_per_worker, "corpora": {}, "runs": {}}
    for n in rows:
        t0 = time.perf_counter()
        d = work / _folder(n, genes)
        write_shard_folder(d, n, n_genes=genes)
        disk = sum(p.stat().st_size for p in d.glob("shard-*.parquet"))
        res["corpora"][n] = {**corpus_totals(d), "disk_bytes": disk, "write_s": time.perf_counter() - t0}
        print(f"[bench] corpus {n:,} rows x {genes:,} genes: {disk / 1e9:.2f} GB on disk "
              f"({res['corpora'][n]['groups']} row groups), ready in {time.perf_counter() - t0:.0f} s", flush=True)

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    quiet_ray_data()
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2})
    cluster.add_node(num_cpus=2)
    ray.init(address=cluster.address, log_to_driver=False)
    try:
        plain = ray.remote(num_cpus=cpus_per_worker)(plain_read)
        for n in rows:
            d = work / _folder(n, genes)
            res["corpora"][n]["plain"] = ray.get(plain.remote(str(d)))
            for w in workers:
                print(f"[bench] {n:,} rows, {w} worker(s) ...", flush=True)
                files = [work / f"res_{n}_{w}_{r}.json" for r in range(w)]
                for f in files:
                    f.unlink(missing_ok=True)
                t0 = time.perf_counter()
                cfg = {"shards": str(d), "val_fraction": 0.05, "shuffle_buffer": shuffle_buffer,
                       "readers": max(1, int(np.ceil(cpus_per_worker))), "batch": batch}
                TorchTrainer(_bench_worker_entry, train_loop_config={**cfg, "files": [str(f) for f in files]},
                             scaling_config=ray.train.ScalingConfig(
                                 num_workers=w, resources_per_worker={"CPU": cpus_per_worker},
                                 placement_strategy="SPREAD"),
                             run_config=ray.train.RunConfig(name=f"bench-{n}-{w}-{time.time_ns()}",
                                                            storage_path=str(work / "ray"))).fit()
                res["runs"][(n, w)] = {"workers": [json.loads(f.read_text()) for f in files],
                                       "run_s": time.perf_counter() - t0}
        # the shuffle's settings side by side on the 1e5 corpus (or the largest below it): one rank in this process,
        # interleaved with the plain read, 3 rounds, medians
        ref_n = max([n for n in rows if n <= 100_000] or [min(rows)])
        d = work / _folder(ref_n, genes)
        rounds: dict = {}
        for _ in range(3):
            rounds.setdefault("plain", []).append(plain_read(d))
            for sb in sorted({0, 4096, shuffle_buffer}):
                st = ShardStream(d, seed=0, val_fraction=0.05, shuffle_buffer=sb)
                rounds.setdefault(sb, []).append({**stream_epoch(st, rank=0, world=1, batch=batch),
                                                  "decoded_rows": st.stats.rows})
        res["shuffle_ref"] = {k: {m: float(np.median([r[m] for r in v])) for m in v[0]
                                  if isinstance(v[0][m], (int, float))} for k, v in rounds.items()}
        res["shuffle_ref_rows"] = ref_n
    finally:
        ray.shutdown()
        cluster.shutdown()
    res["load_after"] = load_average()
    report(res, rows, workers)
    if out:
        Path(out).write_text(json.dumps(_jsonable(res), indent=1, default=str))
    return res


def _folder(rows: int, genes: int) -> str:
    return f"rows{rows}" if genes == 978 else f"rows{rows}_genes{genes}"


def _bench_worker_entry(config: dict) -> None:
    import ray.train

    _bench_worker({**config, "out": config["files"][ray.train.get_context().get_world_rank()]})


def _jsonable(x):
    if isinstance(x, dict):
        return {(",".join(map(str, k)) if isinstance(k, tuple) else str(k)): _jsonable(v) for k, v in x.items()
                if k != "half"}
    if isinstance(x, list):
        return [_jsonable(v) for v in x]
    return x


def report(res: dict, rows, workers) -> None:
    """The side-by-side table and the goal lines."""
    print(f"\n[bench] stream, {res['genes']:,}-gene rows: {res['machine']}, load {res['load_before']} -> "
          f"{res['load_after']}; batch {res['batch']}, "
          f"shuffle_buffer {res['shuffle_buffer']}, {res['cpus_per_worker']} CPU per worker, 2-node "
          "ray.cluster_utils.Cluster\n")
    print("| rows | W | rows decoded / corpus | bytes read / corpus | per worker: rows decoded | row groups per worker "
          "| stream rows per CPU-s | plain pyarrow rows per CPU-s, the same row groups in the same workers (one task "
          "alone) | stream / plain | peak RSS per worker (max) "
          "| stream's RSS increase (max) | nodes | data state |")
    print("|" + "---|" * 13)
    for n in rows:
        c = res["corpora"][n]
        pl = c["plain"]
        plain_rate = pl["rows"] / max(pl["cpu_s"], 1e-9)
        for w in workers:
            ws = res["runs"][(n, w)]["workers"]
            dec = sum(x["decoded_rows"] for x in ws)
            rd = sum(x["bytes_read"] for x in ws)
            rate = dec / max(sum(x["cpu_s"] for x in ws), 1e-9)
            same = sum(x["plain_rows"] for x in ws) / max(sum(x["plain_cpu_s"] for x in ws), 1e-9)
            ds = next(x["data_state_bytes"] for x in ws if x["rank"] == 0)
            by_rank = sorted(ws, key=lambda x: x["rank"])
            per_rows = " / ".join(format(x["decoded_rows"], ",") for x in by_rank)
            per_units = " / ".join(str(x["units"]) for x in by_rank)
            print(f"| {n:,} | {w} | {dec / c['rows']:.4f} | {rd / c['bytes_read']:.4f} | {per_rows} | {per_units} | "
                  f"{rate:,.0f} | {same:,.0f} ({plain_rate:,.0f} alone) | {rate / same:.2f} | "
                  f"{_fmt_mib(max(x['rss_peak'] for x in ws))} | "
                  f"{_fmt_mib(max(x['rss_peak'] - x['rss_start'] for x in ws))} | "
                  f"{len({x['node'] for x in ws})} | {ds} B |")
    print()
    lo, hi = min(rows), max(rows)
    mid = 100_000 if 100_000 in rows else sorted(rows)[len(rows) // 2]
    for w in workers:
        ws = {n: res["runs"][(n, w)]["workers"] for n in rows}
        n_groups = {n: res["corpora"][n]["groups"] for n in rows}
        ok = all(abs(sum(x["decoded_rows"] for x in ws[n]) - res["corpora"][n]["rows"])
                 <= w * SH.row_group_rows(res["genes"]) for n in rows)
        print(f"| goal W={w}: rows decoded / corpus = 1.00 +- one row group per worker | "
              f"{'met' if ok else 'NOT met'} ({', '.join(str(n_groups[n]) + ' groups' for n in rows)}) |")
    rates = []
    for n in rows:
        if n < mid:
            continue
        for w in workers:
            ws = res["runs"][(n, w)]["workers"]
            rates.append((sum(x["decoded_rows"] for x in ws) / sum(x["cpu_s"] for x in ws))
                         / (sum(x["plain_rows"] for x in ws) / sum(x["plain_cpu_s"] for x in ws)))
    print(f"| goal: stream rows per CPU-s >= 80% of plain pyarrow (corpora >= {mid:,}) | "
          f"{'met' if min(rates) >= 0.8 else 'NOT met'} ({min(rates):.2f}-{max(rates):.2f}) |")
    for w in workers:
        a = max(x["rss_peak"] for x in res["runs"][(mid, w)]["workers"])
        b = max(x["rss_peak"] for x in res["runs"][(hi, w)]["workers"])
        print(f"| goal W={w}: peak RSS per worker at {hi:,} rows within 20% of {mid:,} | "
              f"{'met' if abs(b / a - 1) <= 0.2 else 'NOT met'} ({_fmt_mib(a)} -> {_fmt_mib(b)}, {b / a:.3f}x) |")
    for w in workers:
        a = next(x["data_state_bytes"] for x in res["runs"][(lo, w)]["workers"] if x["rank"] == 0)
        b = next(x["data_state_bytes"] for x in res["runs"][(hi, w)]["workers"] if x["rank"] == 0)
        print(f"| goal W={w}: checkpoint data state at {hi:,} rows within 10% of {lo:,} | "
              f"{'met' if abs(b / a - 1) <= 0.1 else 'NOT met'} ({a} B -> {b} B; the consumed-id sets it replaces: "
              f"8 B per row consumed, {8 * lo // 2:,} B -> {8 * hi // 2:,} B at half an epoch) |")
    print("\n| shuffle (per worker, mean) | rows | W | Spearman rho, training vs source position "
          "| row groups per batch "
          "| shards per batch | rows per CPU-s | / plain pyarrow |\n|---|---|---|---|---|---|---|---|")
    ref = dict(res["shuffle_ref"])
    pl = ref.pop("plain")
    plain_rate = pl["rows"] / pl["cpu_s"]
    m = f"{res['shuffle_ref_rows']:,} | 1"
    print(f"| plain pyarrow read + decode (stored order) | {m} | 1.000 | 1 | 1 | {plain_rate:,.0f} | 1.00 |")
    for sb, r in ref.items():
        name = "row groups permuted, rows in stored order (shuffle_buffer=0)" if sb == 0 else \
            f"row groups permuted + windows of {sb:,} rows" + (" (default)" if sb == res["shuffle_buffer"] else "")
        rate = r["decoded_rows"] / r["cpu_s"]
        print(f"| {name} | {m} | {r['spearman']:.3f} | {r['groups_per_batch']:.1f} | {r['shards_per_batch']:.1f} | "
              f"{rate:,.0f} | {rate / plain_rate:.2f} |")
    for n in rows:
        for w in workers:
            ws = res["runs"][(n, w)]["workers"]
            print(f"| default, in the W-worker run | {n:,} | {w} | {np.mean([x['spearman'] for x in ws]):.3f} | "
                  f"{np.mean([x['groups_per_batch'] for x in ws]):.1f} | "
                  f"{np.mean([x['shards_per_batch'] for x in ws]):.1f} | | |")
