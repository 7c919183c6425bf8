"""Shard writing: complete-or-absent tar shards and each rank's own manifest, attempt log and resume state."""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from infer.video import atomic_write  # noqa: F401  (re-exported for synth's modules)
from shards.schema import shard_name, tar_bytes

# Each rank writes only its own files (no lock shared between ranks, which NFS and Lustre do not
# honour reliably); readers merge them.
MANIFEST = "manifest-r{rank:03d}.json"
ATTEMPTS = "attempts-r{rank:03d}.jsonl"
MANIFEST_GLOB = "manifest-r[0-9][0-9][0-9].json"


def read_jsonl(path: Path, repair: bool = False) -> list[dict[str, Any]]:
    """The records of an append-only JSON-lines file. A torn last line (a process killed while
    appending) is ignored, and with ``repair`` cut off, so the next append starts a clean line;
    a bad line anywhere else is corruption and raises ``ValueError`` naming the file and line."""
    if not path.is_file():
        return []
    data = path.read_bytes()
    lines = data.split(b"\n")
    records = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            if any(rest.strip() for rest in lines[number:]):
                raise ValueError(f"{path} line {number} is not JSON") from None
            if repair:
                atomic_write(path, data[: len(data) - len(line)])
    return records


def rank_manifests(folder: Path) -> dict[int, dict[str, Any]]:
    """Every rank's manifest in ``folder``, by rank."""
    manifests = {}
    for path in sorted(folder.glob(MANIFEST_GLOB)):
        manifest = json.loads(path.read_text())
        manifests[int(manifest["rank"])] = manifest
    return manifests


def read_manifest(folder: Path) -> dict[str, Any]:
    """The build as one record: config hash, world size, each rank's state, every shard."""
    ranks = rank_manifests(folder)
    shards = [shard for manifest in ranks.values() for shard in manifest["shards"]]
    return {
        "config_hash": next((m["config_hash"] for m in ranks.values()), None),
        "world": next((m["world"] for m in ranks.values()), None),
        "ranks": {str(r): m["state"] for r, m in ranks.items()},
        "shards": shards,
        "total_samples": sum(s["samples"] for s in shards),
    }


def read_attempts(folder: Path) -> list[dict[str, Any]]:
    """Every rank's attempts (kept or rejected pairs), rank by rank."""
    return [a for r in sorted(rank_manifests(folder)) for a in read_jsonl(folder / ATTEMPTS.format(rank=r))]


