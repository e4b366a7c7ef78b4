"""What every suite of ``longreach bench attention`` and ``longreach bench recurrence`` shares:
rows and their results file (rewritten after every row), the timer, the run's metadata (command,
device, versions, how rows were timed), and the parsing of --suite and --lengths.
"""

from __future__ import annotations

import json
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from longreach.bench.floors import floor_ms
from longreach.runtime import resolve_device, write_atomic

DTYPE = torch.bfloat16  # the timed inputs' dtype
SMOKE_NOTE = " (SMOKE TEST: tiny shapes, times mean nothing)"


@dataclass
class Row:
    suite: str
    case: str  # the shape: rows of one case and pass are compared with each other
    pass_: str  # fwd, fwd+bwd, decode, train step, prefill
    kind: str  # short id the baselines are looked up by
    impl: str  # what ran, in words
    ms: float
    flops: int | None = None
    bytes: int | None = None
    shape: dict = field(default_factory=dict)
    note: str = ""
    tflops: float | None = None
    floor_ms: float | None = None
    x_floor: float | None = None
    speedup: dict = field(default_factory=dict)

    def as_json(self) -> dict:
        d = dict(self.__dict__)
        d["pass"] = d.pop("pass_")
        return d


class Recorder:
    """Collects rows, prints a progress line per row and rewrites the JSON after each one.

    baselines: {suite: row kinds} that each row of the suite is compared with (`Row.kind`),
    the first one being "the" baseline.
    """

    def __init__(self, out: Path | None, meta: dict, *, baselines: dict[str, tuple[str, ...]],
                 peak_flops: float, peak_bw: float, title: str):
        self.out, self.meta, self.rows, self.baselines = out, meta, [], baselines
        self.peak_flops, self.peak_bw, self.title = peak_flops, peak_bw, title

    def add(self, row: Row) -> Row:
        if row.flops is not None and row.bytes is not None:
            row.tflops = row.flops / (row.ms * 1e-3) / 1e12
            row.floor_ms = floor_ms(row.flops, row.bytes, peak_flops=self.peak_flops,
                                    peak_bytes_per_s=self.peak_bw)
            row.x_floor = row.ms / row.floor_ms
        for base in self.rows:
            if (base.suite, base.case, base.pass_) == (row.suite, row.case, row.pass_) and (
                base.kind in self.baselines.get(row.suite, ()) and base.kind != row.kind
            ):
                row.speedup[base.kind] = base.ms / row.ms
        self.rows.append(row)
        vs = "".join(f", {x:.2f}x vs {k}" for k, x in row.speedup.items())
        tf = f", {row.tflops:.1f} TFLOP/s" if row.tflops is not None else ""
        fl = f", {row.x_floor:.2f}x floor" if row.x_floor is not None else ""
        note = f" ({row.note})" if row.note else ""
        print(f"[{row.suite}] {row.case} {row.pass_} {row.impl}: {row.ms:.3f} ms{tf}{fl}{vs}"
              f"{note}", flush=True)
        self.write()
        return row

    def write(self) -> None:
        if self.out is None:
            return
        self.out.parent.mkdir(parents=True, exist_ok=True)
        payload = {**self.meta, "rows": [r.as_json() for r in self.rows]}
        write_atomic(self.out, json.dumps(payload, indent=2))

    def print_table(self, suite: str, title_note: str = "") -> None:
        from rich.console import Console
        from rich.table import Table

        rows = [r for r in self.rows if r.suite == suite]
        if not rows:
            return
        bases = self.baselines.get(suite, ())
        table = Table(title=f"{self.title}: {suite}{title_note}")
        for name in ("case", "pass", "impl", "ms", "TFLOP/s", "floor ms", "x floor",
                     *(f"vs {b}" for b in bases), "note"):
            table.add_column(name, justify="left" if name in ("case", "pass", "impl", "note")
                             else "right")

        def num(x, fmt):
            return "-" if x is None else format(x, fmt)

        for r in rows:
            table.add_row(
                r.case, r.pass_, r.impl, num(r.ms, ".4g"), num(r.tflops, ".1f"),
                num(r.floor_ms, ".4g"), num(r.x_floor, ".2f"),
                *(num(r.speedup.get(b), ".2f") for b in bases), r.note,
            )
        Console(width=200).print(table)


