"""A fuzzing campaign: a supervisor process and one worker process that runs the targets.

The worker loops: pick a target and a corpus entry, mutate it, write the input, reset the kernel's
peak-RSS counter (``/proc/self/clear_refs``), run the target, then record the outcome, the time and
the input's peak memory (``VmHWM`` minus the RSS before the input). It reports counts to the
supervisor every few hundred inputs as one JSON line on stdout. Inputs that end in a new kind of
error (message with digits removed) join the corpus, a crude substitute for coverage feedback.

The supervisor restarts the worker after a crash (the input being run is kept under
``out/crashes``), kills it when it stops reporting for ``hang_seconds`` (``out/hangs``), and
collects every finding: an exception that is not the project's, an input taking more than
``slow_seconds`` of CPU time or one whose peak memory exceeds ``10 x input size + 200 MB``
(``out/foreign``, ``out/slow``, ``out/memory``). Time is the worker's CPU time, since on a shared
machine the clock also counts waiting for a core; inputs slow only by the clock are kept under
``out/slow_wall`` so that :func:`retime` can run them again. The worker runs under an address-space limit so a
memory blow-up cannot take the machine down (it then shows up as a MemoryError finding).

Usage from Python: ``summary = run_campaign(seeds, out_dir, executions=..., seconds=...)``.
"""
from __future__ import annotations

import json
import os
import random
import re
import resource
import select
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings

MEMORY_FACTOR, MEMORY_EXTRA = 10, 200 << 20
ADDRESS_SPACE_LIMIT = 8 << 30  # the worker's RLIMIT_AS (numpy + OpenBLAS reserve ~1-2 GB of address space)
REPORT_EVERY = 200


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _hwm_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return 0


def _reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _signature(exc: BaseException) -> str:
    text = f"{type(exc).__name__}:{exc}"
    text = re.sub(r"/\S+", "<path>", text)
    return re.sub(r"\d+", "N", text)[:120]


def _save(out_dir: str, kind: str, path: str, note: dict) -> None:
    folder = os.path.join(out_dir, kind)
    os.makedirs(folder, exist_ok=True)
    index = len(os.listdir(folder)) // 2
    if index >= 50:  # enough examples of one kind
        return
    dest = os.path.join(folder, f"{index:03d}{os.path.splitext(path)[1]}")
    if os.path.isdir(path):
        shutil.copytree(path, dest, dirs_exist_ok=True)
    elif os.path.exists(path):
        shutil.copyfile(path, dest)
    with open(os.path.join(folder, f"{index:03d}.json"), "w") as f:
        json.dump(note, f, indent=1)


def _write_link(folder: str, target: str, path: str) -> str:
    """A fresh symlink in ``folder`` whose text is ``target\npath`` (renamed over the campaign's
    ``current`` link: one atomic, metadata-only write per change of input)."""
    link = os.path.join(folder, "current.tmp")
    if os.path.lexists(link):
        os.unlink(link)
    os.symlink(f"{target}\n{path}", link)
    return link


