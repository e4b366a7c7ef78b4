"""Sweeps: several trainings of one recipe (seeds x settings) as concurrent processes, and one
table of their results.

    from longreach.train.sweep import run_sweep
    results = run_sweep("gca-tiny", seeds=range(10), grid={"model.gca.top_k": ["2", "4"]},
                        parallel=10, out="runs/gca-sweep", success="probe/needle_first>=0.9")

Each run is ``python -m longreach.train --config RECIPE seed=S <grid> <sets>
train.out_dir=OUT/<name>`` in a process of its own, its output in ``OUT/<name>/train.log``.
A small model leaves most of a GPU idle, so running many at once on one device costs little
more wall time than running one. After each run ends, ``OUT/sweep.json``, ``sweep.csv`` and
``sweep.md`` are rewritten (atomically) from the run folders: per run its status, the last
training and held-out loss, the last value of every ``probe/...`` metric and, with a success
criterion, whether the run met it and at which step it first did.
"""

from __future__ import annotations

import csv
import hashlib
import io
import itertools
import json
import math
import os
import re
import shlex
import signal
import statistics
import subprocess
import sys
import sysconfig
import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from longreach.runtime import resolve_device, write_atomic
from longreach.train.checkpoint import list_checkpoints
from longreach.train.config import find_recipe, load_config
from longreach.train.metrics import METRICS
from longreach.train.signals import SignalHandlers

SWEEP_JSON, SWEEP_CSV, SWEEP_MD = "sweep.json", "sweep.csv", "sweep.md"
RUN_RECORD = "sweep-run.json"  # in each run folder: how the sweep ran it and how it ended
LOG = "train.log"
FINAL = "final"  # the trainer's finished-model folder
PROBE = "probe/"  # metrics of this prefix are collected into the table
OK, FAILED, STOPPED, RUNNING, PENDING = "ok", "failed", "stopped", "running", "pending"
# the settings a sweep gives each run itself
RESERVED = {"seed": "--seeds", "train.out_dir": "--out"}
_KEY_RE = re.compile(r"[A-Za-z_][\w-]*(\.[A-Za-z_][\w-]*)+")
_SUCCESS_RE = re.compile(
    r"\s*([A-Za-z_][\w./-]*)\s*(>=|<=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*"
)
_POLL_S = 0.2


class SweepStopped(Exception):
    """A sweep stopped on SIGINT / SIGTERM: its runs were asked to save and stop.

    ``results`` is the table of every run (finished, stopped or never started), ``signum``
    the signal and ``exit_code`` 128 + signum (130, 143), what the command exits with.
    """

    def __init__(self, signum: int, results: list[dict]):
        self.signum, self.results, self.exit_code = signum, results, 128 + signum
        super().__init__(f"sweep stopped by {signal.Signals(signum).name}; continue with --resume")


# ------------------------------------------------------------------------------- parsing


@dataclass(frozen=True)
class Success:
    """``metric op value``, e.g. ``probe/needle_first>=0.9`` (op: >=, >, <=, <)."""

    metric: str
    op: str
    value: float

    def holds(self, x: Any) -> bool:
        if not isinstance(x, (int, float)) or isinstance(x, bool) or math.isnan(x):
            return False
        return {">=": x >= self.value, ">": x > self.value, "<=": x <= self.value,
                "<": x < self.value}[self.op]

    def __str__(self) -> str:
        return f"{self.metric}{self.op}{self.value:g}"


def parse_success(text: str | Success | None) -> Success | None:
    """``"probe/needle_first>=0.9"`` -> ``Success``; a ValueError for anything else."""
    if text is None or isinstance(text, Success):
        return text
    m = _SUCCESS_RE.fullmatch(text)
    if not m:
        raise ValueError(
            f"bad success criterion {text!r}; expected METRIC OP NUMBER with OP one of "
            ">=, >, <=, <, e.g. probe/needle_first>=0.9 or eval_loss<1.5"
        )
    return Success(m.group(1), m.group(2), float(m.group(3)))