class ShardWriter:
    """One rank's writer. A shard is written to a hidden temporary file, fsynced and renamed; its
    attempts are appended to this rank's log and this rank's manifest (with its resume point)
    replaced afterwards. On resume, shards and attempts the manifest does not cover are dropped and
    made again. A resume must use the world size the build started with: each rank's slice of the
    triplets depends on it.
    """

    def __init__(self, folder: Path, rank: int, prefix: str, config_hash: str, resume: bool, world: int = 1):
        self.folder, self.rank, self.prefix, self.config_hash, self.world = folder, rank, prefix, config_hash, world
        folder.mkdir(parents=True, exist_ok=True)
        self.manifest_path = folder / MANIFEST.format(rank=rank)
        self.attempts_path = folder / ATTEMPTS.format(rank=rank)
        others = rank_manifests(folder)
        if any(m["config_hash"] != config_hash for m in others.values()):
            raise ValueError(f"{folder} was built with another config; use a new --out or the same config")
        worlds = {m["world"] for m in others.values()}
        if worlds and worlds != {world}:
            raise ValueError(f"{folder} was built by {worlds.pop()} ranks; resume it with that many "
                             f"(WORLD_SIZE / --num-shards), not {world}")
        mine = others.get(rank)
        if mine and not resume:
            raise ValueError(f"{folder} already holds rank {rank}'s shards; pass --resume to continue")
        if not mine and any(folder.glob(f"{prefix}-{rank:03d}-*.tar")):
            # without a manifest nothing says which of them are finished: none is deleted or overwritten
            raise ValueError(f"{folder} holds rank {rank}'s {prefix} shards but no manifest names them; "
                             "move them away or use another --out")
        self.state = mine["state"] if mine else {"shards": 0, "samples": 0, "next": [0, 0], "attempts": 0}
        self.shards = mine["shards"] if mine else []
        self._drop_uncommitted()

    def _drop_uncommitted(self) -> None:
        """Remove this rank's shards and attempt lines past the committed state (a crash's leftovers)."""
        for path in self.folder.glob(f"{self.prefix}-{self.rank:03d}-*.tar"):
            if int(path.stem.rsplit("-", 1)[1]) >= self.state["shards"]:
                path.unlink()
        for path in self.folder.glob(f".{self.prefix}-{self.rank:03d}-*.tmp"):
            path.unlink()
        attempts = read_jsonl(self.attempts_path, repair=True)
        keep = attempts[: self.state["attempts"]]  # lines appended before a commit that never finished
        if len(keep) != len(attempts):
            atomic_write(self.attempts_path, "".join(json.dumps(a) + "\n" for a in keep).encode())

    @property
    def samples(self) -> int:
        return self.state["samples"]

    def shard_name(self, index: int) -> str:
        return shard_name(self.prefix, self.rank, index)

    def commit(self, samples: list[dict[str, Any]], attempts: list[dict[str, Any]], next_position: tuple[int, int]) -> Path | None:
        """Make ``samples`` a finished shard and record ``attempts`` and the resume point."""
        index = self.state["shards"]
        path = self.folder / self.shard_name(index)
        if samples:
            atomic_write(path, tar_bytes(samples))
        with open(self.attempts_path, "a") as f:
            for attempt in attempts:
                f.write(json.dumps({**attempt, "rank": self.rank, "shard": index}) + "\n")
            f.flush()
            os.fsync(f.fileno())
        if samples:
            self.shards = [s for s in self.shards if s["name"] != path.name]
            self.shards.append({"name": path.name, "rank": self.rank, "samples": len(samples),
                                "keys": [s["__key__"] for s in samples]})
        self.state = {
            "shards": index + (1 if samples else 0),
            "samples": self.state["samples"] + len(samples),
            "next": list(next_position),
            "attempts": self.state["attempts"] + len(attempts),
        }
        manifest = {"rank": self.rank, "world": self.world, "config_hash": self.config_hash,
                    "state": self.state, "shards": self.shards}
        atomic_write(self.manifest_path, (json.dumps(manifest, indent=1) + "\n").encode())
        return path if samples else None


@dataclass
class Outcome:
    """One attempted sample: its attempt record, the sample when kept, and the resume point after it."""

    attempt: dict[str, Any]
    sample: dict[str, Any] | None
    next_position: tuple[int, int]


def write_outcomes(writer: ShardWriter, outcomes: Iterable[Outcome], num_samples: int | None, per_shard: int,
                   bar=None) -> tuple[list[Path], bool]:
    """Commit kept samples ``per_shard`` to a shard until this rank holds ``num_samples`` (``None``:
    until ``outcomes`` ends). Returns the new shards and whether ``num_samples`` was reached; when
    the outcomes end first, what was made is committed."""
    pending: list[dict[str, Any]] = []
    attempts: list[dict[str, Any]] = []
    shards: list[Path] = []
    kept, position = writer.samples, None
    for outcome in outcomes:
        attempts.append(outcome.attempt)
        position = outcome.next_position
        if outcome.sample is not None:
            pending.append(outcome.sample)
            kept += 1
            if bar is not None:
                bar.update(1)
        done = num_samples is not None and kept >= num_samples
        if len(pending) == per_shard or done:
            path = writer.commit(pending, attempts, position)
            shards += [path] if path is not None else []
            pending, attempts = [], []
        if done:
            return shards, True
    if attempts:
        path = writer.commit(pending, attempts, position)
        shards += [path] if path is not None else []
    return shards, False