# ---------------------------------------------------------------------------------------- worker
def worker(seeds: dict, out_dir: str, scratch: str, executions: int, seconds: float, seed: int,
           slow_seconds: float) -> None:
    """Runs up to ``executions`` inputs or ``seconds`` of fuzzing, writing each input under
    ``scratch``; prints JSON progress lines."""
    from .mutate import Mutator
    from .targets import TARGETS, InputWriter, seed_bytes

    if "libasan" not in os.environ.get("LD_PRELOAD", ""):  # AddressSanitizer reserves terabytes of shadow
        resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))
    warnings.simplefilter("ignore")  # Pillow and zipfile warn about every second mutated input
    rng = random.Random(seed)
    mutator = Mutator(rng)
    writer = InputWriter(os.path.join(scratch, "work"))
    corpus = {name: [(p, seed_bytes(TARGETS[name], p)) for p in paths] for name, paths in seeds.items()
              if name in TARGETS}
    pool = [data for entries in corpus.values() for _, data in entries]
    names = sorted(corpus)
    seen: set[str] = set()
    counts = {"executions": 0, "ok": 0, "project_errors": 0, "foreign": 0, "slow": 0, "memory": 0,
              "slow_wall": 0, "max_seconds": 0.0, "max_wall_seconds": 0.0, "max_peak_bytes": 0, "max_peak_ratio": 0.0, "peak_measured": _reset_peak(),
              "mutation_fallbacks": 0, "per_target": {n: 0 for n in names}}
    current, last_path = os.path.join(scratch, "current"), None
    start = last = time.monotonic()
    while counts["executions"] < executions and time.monotonic() - start < seconds:
        name = names[counts["executions"] % len(names)]
        target = TARGETS[name]
        seed_path, data = rng.choice(corpus[name])
        try:
            data = target.mutate(mutator, data, pool)
        except Exception:  # a mutation the structure-aware mutator could not express: plain bytes
            counts["mutation_fallbacks"] += 1
            data = mutator.bytes(data, pool)
        path, size = writer.write(target, seed_path, data, mutator)
        if path != last_path:  # the supervisor keeps this input if the worker dies on it
            os.replace(_write_link(writer.workdir, name, path), current)
            last_path = path
        _reset_peak()
        rss0 = _rss_bytes()
        t0, c0 = time.perf_counter(), time.process_time()
        outcome = None
        try:
            target.run(path, rng)
        except target.errors as exc:
            outcome = exc
        except BaseException as exc:  # noqa: BLE001 - every other exception is a finding
            if isinstance(exc, KeyboardInterrupt):
                raise
            counts["foreign"] += 1
            _save(out_dir, "foreign", path, {"target": name, "error": _signature(exc),
                                             "traceback": traceback.format_exc()[-4000:]})
        wall, dt = time.perf_counter() - t0, time.process_time() - c0
        peak = max(0, _hwm_bytes() - rss0)
        counts["executions"] += 1
        counts["per_target"][name] += 1
        if outcome is None:
            counts["ok"] += 1
        else:
            counts["project_errors"] += 1
            sig = name + ":" + _signature(outcome)
            if sig not in seen and len(seen) < 5000:
                seen.add(sig)
                corpus[name].append((seed_path, data))
        counts["max_seconds"] = max(counts["max_seconds"], dt)
        counts["max_wall_seconds"] = max(counts["max_wall_seconds"], wall)
        counts["max_peak_bytes"] = max(counts["max_peak_bytes"], peak)
        counts["max_peak_ratio"] = max(counts["max_peak_ratio"], peak / (MEMORY_FACTOR * size + MEMORY_EXTRA))
        if dt > slow_seconds:
            counts["slow"] += 1
            _save(out_dir, "slow", path, {"target": name, "cpu_seconds": dt, "wall_seconds": wall})
        elif wall > slow_seconds:  # slow only by the clock: the machine was busy (re-timed by the caller)
            counts["slow_wall"] += 1
            _save(out_dir, "slow_wall", path, {"target": name, "cpu_seconds": dt, "wall_seconds": wall})
        if peak > MEMORY_FACTOR * size + MEMORY_EXTRA:
            counts["memory"] += 1
            _save(out_dir, "memory", path, {"target": name, "peak_bytes": peak, "input_bytes": size})
        now = time.monotonic()
        if counts["executions"] % REPORT_EVERY == 0 or now - last > 5:
            last = now
            counts["distinct_errors"] = len(seen)
            print(json.dumps(counts), flush=True)
    counts["distinct_errors"] = len(seen)
    counts["done"] = True
    print(json.dumps(counts), flush=True)


def retime(out_dir: str, repeats: int = 3) -> list:
    """Runs every input kept under ``out_dir/slow_wall`` again (``repeats`` times each, in this
    process); returns ``[(input, target, best wall seconds)]``."""
    from .targets import TARGETS
    folder = os.path.join(out_dir, "slow_wall")
    results = []
    for note in sorted(n for n in os.listdir(folder) if n.endswith(".json")) if os.path.isdir(folder) else []:
        with open(os.path.join(folder, note)) as f:
            target = TARGETS[json.load(f)["target"]]
        stem = note[:-5]
        path = next(os.path.join(folder, n) for n in sorted(os.listdir(folder)) if n.startswith(stem) and n != note)
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            try:
                target.run(path, random.Random(0))
            except target.errors:
                pass
            best = min(best, time.perf_counter() - t0)
        results.append((path, target.name, best))
    return results