def parse_seeds(text: str | Iterable[int]) -> list[int]:
    """``"0-9"``, ``"0,3,5"`` or ``"0-2,7"`` (or a list of ints) -> the seeds, in order."""
    if not isinstance(text, str):
        seeds = list(text)
        if not seeds or not all(isinstance(s, int) and not isinstance(s, bool) and s >= 0
                                for s in seeds):
            raise ValueError(f"seeds must be a non-empty list of integers >= 0, got {seeds!r}")
    else:
        seeds = []
        for item in text.split(","):
            m = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
            if not m:
                raise ValueError(
                    f"bad seeds {text!r}: {item.strip()!r} is not a seed or a range; "
                    "expected e.g. 0-9, 0,3,5 or 0-2,7"
                )
            first, last = int(m.group(1)), int(m.group(2) or m.group(1))
            if last < first:
                raise ValueError(f"bad seeds {text!r}: the range {item.strip()} runs backwards")
            seeds.extend(range(first, last + 1))
    repeated = sorted({s for s in seeds if seeds.count(s) > 1})
    if repeated:
        raise ValueError(f"seed(s) {repeated} given more than once")
    return seeds


def split_values(text: str) -> list[str]:
    """Split on the commas outside brackets and quotes: ``1,[a,b],'x,y'`` -> 3 values."""
    values, depth, quote, start = [], 0, None, 0
    for i, ch in enumerate(text):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            values.append(text[start:i].strip())
            start = i + 1
    values.append(text[start:].strip())
    return values


def parse_grid(items: Iterable[str] | Mapping[str, Sequence[Any]] | None) -> dict[str, list[str]]:
    """``["model.gca.top_k=2,4", "train.lr=1e-3,3e-3"]`` (or a mapping of key -> values) ->
    ``{key: [value text, ...]}``; each value is read as YAML, like an override."""
    if not items:
        return {}
    pairs: list[tuple[str, list[str]]] = []
    if isinstance(items, Mapping):
        for key, values in items.items():
            if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
                raise ValueError(f"grid {key}: expected a list of values, got {values!r}")
            pairs.append((key, [_value_text(v) for v in values]))
    else:
        for item in items:
            key, sep, text = item.partition("=")
            if not sep:
                raise ValueError(
                    f"bad grid {item!r}; expected dotted.key=V1,V2, e.g. model.gca.top_k=2,4"
                )
            pairs.append((key.strip(), split_values(text)))
    grid: dict[str, list[str]] = {}
    for key, values in pairs:
        if key in RESERVED:
            raise ValueError(f"grid {key}: the sweep sets {key} itself (use {RESERVED[key]})")
        if not _KEY_RE.fullmatch(key):
            raise ValueError(
                f"grid key {key!r} is not a dotted key such as model.gca.top_k or train.lr"
            )
        if key in grid:
            raise ValueError(f"grid {key} given more than once")
        if not values or any(v == "" for v in values):
            raise ValueError(f"grid {key}: an empty value in {','.join(values)!r}")
        repeated = sorted({v for v in values if values.count(v) > 1})
        if repeated:
            raise ValueError(f"grid {key}: value(s) {repeated} given more than once")
        grid[key] = values
    return grid


def _value_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)  # numbers, lists and mappings: JSON is YAML


def parse_devices(text: str | Sequence[str] | None) -> list[str] | None:
    """``"cuda:0,cuda:1"`` -> ``["cuda:0", "cuda:1"]``, each checked on this machine."""
    if text is None:
        return None
    devices = [d.strip() for d in text.split(",")] if isinstance(text, str) else list(text)
    if not devices or any(not d for d in devices):
        raise ValueError(f"bad devices {text!r}; expected e.g. cuda:0,cuda:1")
    for d in devices:
        if d != "auto":
            resolve_device(d)  # a ValueError naming the device it cannot use
    return devices


