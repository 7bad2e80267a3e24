"""Hooks into the pretraining loop, passed to `run_pretraining(cfg, callbacks=[...])` (not part of the config).

Ray Train pickles them into every worker, so they are plain objects of importable classes. A worker calls
`on_setup` once, `on_step` before each step, `on_batch` with the row ids it has just trained on, `on_end` at the end.
The two here are what the fault-tolerance and accounting tests use.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path


@dataclass
class LoopState:
    """Where a worker is: what a callback sees."""

    rank: int
    world: int
    step: int
    epoch: int
    run_dir: str


class Callback:
    def on_setup(self, state: LoopState) -> None:
        """Once per worker (re)start, after the resume state is restored."""

    def on_step(self, state: LoopState) -> None:
        """Before step `state.step` (0-based count of steps already taken) runs."""

    def on_batch(self, state: LoopState, uids: list[int]) -> None:
        """After a step, with the ids of the real rows this worker trained on (not called for padding steps)."""

    def on_end(self, state: LoopState) -> None:
        """After the last step of this worker, before validation."""


@dataclass
class KillWorker(Callback):
    """The worker of rank `rank` exits hard (os._exit) before step `at_step`, once per run folder (a marker file
    there remembers it), so Ray Train's restart from the last checkpoint can be tested."""

    at_step: int
    rank: int = 0

    def on_step(self, state: LoopState) -> None:
        if state.rank != self.rank or state.step != self.at_step:
            return
        marker = Path(state.run_dir) / f".fault_injected_step{state.step}"
        if marker.exists():
            return
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text("worker killed here by fault injection\n")
        os._exit(17)  # a hard worker death, not an exception


@dataclass
class RecordRows(Callback):
    """Each worker appends the ids it trained on ('epoch uid' lines) to `folder/rank<r>.txt`, and writes the Ray
    node it runs on to `folder/node<r>.txt`."""

    folder: str

    def on_setup(self, state: LoopState) -> None:
        import ray

        Path(self.folder).mkdir(parents=True, exist_ok=True)
        (Path(self.folder) / f"node{state.rank}.txt").write_text(ray.get_runtime_context().get_node_id())

    def on_batch(self, state: LoopState, uids: list[int]) -> None:
        with open(Path(self.folder) / f"rank{state.rank}.txt", "a") as fh:
            fh.write("".join(f"{state.epoch} {u}\n" for u in uids))


def read_rows(folder: str | Path) -> dict[int, dict[int, int]]:
    """What RecordRows wrote: epoch -> {row id: times trained on}, over all workers."""
    seen: dict[int, dict[int, int]] = {}
    for f in sorted(Path(folder).glob("rank*.txt")):
        for line in f.read_text().splitlines():
            if line:
                e, u = map(int, line.split())
                per = seen.setdefault(e, {})
                per[u] = per.get(u, 0) + 1
    return seen
