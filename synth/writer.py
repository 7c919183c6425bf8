"""Shard writing: complete-or-absent tar shards, a shared manifest and attempt log, resume state."""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import tarfile
import time
from pathlib import Path
from typing import Any, Iterator

from infer.video import atomic_write  # noqa: F401  (re-exported for synth's modules)

MANIFEST = "manifest.json"
ATTEMPTS = "attempts.jsonl"


@contextlib.contextmanager
def locked(folder: Path) -> Iterator[None]:
    """An exclusive lock on the output folder's shared files (ranks may run at once)."""
    with open(folder / ".lock", "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def tar_bytes(samples: list[dict[str, Any]]) -> bytes:
    """A tar of samples ``{"__key__": k, "src.mp4": bytes, ...}`` as WebDataset reads them."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:
        for sample in samples:
            key = sample["__key__"]
            for ext, data in sample.items():
                if ext == "__key__":
                    continue
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size, info.mtime, info.mode = len(data), int(time.time()), 0o644
                tar.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def read_manifest(folder: Path) -> dict[str, Any]:
    path = folder / MANIFEST
    if not path.is_file():
        return {"config_hash": None, "ranks": {}, "shards": []}
    return json.loads(path.read_text())


class ShardWriter:
    """One rank's writer. A shard is written to a hidden temporary file, fsynced and renamed; its
    attempts are appended and the manifest (with this rank's resume point) updated afterwards.
    On resume, shards and attempts the manifest does not cover are dropped and made again.
    """

    def __init__(self, folder: Path, rank: int, prefix: str, config_hash: str, resume: bool):
        self.folder, self.rank, self.prefix, self.config_hash = folder, rank, prefix, config_hash
        folder.mkdir(parents=True, exist_ok=True)
        with locked(folder):
            manifest = read_manifest(folder)
            if manifest["config_hash"] not in (None, config_hash):
                raise ValueError(f"{folder} was built with another config; use a new --out or the same config")
            state = manifest["ranks"].get(str(rank))
            if state and not resume:
                raise ValueError(f"{folder} already holds rank {rank}'s shards; pass --resume to continue")
            self.state = state or {"shards": 0, "samples": 0, "next": [0, 0], "attempts": 0}
            self._drop_uncommitted()

    def _drop_uncommitted(self) -> None:
        """Remove this rank's shards and attempt lines past the committed state (a crash's leftovers)."""
        for path in self.folder.glob(f"{self.prefix}-{self.rank:03d}-*.tar"):
            if int(path.stem.rsplit("-", 1)[1]) >= self.state["shards"]:
                path.unlink()
        for path in self.folder.glob(f".{self.prefix}-{self.rank:03d}-*.tmp"):
            path.unlink()
        attempts = self.folder / ATTEMPTS
        if attempts.is_file():
            keep = [
                line for line in attempts.read_text().splitlines()
                if line.strip() and not (json.loads(line)["rank"] == self.rank and json.loads(line)["shard"] >= self.state["shards"])
            ]
            atomic_write(attempts, ("\n".join(keep) + "\n" if keep else "").encode())

    @property
    def samples(self) -> int:
        return self.state["samples"]

    def shard_name(self, index: int) -> str:
        return f"{self.prefix}-{self.rank:03d}-{index:06d}.tar"

    def commit(self, samples: list[dict[str, Any]], attempts: list[dict[str, Any]], next_position: tuple[int, int]) -> Path | None:
        """Make ``samples`` a finished shard and record ``attempts`` and the resume point."""
        index = self.state["shards"]
        path = self.folder / self.shard_name(index)
        if samples:
            atomic_write(path, tar_bytes(samples))
        with locked(self.folder):
            with open(self.folder / ATTEMPTS, "a") as f:
                for attempt in attempts:
                    f.write(json.dumps({**attempt, "rank": self.rank, "shard": index}) + "\n")
                f.flush()
                os.fsync(f.fileno())
            manifest = read_manifest(self.folder)
            manifest["config_hash"] = self.config_hash
            if samples:
                manifest["shards"] = [s for s in manifest["shards"] if s["name"] != path.name]
                manifest["shards"].append({"name": path.name, "rank": self.rank, "samples": len(samples),
                                           "keys": [s["__key__"] for s in samples]})
            self.state = {
                "shards": index + (1 if samples else 0),
                "samples": self.state["samples"] + len(samples),
                "next": list(next_position),
                "attempts": self.state["attempts"] + len(attempts),
            }
            manifest["ranks"][str(self.rank)] = self.state
            manifest["total_samples"] = sum(s["samples"] for s in manifest["shards"])
            atomic_write(self.folder / MANIFEST, (json.dumps(manifest, indent=1) + "\n").encode())
        return path if samples else None