# -------------------------------------------------------------------------------- the plan


@dataclass
class SweepRun:
    """One run of a sweep: its name (its folder under the sweep's), seed and settings."""

    index: int
    name: str
    seed: int
    grid: dict[str, str]
    overrides: list[str]  # what the run passes to longreach.train, but the device
    out_dir: Path
    action: str = "start"  # start, resume (it has checkpoints) or skip (it has final/)


def plan_sweep(
    recipe: str | os.PathLike,
    seeds: str | Iterable[int] | None = None,
    grid: Iterable[str] | Mapping[str, Sequence[Any]] | None = None,
    sets: Sequence[str] = (),
    out: str | os.PathLike | None = None,
    resume: bool = False,
) -> tuple[Path, Path, list[SweepRun]]:
    """(recipe file, sweep folder, runs): every run's config loaded with ``load_config``, so a
    bad setting is one ValueError before anything starts. Without ``resume`` a run folder
    that already holds something is an error (two runs' files would mix)."""
    recipe_path = find_recipe(recipe).resolve()
    sets = list(sets)
    set_keys = [item.partition("=")[0].strip() for item in sets]
    base = load_config(recipe_path, sets)  # a malformed --set is named here, once
    for key in set_keys:
        if key == "train.out_dir" or (key == "seed" and seeds is not None):
            raise ValueError(f"--set {key}: the sweep sets {key} itself (use {RESERVED[key]})")
    seed_list = parse_seeds(seeds) if seeds is not None else [base.seed]
    grid = parse_grid(grid)
    both = sorted(set(grid) & set(set_keys))
    if both:
        raise ValueError(f"{', '.join(both)} is both in --grid and --set; keep one")
    sweep_dir = Path(out) if out is not None else Path("runs") / f"{base.name}-sweep"
    sweep_dir = sweep_dir.resolve()

    labels = _short_keys(list(grid))
    runs: list[SweepRun] = []
    names: set[str] = set()
    combos = list(itertools.product(*grid.values())) if grid else [()]
    for combo in combos:
        settings = dict(zip(grid, combo))
        for seed in seed_list:
            parts = [f"{labels[k]}={_sanitize(v)}" for k, v in settings.items()] + [f"seed{seed}"]
            name = "-".join(parts)
            if name in names:  # values that differ only in characters a folder name drops
                name = f"{name}-{len(runs)}"
            names.add(name)
            run_dir = sweep_dir / name
            overrides = [f"seed={seed}", *(f"{k}={v}" for k, v in settings.items()), *sets,
                         f"train.out_dir={run_dir}"]
            try:
                load_config(recipe_path, overrides)
            except ValueError as err:
                raise ValueError(f"run {name}: {err}") from None
            runs.append(SweepRun(len(runs), name, seed, settings, overrides, run_dir))

    for run in runs:
        if (run.out_dir / FINAL).is_dir():
            run.action = "skip"
        elif list_checkpoints(run.out_dir):
            run.action = "resume"
    if not resume:
        used = [r for r in runs if r.out_dir.is_dir() and any(r.out_dir.iterdir())]
        if used:
            more = f" (and {len(used) - 1} more run folders)" if len(used) > 1 else ""
            raise ValueError(
                f"{used[0].out_dir} already holds a run{more}; continue the sweep with "
                "--resume or choose another --out"
            )
    return recipe_path, sweep_dir, runs


def _short_keys(keys: list[str]) -> dict[str, str]:
    """The last part of each dotted key (``model.gca.top_k`` -> ``top_k``), or the whole key
    where two keys end the same."""
    last = [k.rsplit(".", 1)[-1] for k in keys]
    return {k: (s if last.count(s) == 1 else k) for k, s in zip(keys, last)}