# ---------------------------------------------------------------------------------------- supervisor
def _merge(total: dict, part: dict) -> None:
    for key in ("executions", "ok", "project_errors", "foreign", "slow", "slow_wall", "memory"):
        total[key] += part.get(key, 0)
    for key in ("max_seconds", "max_wall_seconds", "max_peak_bytes", "max_peak_ratio"):
        total[key] = max(total[key], part.get(key, 0))
    total["distinct_errors"] = max(total["distinct_errors"], part.get("distinct_errors", 0))
    if part:
        total["peak_measured"] = total["peak_measured"] and part.get("peak_measured", False)
    for name, n in part.get("per_target", {}).items():
        total["per_target"][name] = total["per_target"].get(name, 0) + n


def run_campaign(seeds: dict, out_dir: str, executions: int = 10 ** 9, seconds: float = 60.0, seed: int = 0,
                 slow_seconds: float = 2.0, hang_seconds: float = 120.0, nice: int = 0, progress=None) -> dict:
    """Fuzzes until ``executions`` inputs or ``seconds`` have passed; returns the summary (also
    written to ``out_dir/summary.json``). ``progress(summary)`` is called after every report."""
    out_dir = os.path.abspath(out_dir)  # the worker runs in its scratch folder
    os.makedirs(out_dir, exist_ok=True)
    seeds_file = os.path.join(out_dir, "seeds.json")
    with open(seeds_file, "w") as f:
        json.dump(seeds, f)
    total = {"executions": 0, "ok": 0, "project_errors": 0, "foreign": 0, "slow": 0, "slow_wall": 0, "memory": 0,
             "crashes": 0, "hangs": 0, "harness_errors": 0, "max_seconds": 0.0, "max_wall_seconds": 0.0, "max_peak_bytes": 0, "max_peak_ratio": 0.0, "distinct_errors": 0,
             "peak_measured": True, "per_target": {}, "restarts": 0}
    deadline = time.monotonic() + seconds
    # inputs are rewritten for every execution: keep them on a RAM disk when there is one
    scratch = tempfile.mkdtemp(prefix="visualad-fuzz-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # tests/
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([here] + [p for p in sys.path if p] + [env.get("PYTHONPATH", "")])
    run = 0
    while total["executions"] < executions and time.monotonic() < deadline:
        left = deadline - time.monotonic()
        cmd = [sys.executable, "-c",
               "import json, sys; from fuzz.campaign import worker; "
               "worker(json.load(open(sys.argv[1])), sys.argv[2], sys.argv[3], int(sys.argv[4]), "
               "float(sys.argv[5]), int(sys.argv[6]), float(sys.argv[7]))",
               seeds_file, out_dir, scratch, str(executions - total["executions"]), str(left),
               str(seed * 1000 + run), str(slow_seconds)]
        with open(os.path.join(out_dir, "worker.stderr"), "a") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, env=env, text=True, cwd=scratch,
                                    preexec_fn=(lambda: os.nice(nice)) if nice else None)
        run += 1
        last_report: dict = {}
        last_time = time.monotonic()
        hung = False
        while True:
            ready, _, _ = select.select([proc.stdout], [], [], 5.0)
            if ready:
                line = proc.stdout.readline()
                if not line:
                    break
                try:
                    last_report = json.loads(line)
                except ValueError:
                    continue
                last_time = time.monotonic()
                if progress:
                    snapshot = json.loads(json.dumps(total))
                    _merge(snapshot, last_report)
                    progress(snapshot)
            elif time.monotonic() - last_time > hang_seconds:
                hung = True
                proc.send_signal(signal.SIGKILL)
                break
        rc = proc.wait()
        _merge(total, last_report)
        current = os.path.join(scratch, "current")
        if hung or rc != 0:
            # a signal (rc < 0) is an interpreter crash; rc > 0 a Python error in the harness itself
            kind = "hangs" if hung else "crashes" if rc < 0 else "harness_errors"
            total[kind] += 1
            total["restarts"] += 1
            try:
                target, path = os.readlink(current).split("\n", 1)
                where = {"target": target, "path": path}
            except (OSError, ValueError):
                where = {"path": ""}
            _save(out_dir, kind, where.get("path", ""), {"returncode": rc, **where})
            # the executions since the last report are lost; count the crashing input itself
            total["executions"] += 1
            if total["harness_errors"] >= 3:
                break
        elif not last_report.get("done"):
            break
    shutil.rmtree(scratch, ignore_errors=True)
    total["seconds"] = seconds - max(0.0, deadline - time.monotonic())
    with open(os.path.join(out_dir, "summary.json"), "w") as f:
        json.dump(total, f, indent=1)
    return total
