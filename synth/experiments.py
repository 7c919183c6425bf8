"""The recorded shapes-world experiments: each one's shard builds, training and evaluation, run as one plan."""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from model import shipped_config

FOLDER = Path("configs/experiments/shapes")  # relative to the project root, where every run starts
REGISTRY = "experiments.yaml"


@dataclass(frozen=True)
class Step:
    """One command of a plan: ``python -m <module> <args>``."""

    what: str
    module: str
    args: tuple[str, ...]

    def command(self) -> list[str]:
        return [sys.executable, "-m", self.module, *self.args]

    def __str__(self) -> str:
        return f"python -m {self.module} " + " ".join(shlex.quote(a) for a in self.args)


def registry() -> dict[str, dict[str, Any]]:
    """The experiments of ``configs/experiments/shapes/experiments.yaml``, by name."""
    return shipped_config(f"experiments/shapes/{REGISTRY}")["experiments"]


def layered(paths: list[Path]) -> dict[str, Any]:
    """The config sections as LightningCLI layers them: later files win, key by key within a section."""
    merged: dict[str, Any] = {}
    for path in paths:
        for section, value in (yaml.safe_load(path.read_text()) or {}).items():
            if isinstance(value, dict) and isinstance(merged.get(section), dict):
                merged[section] = {**merged[section], **value}
            else:
                merged[section] = value
    return merged


def plan(name: str, ablation: bool = False, folder: Path = FOLDER) -> list[Step]:
    """The commands of experiment ``name`` (or of its per-frame 2D ablation), in order."""
    experiments = registry()
    if name not in experiments:
        raise ValueError(f"no experiment {name!r}; the recorded ones are {', '.join(experiments)}")
    spec = experiments[name]
    out = f"outputs/{name}"
    steps = [Step(f"shards: {s['out']}", "synth", ("build", "--config", str(folder / s["world"]), "--out", s["out"],
                                                   "--num-samples", str(s["samples"]), "--resume"))
             for s in spec["shards"]]
    layers = [folder / layer for layer in spec["train"]] + ([folder / spec.get("ablation", "ablation.yaml")]
                                                             if ablation else [])
    fit = [arg for layer in layers for arg in ("--config", str(layer))]
    if ablation:  # into a folder of its own, so the experiment's editor and checkpoints stay
        editor = f"{out}-ablation/editor"
        fit += ["--trainer.default_root_dir", f"{out}-ablation/train", "--model.export_dir", editor]
    else:
        editor = layered(layers)["model"]["export_dir"]
    steps.append(Step("train", "train", ("fit", *fit)))
    reports = spec["ablation_reports" if ablation else "reports"]
    for report, flags in reports.items():
        steps.append(Step(f"report: {out}/{report}", "synth.demo",
                          ("--world", str(folder / spec["world"]), "--editor", editor, "--out", out, "--report", report,
                           *map(str, flags))))
    return steps


def main(argv: list[str] | None = None) -> int:
    experiments = registry()
    ap = argparse.ArgumentParser(prog="python -m synth.experiments", description=__doc__)
    ap.add_argument("name", nargs="?", help=f"one of: {', '.join(experiments)}")
    ap.add_argument("--ablation", action="store_true", help="its per-frame 2D ablation instead (temporal layers never train)")
    ap.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    ap.add_argument("--list", action="store_true", help="list the experiments")
    args = ap.parse_args(argv)
    if args.list or not args.name:
        for name, spec in experiments.items():
            print(f"{name:12s} {spec.get('about', '')}")
        return 0
    try:
        steps = plan(args.name, args.ablation)
    except ValueError as err:
        print(f"experiments: error: {err}", file=sys.stderr)
        return 2
    for step in steps:
        print(f"[{args.name}{' ablation' if args.ablation else ''}] {step.what}: {step}", file=sys.stderr, flush=True)
        if not args.dry_run:
            code = subprocess.run(step.command()).returncode
            if code:
                print(f"experiments: {step.what} failed (exit {code}); rerun to continue: finished shards are kept",
                      file=sys.stderr)
                return code
    return 0


if __name__ == "__main__":
    sys.exit(main())