def _sanitize(value: str) -> str:
    """A value as a piece of a folder name: letters, digits and ``._+=-``; long ones cut."""
    text = re.sub(r"[^A-Za-z0-9._+=-]+", "_", value).strip("_").lstrip(".") or "_"
    if len(text) > 32:
        text = f"{text[:24]}~{hashlib.sha1(value.encode()).hexdigest()[:6]}"
    return text


# ----------------------------------------------------------------------------- running


def train_command(recipe: Path, run: SweepRun, device: str | None) -> list[str]:
    """The command line of one run (``--resume`` last, as longreach.train wants it)."""
    cmd = [sys.executable, "-m", "longreach.train", "--config", str(recipe), *run.overrides]
    if device is not None:
        cmd.append(f"train.device={device}")
    if run.action == "resume":
        cmd.append("--resume")
    return cmd


def _child_env(parallel: int) -> dict[str, str]:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # CPU runs share the cores instead of each taking all of them
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // parallel)))
    # the runs import this copy of longreach (a checkout, say), whatever their folder holds
    root = str(Path(__file__).resolve().parents[2])
    site = {sysconfig.get_paths()[k] for k in ("purelib", "platlib")}
    if root not in site:
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    return env


@dataclass
class _Child:
    run: SweepRun
    proc: subprocess.Popen
    device: str | None
    started: float
    record: dict


def run_sweep(
    recipe: str | os.PathLike,
    seeds: str | Iterable[int] | None = None,
    grid: Iterable[str] | Mapping[str, Sequence[Any]] | None = None,
    sets: Sequence[str] = (),
    parallel: int | None = None,
    devices: str | Sequence[str] | None = None,
    out: str | os.PathLike | None = None,
    resume: bool = False,
    success: str | Success | None = None,
    *,
    echo: bool = True,
) -> list[dict]:
    """Train every run of the sweep, at most ``parallel`` at once, and return its table.

    ``seeds``: ``"0-9"``, ``"0,3,5"`` or a list (default: the recipe's seed); ``grid``:
    ``["KEY=V1,V2", ...]`` or ``{KEY: [V1, V2]}``; the runs are every seed of every
    combination. ``sets``: ``KEY=VALUE`` overrides for all runs. ``devices``: run ``i`` of
    those running starts on the least busy one (default: the recipe's ``train.device``).
    ``resume``: skip runs that have ``final/``, continue those with checkpoints, start the
    others. ``success``: e.g. ``"probe/needle_first>=0.9"``.

    A failing run does not stop the others. SIGINT / SIGTERM ask every running run to save
    and stop (a second signal aborts them) and raise ``SweepStopped`` with the table.
    """
    success = parse_success(success)
    recipe_path, sweep_dir, runs = plan_sweep(recipe, seeds, grid, sets, out, resume)
    devices = parse_devices(devices)
    if devices and any(o.startswith("train.device=") for o in runs[0].overrides):
        raise ValueError("--devices and a train.device setting (--set or --grid): keep one")
    todo = [r for r in runs if r.action != "skip"]
    parallel = min(4, len(todo)) if parallel is None else parallel
    if parallel < 1 and todo:
        raise ValueError(f"--parallel must be >= 1, got {parallel}")
    console = _console(quiet=not echo)
    sweep_dir.mkdir(parents=True, exist_ok=True)

    records: dict[str, dict] = {}
    for run in runs:
        if run.action == "skip":
            records[run.name] = _finished_record(run)
        else:
            records[run.name] = _base_record(run, PENDING)
    meta = {"recipe": str(recipe_path), "success": str(success) if success else None}

    def write_tables() -> list[dict]:
        results = [run_result(records[r.name], r.out_dir, success) for r in runs]
        write_sweep_tables(sweep_dir, results, meta)
        return results

    write_tables()
    skipped = len(runs) - len(todo)
    console.print(
        f"sweep of {len(runs)} runs in {sweep_dir}: {len(todo)} to train, {parallel} at once"
        + (f", {skipped} finished before (skipped)" if skipped else ""),
    )

    env = _child_env(max(parallel, 1))
    pending, running = deque(todo), []
    busy = {d: 0 for d in devices or ()}
    turn = itertools.count()
    stop = _SignalFlag()
    with stop:
        try:
            while pending or running:
                while pending and len(running) < parallel and stop.signum is None:
                    run = pending.popleft()
                    device = None
                    if devices:  # the least busy device; ties go round
                        t, n = next(turn), len(devices)
                        device = min(devices, key=lambda d: (busy[d], (devices.index(d) - t) % n))
                        busy[device] += 1
                    child = _launch(recipe_path, run, device, env)
                    records[run.name] = child.record
                    running.append(child)
                    on = f" on {device}" if device else ""
                    verb = "resumed" if run.action == "resume" else "started"
                    console.print(f"{verb} {run.name}{on} ({len(running)} running, "
                                  f"{len(pending)} waiting)")
                    write_tables()
                if stop.take_new():  # forward each signal once: the first saves, a second aborts
                    for child in running:
                        _signal(child.proc, signal.SIGTERM)
                time.sleep(_POLL_S)
                for child in [c for c in running if c.proc.poll() is not None]:
                    running.remove(child)
                    if child.device is not None:
                        busy[child.device] -= 1
                    _finish(child, stopping=stop.signum is not None)
                    records[child.run.name] = child.record
                    _report(console, child, len(running) + len(pending))
                    write_tables()
        finally:
            for child in running:  # an error in here: do not leave runs behind
                _signal(child.proc, signal.SIGTERM)
            for child in running:
                child.proc.wait()
                _finish(child, stopping=True)
                records[child.run.name] = child.record
            results = write_tables()
    if stop.signum is not None:
        raise SweepStopped(stop.signum, results)
    return results