class Timer:
    """Median time of fn() in ms: triton's do_bench on CUDA, wall-clock medians elsewhere."""

    def __init__(self, device: torch.device, cpu_repeats: int = 3):
        self.device, self.cpu_repeats = device, cpu_repeats

    def __call__(self, fn, grads=()) -> float:
        grads = list(grads)
        if self.device.type == "cuda":
            from triton.testing import do_bench

            return float(do_bench(fn, warmup=25, rep=100, grad_to_none=grads or None,
                                  return_mode="median"))
        times = []
        for i in range(1 + self.cpu_repeats):  # one warm-up call
            for t in grads:
                t.grad = None
            start = time.perf_counter()
            fn()
            if i:
                times.append(1e3 * (time.perf_counter() - start))
        return statistics.median(times)


def free_memory(device: torch.device) -> None:
    """Wait for the device and hand its cached blocks back, so one row's tensors never crowd
    the next row's."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def length_label(n: int) -> str:
    """16384 -> "16K"; lengths that are not whole multiples of 1024 as they are."""
    return f"{n // 1024}K" if n % 1024 == 0 and n >= 1024 else str(n)


def parse_lengths(text: str) -> list[int]:
    """'8k,32k,128k' -> [8192, 32768, 131072] (k = 1024, m = 1024^2; plain numbers too)."""
    out = []
    for part in text.split(","):
        part = part.strip().lower()
        if not part:
            continue
        mult = {"k": 1024, "m": 1024**2}.get(part[-1], 1)
        digits = part[:-1] if mult > 1 else part
        if not digits.isdigit() or int(digits) < 1:
            raise ValueError(f"bad length {part!r}: use e.g. 8k,32k,131072")
        out.append(int(digits) * mult)
    if not out:
        raise ValueError(f"no lengths in {text!r}")
    return out


def parse_suites(spec: str, valid: tuple[str, ...]) -> list[str]:
    """The comma-separated suites of --suite, checked against `valid`."""
    suites = [s.strip() for s in spec.split(",") if s.strip()]
    unknown = sorted(set(suites) - set(valid))
    if unknown or not suites:
        raise ValueError(f"unknown suite(s) {unknown}; choose from {','.join(valid)}")
    return suites


def check_peaks(args) -> None:
    if args.peak_tflops <= 0 or args.peak_tbps <= 0:
        raise ValueError("--peak-tflops and --peak-tbps must be positive")


def device_name(device: torch.device) -> str:
    """The device as the report names it: the GPU's model, or the CPU and its threads."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def bench_device(name: str) -> tuple[torch.device, str]:
    """The device of --device (auto: CUDA when there is one) and its name for the report."""
    device = resolve_device(name)
    return device, device_name(device)


def run_meta(args, device: torch.device, device_name: str, versions: dict, suites: list[str],
             smoke: bool, *, cuda_timing: str) -> dict:
    """The header of a results file: command, device, versions, settings, how rows were timed."""
    meta = {
        "command": getattr(args, "command_line", None) or shlex.join(sys.argv),
        "device": device_name, **versions, "smoke_test": smoke,
        "peak_tflops": args.peak_tflops, "peak_tbps": args.peak_tbps, "suites": suites,
        "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "timing": f"triton.testing.do_bench median (warmup 25 ms, rep 100 ms); {cuda_timing}"
                  if device.type == "cuda" else "median wall time of 3 calls after 1 warm-up (CPU)",
    }
    if smoke:
        meta["warning"] = "smoke test: tiny shapes; the times mean nothing"
    return meta


def run_suites(runners: dict[str, Callable[[], None]], recorder: Recorder, title_note: str, *,
               table_prefix: str = "") -> None:
    """Run each suite (in order), print its table, then write the results with the end time."""
    for suite, run_suite in runners.items():
        start = time.perf_counter()
        run_suite()
        print(f"[{suite}] done in {time.perf_counter() - start:.0f} s", flush=True)
        recorder.print_table(table_prefix + suite, title_note)
    recorder.meta["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    recorder.write()
    if recorder.out is not None:
        print(f"results written to {recorder.out}")


def randn(*shape, device, dtype=DTYPE) -> torch.Tensor:
    """Random inputs of a timed op (bf16 unless told)."""
    return torch.randn(*shape, device=device, dtype=dtype)


def leaf(t: torch.Tensor) -> torch.Tensor:
    """A copy of ``t`` that collects its gradient: the inputs of a forward+backward row."""
    return t.detach().clone().requires_grad_()