def _launch(recipe: Path, run: SweepRun, device: str | None, env: dict) -> _Child:
    cmd = train_command(recipe, run, device)
    run.out_dir.mkdir(parents=True, exist_ok=True)
    previous = _read_json(run.out_dir / RUN_RECORD) if run.action == "resume" else None
    record = _base_record(run, RUNNING)
    record.update(device=device, command=shlex.join(cmd),
                  wall_s=(previous or {}).get("wall_s") or 0.0)
    write_atomic(run.out_dir / RUN_RECORD, json.dumps(record, indent=2))
    with open(run.out_dir / LOG, "a" if run.action == "resume" else "w") as log:
        log.write(f"$ {shlex.join(cmd)}\n")
        log.flush()
        # a session of its own: a Ctrl-C in the terminal reaches the sweep alone, which
        # then asks each run once to save and stop (a second signal would abort it)
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, env=env, start_new_session=True)
    return _Child(run, proc, device, time.monotonic(), record)


def _finish(child: _Child, *, stopping: bool) -> None:
    rc = child.proc.returncode
    if rc == 0:
        status = OK
    elif rc in (128 + signal.SIGINT, 128 + signal.SIGTERM) or (stopping and rc < 0):
        status = STOPPED
    else:
        status = FAILED
    record = child.record
    record.update(status=status, exit_code=rc,
                  wall_s=round(record["wall_s"] + time.monotonic() - child.started, 2))
    if status == FAILED:
        record["error"] = log_tail(child.run.out_dir / LOG, 1)
    write_atomic(child.run.out_dir / RUN_RECORD, json.dumps(record, indent=2))


def _report(console, child: _Child, left: int) -> None:
    rec, name = child.record, child.run.name
    metrics = read_run_metrics(child.run.out_dir)
    loss = f", loss {metrics['loss']:.4f}" if isinstance(metrics.get("loss"), float) else ""
    console.print(f"{name}: {rec['status']} (exit {rec['exit_code']}) after {rec['wall_s']:.1f} s"
                  f"{loss}; {left} left")
    if rec["status"] == FAILED:
        tail = log_tail(child.run.out_dir / LOG, 12)
        console.print(f"--- last lines of {child.run.out_dir / LOG}:\n{tail}", style="red",
                      markup=False, highlight=False)


def _signal(proc: subprocess.Popen, signum: int) -> None:
    if proc.poll() is None:
        try:
            proc.send_signal(signum)
        except ProcessLookupError:  # ended meanwhile
            pass


class _SignalFlag(SignalHandlers):
    """SIGINT / SIGTERM only note the signal (the loop forwards it to the runs); the previous
    handlers come back on exit. Outside the main thread it does nothing."""

    def __init__(self):
        self.signum: int | None = None
        self._new = 0

    def _handle(self, signum, frame):
        if self.signum is None:
            self.signum = signum
            print(f"\n{signal.Signals(signum).name}: asking every run to save and stop "
                  "(again to abort them)", file=sys.stderr, flush=True)
        self._new += 1

    def take_new(self) -> bool:
        new, self._new = self._new > 0, 0
        return new


# ----------------------------------------------------------------------------- results


def _base_record(run: SweepRun, status: str) -> dict:
    return {"name": run.name, "index": run.index, "seed": run.seed, "grid": run.grid,
            "overrides": [o for o in run.overrides if not o.startswith("train.out_dir=")],
            "status": status, "exit_code": None, "wall_s": None}


def _finished_record(run: SweepRun) -> dict:
    """A run that has final/: its record from when it ran, or one saying it is done."""
    record = _read_json(run.out_dir / RUN_RECORD) or _base_record(run, OK)
    record.update(index=run.index, status=OK)
    return record


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return data if isinstance(data, dict) else None


def read_run_metrics(run_dir: str | os.PathLike, success: Success | None = None) -> dict:
    """From ``run_dir/metrics.jsonl``: the last step, training loss and held-out loss, the
    last value of every ``probe/...`` metric, and with ``success`` the first step where its
    metric met it (``success_step``, None if never). Damaged lines are skipped."""
    return _scan_metrics(Path(run_dir), success)[0]


def _scan_metrics(run_dir: Path, success: Success | None) -> tuple[dict, Any]:
    """``read_run_metrics``' dict, and the last value of the success metric (None without)."""
    found: dict[str, Any] = {"step": None, "loss": None, "eval_loss": None}
    probes: dict[str, Any] = {}
    success_step = last = None
    path = run_dir / METRICS
    lines = path.read_text().splitlines() if path.is_file() else []
    for line in lines:
        try:
            record = json.loads(line)
        except json.JSONDecodeError:  # a line cut short by a kill
            continue
        if not isinstance(record, dict):
            continue
        step = record.get("step")
        if "loss" in record:
            found["step"], found["loss"] = step, record["loss"]
        if "eval_loss" in record:
            found["eval_loss"] = record["eval_loss"]
        for key, value in record.items():
            if key.startswith(PROBE):
                probes[key] = value
        if success and success.metric in record:
            last = record[success.metric]
            if success_step is None and success.holds(last):
                success_step = step
    found.update(sorted(probes.items()))
    if success:
        found["success_step"] = success_step
    return found, last


def run_result(record: dict, run_dir: Path, success: Success | None) -> dict:
    """One row of the table: the run's record, its metrics and (with ``success``) whether
    its final value of the metric meets it."""
    row = {k: v for k, v in record.items() if k != "command"}
    metrics, last = _scan_metrics(run_dir, success)
    row.update(metrics)
    if success:
        row["success"] = row["status"] == OK and success.holds(last)
    row["run_dir"] = str(run_dir)
    return row


def summarize_sweep(out: str | os.PathLike, success: str | Success | None = None) -> list[dict]:
    """(Re)build ``sweep.json``, ``sweep.csv`` and ``sweep.md`` in ``out`` from its run
    folders (each with a ``sweep-run.json``) and return the rows. ``success`` defaults to the
    criterion the sweep ran with."""
    sweep_dir = Path(out).resolve()
    if not sweep_dir.is_dir():
        raise FileNotFoundError(f"sweep folder not found: {sweep_dir}")
    before = _read_json(sweep_dir / SWEEP_JSON) or {}
    success = parse_success(success if success is not None else before.get("success"))
    found = []
    for path in sorted(sweep_dir.glob(f"*/{RUN_RECORD}")):
        record = _read_json(path)
        if record is None:
            continue
        if record.get("status") in (RUNNING, PENDING) and (path.parent / FINAL).is_dir():
            record["status"] = OK  # its sweep ended before it could say so
        found.append((record.get("index", 0), record["name"], record, path.parent))
    if not found:
        raise ValueError(f"{sweep_dir} holds no sweep runs (no */{RUN_RECORD})")
    results = [run_result(rec, run_dir, success) for _, _, rec, run_dir in sorted(found)]
    meta = {"recipe": before.get("recipe"), "success": str(success) if success else None}
    write_sweep_tables(sweep_dir, results, meta)
    return results


def metric_columns(results: list[dict]) -> list[str]:
    """The metric columns of a table: losses, then every probe metric any run logged."""
    probes = sorted({k for r in results for k in r if k.startswith(PROBE)})
    return ["loss", "eval_loss", *probes]


def counts(results: list[dict]) -> dict:
    by_status = {s: sum(r["status"] == s for r in results) for s in (OK, FAILED, STOPPED, PENDING)}
    out = {"runs": len(results), **{k: v for k, v in by_status.items() if v or k in (OK, FAILED)}}
    if results and "success" in results[0]:
        out["succeeded"] = sum(bool(r["success"]) for r in results)
    return out


def write_sweep_tables(sweep_dir: Path, results: list[dict], meta: dict) -> None:
    """``sweep.json`` (everything), ``sweep.csv`` (one row per run) and ``sweep.md`` (the
    table and, when runs share settings, one line per setting over its seeds), atomically."""
    summary = {**meta, **counts(results), "results": results}
    write_atomic(sweep_dir / SWEEP_JSON, json.dumps(summary, indent=2, default=str) + "\n")
    columns = ["name", "seed", "settings", "overrides", "status", "exit_code", "wall_s", "step",
               *metric_columns(results)]
    if meta.get("success"):
        columns += ["success", "success_step"]
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    writer.writerow(columns)
    for r in results:
        cells = {**r, "overrides": " ".join(r.get("overrides") or ()),
                 "settings": " ".join(f"{k}={v}" for k, v in (r.get("grid") or {}).items())}
        writer.writerow(["" if cells.get(c) is None else cells[c] for c in columns])
    write_atomic(sweep_dir / SWEEP_CSV, buf.getvalue())
    write_atomic(sweep_dir / SWEEP_MD, markdown_summary(results, meta))


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def table_rows(results: list[dict], success: bool) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-run table as text."""
    metrics = metric_columns(results)
    header = ["run", "status", "step", *metrics]
    if success:
        header += ["success", "first step"]
    header.append("wall s")
    rows = []
    for r in results:
        row = [r["name"], r["status"], _fmt(r.get("step")), *(_fmt(r.get(m)) for m in metrics)]
        if success:
            row += [_fmt(r.get("success")), _fmt(r.get("success_step"))]
        row.append(_fmt(r.get("wall_s")))
        rows.append(row)
    return header, rows


def setting_rows(results: list[dict], success: bool) -> tuple[list[str], list[list[str]]]:
    """(header, rows) of the per-setting table: each grid setting over its seeds, the mean
    ± standard deviation of the finished runs' metrics; empty without repeated settings."""
    groups: dict[str, list[dict]] = {}
    for r in results:
        label = " ".join(f"{k}={v}" for k, v in (r.get("grid") or {}).items()) or "(recipe)"
        groups.setdefault(label, []).append(r)
    if all(len(g) < 2 for g in groups.values()):
        return [], []
    metrics = metric_columns(results)
    header = ["setting", "runs", "ok", *metrics] + (["succeeded"] if success else [])
    rows = []
    for label, group in groups.items():
        done = [r for r in group if r["status"] == OK]
        row = [label, str(len(group)), str(len(done))]
        for m in metrics:
            values = [r[m] for r in done if isinstance(r.get(m), (int, float))]
            if not values:
                row.append("-")
            elif len(values) == 1:
                row.append(_fmt(float(values[0])))
            else:
                row.append(f"{statistics.fmean(values):.4g} ± {statistics.stdev(values):.2g}")
        if success:
            row.append(f"{sum(bool(r.get('success')) for r in group)}/{len(group)}")
        rows.append(row)
    return header, rows


def summary_line(results: list[dict]) -> str:
    c = counts(results)
    parts = [f"{c[OK]} of {c['runs']} runs finished"]
    parts += [f"{c[s]} {s}" for s in (FAILED, STOPPED, PENDING) if c.get(s)]
    line = ", ".join(parts)
    if "succeeded" in c:
        line += f"; {c['succeeded']} of {c['runs']} runs succeeded"
    return line


def markdown_summary(results: list[dict], meta: dict) -> str:
    success = bool(meta.get("success"))
    lines = []
    if meta.get("recipe"):
        criterion = f", success: `{meta['success']}`" if success else ""
        lines.append(f"Sweep of `{meta['recipe']}`{criterion}")
        lines.append("")
    for header, rows in (table_rows(results, success), setting_rows(results, success)):
        if not header:
            continue
        lines.append("| " + " | ".join(header) + " |")
        lines.append("|" + "---|" * len(header))
        lines += ["| " + " | ".join(row) + " |" for row in rows]
        lines.append("")
    lines.append(summary_line(results))
    return "\n".join(lines) + "\n"


def _console(quiet: bool = False):
    from rich.console import Console

    return Console(stderr=True, quiet=quiet, soft_wrap=True, highlight=False)


def print_summary(results: list[dict], success: bool, console=None) -> None:
    """The tables as rich tables, the failed runs' logs and the summary line."""
    from rich.console import Console
    from rich.table import Table

    console = console or Console()
    for title, (header, rows) in (("sweep", table_rows(results, success)),
                                  ("by setting", setting_rows(results, success))):
        if not header:
            continue
        table = Table(title=title)
        for i, h in enumerate(header):  # names whole (folded, not cut), numbers to the right
            table.add_column(h, justify="left" if i < 2 else "right",
                             overflow="fold" if i == 0 else "ellipsis",
                             min_width=12 if i == 0 else None)
        for row in rows:
            table.add_row(*row)
        console.print(table)
    for r in results:
        if r["status"] == FAILED:
            console.print(f"{r['name']} failed: {r.get('error') or '?'} (log: "
                          f"{Path(r['run_dir']) / LOG})", markup=False)
    console.print(summary_line(results), markup=False)


def print_plan(recipe: Path, sweep_dir: Path, runs: list[SweepRun],
               devices: list[str] | None = None) -> None:
    """The runs a sweep would train and their commands (what ``--dry-run`` prints); devices
    are shown round-robin, a live sweep starts each run on the least busy one."""
    print(f"{len(runs)} runs in {sweep_dir} (dry run: nothing started)")
    cycle = devices or [None]
    for i, run in enumerate(runs):
        command = train_command(recipe, run, cycle[i % len(cycle)])
        print(f"{run.name}: {run.action}\n  {shlex.join(command)}")


def log_tail(path: Path, n: int) -> str:
    """The last ``n`` non-empty lines of a log (progress-bar redraws become lines)."""
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    lines = [ln.rstrip() for ln in re.split(r"[\r\n]+", text) if ln.strip()]
    return "\n".join(lines[-n:])
