"""Benchmark: a 1B-class model through the whole loop, run as a user runs it (issue 11's "done when").

    nice python bench/scale_cli.py               # ~1.1B Llama, two simulated cards, a small job
    python bench/scale_cli.py --size 20m         # the same loop at ~20M parameters: about a minute

The base is bench/scale.py's (its builder, run once: TinyLlama's shape with random weights, bf16
shards under ``--cache-dir``). Then every step is the real command line, each a process of its own,
as tests/test_e2e.py drives it:

1. ``nomoat coordinator start --base-model DIR`` with what an operator on a CPU would pick: a small
   evaluation budget (``--eval-tokens``, ``--eval-dtype bf16``), a fold every two adapters, no
   replicated tasks, no dashboard;
2. two outbound volunteers, ``nomoat worker start --simulate-gpu 'RTX 3060:12'`` (a simulated card
   plans as the CUDA card it names and trains on the CPU, in fp32: worker.trainer.compute_dtype);
3. ``nomoat submit --wait`` of a small job: the fewest records of the demo corpus that make
   ``--tasks`` tasks of ``--tokens-per-task`` tokens (two tasks by default: one fold of two);
4. ``nomoat status --json`` and ``nomoat pull --out``; the pulled folder is then loaded with
   transformers, checked to be bf16, and compared with the base tensor by tensor.

Memory: the coordinator holds an fp32 master (4 bytes a parameter) plus what it publishes, and each
worker loads the base in fp32 to train on the CPU; at 1.1B that is about 7.5 GiB + 2 x 5.5 GiB. The
bench says so before it starts and refuses when the machine has less available (``--force``
starts anyway). Every process is stopped on the way out, Ctrl-C included.

Readable progress goes to stderr; the last line of stdout is JSON: the wall seconds of each phase,
the versions made and their held-out loss, the pulled folder's dtype and bytes, the peak RSS of the
coordinator and of each worker (the main process's VmHWM, and the most its whole process tree held
at once, sampled every second), and the machine's load average.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere
sys.path.insert(0, str(ROOT / "bench"))

import scale  # noqa: E402  (bench/scale.py: the base model's builder)
from tests.procs import Proc, descendants, free_port, kill_leftovers, outbound_worker, run  # noqa: E402

GiB = 1 << 30

# LlamaConfig sizes (bench/scale.py's flags), by name.
SIZES = {
    "1.1b": dict(hidden=2048, intermediate=5632, layers=22, heads=32, kv_heads=4, vocab=32000, shard_size="500MB"),
    "20m": dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=32000, shard_size="20MB"),
}
CARD = "RTX 3060:12"  # plans 1.1B at seq_len 64 in ~4 GB: room to spare


class BenchFailed(RuntimeError):
    """A step failed; the message says which, with the tail of the log that shows why."""


def log(*parts: object) -> None:
    print(f"[{time.strftime('%H:%M:%S')}]", *parts, file=sys.stderr, flush=True)


def tail(text: str, lines: int = 25) -> str:
    return "\n".join(text.rstrip().splitlines()[-lines:])


# -- the base and the dataset --------------------------------------------------------------------


def base_model(size: str, cache_dir: Path) -> tuple[Path, bool]:
    """bench/scale.py's base for ``size``, built on first use (in its own process); (folder, built)."""
    shape = argparse.Namespace(cache_dir=str(cache_dir), **SIZES[size])
    built = subprocess.run([sys.executable, scale.__file__, "--part", "build", *scale.shape_argv(shape)],
                           capture_output=True, text=True)
    if built.returncode != 0:
        raise BenchFailed(f"building the {size} base model failed:\n{tail(built.stderr)}")
    return scale.model_dir(shape), json.loads(built.stdout.strip().splitlines()[-1])["built"]


def small_dataset(out: Path, tokenizer_dir: Path, tasks: int, tokens_per_task: int) -> dict:
    """The fewest demo records that the coordinator splits into at least ``tasks`` tasks, whichever
    record it holds back for validation (coordinator.schedule.submit counts tokens this way)."""
    from transformers import AutoTokenizer

    from nomoat.tiny import read_demo

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    longest = tokens_per_task // 2  # short records: holding one back cannot cost a task
    chosen, counts = [], []
    for text in read_demo():
        n = len(tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]) + 1
        if n > longest:
            continue
        chosen.append(text)
        counts.append(n)
        # Each task closes at tokens_per_task or more; one record (at most `longest`) is held out.
        if sum(counts) >= tasks * tokens_per_task + longest:
            break
    out.write_text("".join(json.dumps({"text": t}) + "\n" for t in chosen), encoding="utf-8")
    return {"records": len(chosen), "tokens": sum(counts)}


# -- watching process trees ----------------------------------------------------------------------


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        pass
    return 0


@dataclass
class Watched:
    name: str
    proc: Proc
    tree_peak_kib: int = 0  # the most the process and everything below it held at once
    main_hwm_kib: int = 0  # the main process's own VmHWM, read before it is stopped

    def sample(self) -> None:
        pids = [self.proc.p.pid, *descendants(self.proc.p.pid)]
        self.tree_peak_kib = max(self.tree_peak_kib, sum(_status_kib(p, "VmRSS") for p in pids))
        self.main_hwm_kib = max(self.main_hwm_kib, _status_kib(self.proc.p.pid, "VmHWM"))


@dataclass
class Watch:
    """Samples the RSS of every watched tree and the load average, once a second, in a thread."""

    watched: list[Watched] = field(default_factory=list)
    load_peak: float = 0.0
    _stop: threading.Event = field(default_factory=threading.Event)

    def add(self, name: str, proc: Proc) -> Watched:
        self.watched.append(Watched(name, proc))
        return self.watched[-1]

    def start(self) -> None:
        threading.Thread(target=self._loop, name="watch", daemon=True).start()

    def _loop(self) -> None:
        while not self._stop.wait(1.0):
            self.sample()

    def sample(self) -> None:
        self.load_peak = max(self.load_peak, os.getloadavg()[0])
        for w in list(self.watched):
            if w.proc.p.poll() is None:
                w.sample()

    def stop(self) -> None:
        self._stop.set()

    def dead(self) -> Watched | None:
        return next((w for w in self.watched if w.proc.p.poll() is not None), None)


def died(w: Watched) -> BenchFailed:
    return BenchFailed(f"the {w.name} exited (code {w.proc.p.returncode}); the end of {w.proc.log}:\n"
                       f"{tail(w.proc.output())}")


def started(w: Watched, text: str, timeout: float) -> None:
    try:
        w.proc.wait_for(text, timeout)
    except AssertionError:
        if w.proc.p.poll() is not None:
            raise died(w) from None
        raise BenchFailed(f"the {w.name} did not print {text!r} within {timeout:.0f} s; the end of "
                          f"{w.proc.log}:\n{tail(w.proc.output())}") from None


def command(args: list[str], env: dict[str, str], timeout: float) -> str:
    """Run a nomoat command to its end; its stdout, or BenchFailed with what it said."""
    try:
        done = run(args, env, timeout)
    except subprocess.TimeoutExpired:
        raise BenchFailed(f"`nomoat {' '.join(args[:2])}` did not finish within {timeout:.0f} s") from None
    if done.returncode != 0:
        raise BenchFailed(f"`nomoat {' '.join(args[:2])}` failed (code {done.returncode}):\n"
                          f"{tail(done.stdout + done.stderr)}")
    return done.stdout


# -- the loop -------------------------------------------------------------------------------------


def follow_job(submit: subprocess.Popen, submit_log: Path, watch: Watch, timeout: float) -> None:
    """Wait for ``submit --wait`` to end, saying how it goes every 30 s; fail at once if a process dies."""
    begun = time.monotonic()
    said = begun
    while submit.poll() is None:
        if (gone := watch.dead()) is not None:
            raise died(gone)
        now = time.monotonic()
        if now - begun > timeout:
            raise BenchFailed(f"the job did not finish within {timeout:.0f} s; the end of {submit_log}:\n"
                              f"{tail(submit_log.read_text(errors='replace'))}")
        if now - said >= 30:
            said = now
            last = submit_log.read_text(errors="replace").replace("\r", "\n").strip().splitlines()[-1:]
            log(f"  job running for {now - begun:.0f} s, load {os.getloadavg()[0]:.1f}:", *last)
        time.sleep(1.0)
    if submit.returncode != 0:
        raise BenchFailed(f"`nomoat submit --wait` failed (code {submit.returncode}):\n"
                          f"{tail(submit_log.read_text(errors='replace'))}")


def check_pulled(pulled: Path, base: Path) -> dict:
    """Load the pulled folder with transformers: its dtype, and how it differs from the base (read
    one tensor at a time, so the check costs one model in memory)."""
    import torch
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(pulled, dtype="auto")
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters()})
    state = model.state_dict()
    changed, largest = 0, 0.0
    for shard in sorted(base.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as f:
            for name in f.keys():
                if name not in state:
                    continue
                diff = (state[name].float() - f.get_tensor(name).float()).abs().max().item()
                changed += diff > 0
                largest = max(largest, diff)
    del model, state
    return {"pulled_dtype": dtypes[0] if len(dtypes) == 1 else ",".join(dtypes),
            "pulled_bytes": sum(p.stat().st_size for p in pulled.rglob("*") if p.is_file()),
            "tensors_changed": int(changed), "largest_change": largest,
            "differs_from_base": changed > 0, "torch_threads": torch.get_num_threads()}


def memory_needed(params: int, workers: int) -> float:
    """GiB the loop holds at its peak: the coordinator's fp32 master and what it publishes (bench/scale.py
    measured 6P + 1 GiB as the bound), and each worker's fp32 copy of the base plus torch."""
    return (6 * params + GiB + workers * (4 * params + GiB)) / GiB


def available_gib() -> float:
    return _meminfo_kib("MemAvailable") / (1 << 20)


def _meminfo_kib(key: str) -> int:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def n_params(base: Path) -> int:
    from transformers import AutoConfig

    from nomoat.memory import ModelShape

    return ModelShape.from_config(AutoConfig.from_pretrained(base)).n_params


def the_loop(args: argparse.Namespace, base: Path, work: Path, watch: Watch, procs: list[Proc]) -> dict:
    figures: dict = {}
    data_dir, address = work / "coordinator", f"127.0.0.1:{free_port()}"
    dataset = work / "job.jsonl"
    figures["dataset"] = small_dataset(dataset, base, args.tasks, args.tokens_per_task)

    t0 = time.monotonic()
    coordinator = Proc(["coordinator", "start", "--data-dir", str(data_dir), "--listen", address,
                        "--base-model", str(base), "--device", "cpu", "--fold-every", "2",
                        "--tokens-per-task", str(args.tokens_per_task), "--eval-tokens", str(args.eval_tokens),
                        "--eval-dtype", "bf16", "--replicate-fraction", "0", "--http", "off"],
                       work / "coordinator.log")
    procs.append(coordinator)
    coord = watch.add("coordinator", coordinator)
    log(f"coordinator starting on {address} (log: {coordinator.log})")
    started(coord, "volunteers join with", args.start_timeout)
    figures["coordinator_start_seconds"] = round(time.monotonic() - t0, 1)
    log(f"coordinator ready in {figures['coordinator_start_seconds']} s")

    workers = []
    t0 = time.monotonic()
    for i in range(args.workers):
        proc = outbound_worker(address, data_dir, work, f"volunteer-{i}", card=args.card)
        procs.append(proc)
        workers.append(watch.add(f"worker volunteer-{i}", proc))
    for w in workers:
        started(w, "joined", args.start_timeout)
    figures["workers_join_seconds"] = round(time.monotonic() - t0, 1)
    log(f"{args.workers} workers joined ({args.card}) in {figures['workers_join_seconds']} s")

    env = {"NOMOAT_COORDINATOR": address, "NOMOAT_TOKEN": (data_dir / "admin.token").read_text().strip()}
    t0 = time.monotonic()
    submit_log = work / "submit.log"
    with open(submit_log, "wb") as out:
        submit = subprocess.Popen([sys.executable, "-m", "nomoat.cli", "submit", str(dataset), "--name", "scale-cli",
                                   "--wait", "--seq-len", str(args.seq_len), "--batch-size", str(args.batch_size),
                                   "--tokens-per-task", str(args.tokens_per_task)],
                                  stdout=out, stderr=subprocess.STDOUT, env={**os.environ, **env})
    log(f"job submitted: {figures['dataset']['records']} records, {figures['dataset']['tokens']} tokens, "
        f"seq_len {args.seq_len}, {args.tokens_per_task} tokens a task")
    try:
        follow_job(submit, submit_log, watch, args.job_timeout)
    finally:
        if submit.poll() is None:
            submit.kill()
            submit.wait()
    figures["job_seconds"] = round(time.monotonic() - t0, 1)
    log(f"job done in {figures['job_seconds']} s")

    status = json.loads(command(["status", "--json"], env, timeout=120))
    (job,) = status["jobs"]
    figures["tasks"] = job.get("totalTasks", 0)
    figures["adapters_folded"] = job.get("adaptersFolded", 0)
    versions = status.get("versions", [])
    figures["versions"] = [v.get("version", 0) for v in versions]
    # Version 0 is not evaluated as a version (proto3 JSON writes its NaN as "NaN"); the job's
    # base_loss is its held-out loss on the same tokens, what the first fold was compared with.
    figures["eval_loss_by_version"] = {str(v.get("version", 0)): _number(v.get("evalLoss")) for v in versions}
    figures["job_base_loss"] = _number(job.get("baseLoss"))
    log(f"{figures['tasks']} tasks, {figures['adapters_folded']} adapters folded; held-out loss "
        f"{figures['job_base_loss']} before, by version:", figures["eval_loss_by_version"])

    t0 = time.monotonic()
    pulled = work / "pulled"
    command(["pull", "--out", str(pulled)], env, timeout=args.job_timeout)
    figures["pull_seconds"] = round(time.monotonic() - t0, 1)
    log(f"pulled the newest version to {pulled} in {figures['pull_seconds']} s")

    watch.sample()  # the last look before the processes go
    for w in watch.watched:
        figures.setdefault("peak_rss_gib", {})[w.name] = {
            "main_vmhwm": round(w.main_hwm_kib / (1 << 20), 2), "tree_sampled": round(w.tree_peak_kib / (1 << 20), 2)}
    return figures


def _number(value: object) -> float | None:
    """A loss from proto3 JSON: a number, or None for the "NaN" it writes for none."""
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return None
    return number if number == number else None


def stop(procs: list[Proc], data_dir: Path) -> None:
    """Ctrl-C every process as a user would (their whole group if they linger): the workers all at
    once (each finishes its long-poll first), then the coordinator."""
    def interrupt(proc: Proc) -> None:
        t0 = time.monotonic()
        code = proc.interrupt(timeout=60)
        log(f"  stopped `nomoat {' '.join(proc.args[:2])}` in {time.monotonic() - t0:.1f} s (exit code {code})")

    workers = [threading.Thread(target=interrupt, args=(p,)) for p in procs if p.args[0] == "worker"]
    for t in workers:
        t.start()
    for t in workers:
        t.join()
    for proc in procs:
        if proc.args[0] != "worker":
            interrupt(proc)
    kill_leftovers(data_dir)  # a redis-server a killed coordinator left behind


def _interrupted(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1.1b", help="the base model's size")
    parser.add_argument("--cache-dir", default="/tmp/nomoat-scale", help="where the base is built, once")
    parser.add_argument("--work", default=None, help="scratch dir (default: a fresh one, removed after)")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--card", default=CARD, help="each worker's --simulate-gpu")
    parser.add_argument("--tasks", type=int, default=2, help="tasks the job makes at least (a fold is 2)")
    parser.add_argument("--tokens-per-task", type=int, default=256)
    parser.add_argument("--seq-len", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=4, help="the job's batch (each task trains at half)")
    parser.add_argument("--eval-tokens", type=int, default=256, help="the coordinator's evaluation budget")
    parser.add_argument("--start-timeout", type=float, default=1800.0, help="seconds a process may take to start")
    parser.add_argument("--job-timeout", type=float, default=4 * 3600.0, help="seconds the job (and the pull) may take")
    parser.add_argument("--force", action="store_true", help="start even when the memory looks too short")
    args = parser.parse_args(argv)

    # The children are this checkout's nomoat (python -m nomoat.cli), not whatever is installed.
    os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # idle OpenMP threads sleep on a shared CPU
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`&`)
    signal.signal(signal.SIGTERM, _interrupted)  # a `kill` cleans up as Ctrl-C does

    t_start = time.monotonic()
    load_before = os.getloadavg()
    result: dict = {"size": args.size, "load_average_before": [round(x, 2) for x in load_before]}
    procs: list[Proc] = []
    watch = Watch()
    work = Path(args.work or tempfile.mkdtemp(prefix="nomoat-scale-cli-"))
    work.mkdir(parents=True, exist_ok=True)
    keep = bool(args.work)  # a failed run keeps its logs too
    try:
        t0 = time.monotonic()
        base, built = base_model(args.size, Path(args.cache_dir))
        result["base_seconds"] = round(time.monotonic() - t0, 1)
        params = n_params(base)
        result["params"] = params
        log(f"base model: {base} ({params / 1e6:.0f}M parameters, {'built' if built else 'reused'})")
        need, have = memory_needed(params, args.workers), available_gib()
        result["memory_estimate_gib"], result["memory_available_gib"] = round(need, 1), round(have, 1)
        log(f"memory: the loop needs about {need:.1f} GiB (coordinator 6P + 1 GiB, each worker 4P + 1 GiB: "
            f"fp32 on the CPU); {have:.1f} GiB is available")
        if need > have and not args.force:
            raise BenchFailed(f"the loop needs about {need:.1f} GiB but only {have:.1f} GiB is available; "
                              "stop something, or pass --force to start anyway")
        watch.start()
        result.update(the_loop(args, base, work, watch, procs))
        watch.stop()
        t0 = time.monotonic()
        stop(procs, work / "coordinator")
        procs.clear()
        result["stop_seconds"] = round(time.monotonic() - t0, 1)
        t0 = time.monotonic()
        result.update(check_pulled(work / "pulled", base))
        result["check_seconds"] = round(time.monotonic() - t0, 1)
        log(f"pulled folder: {result['pulled_dtype']}, {result['pulled_bytes'] / 1e6:.1f} MB, "
            f"{result['tensors_changed']} tensors differ from the base (largest change {result['largest_change']:.3g})")
        if result["pulled_dtype"] != "bfloat16" or not result["differs_from_base"]:
            raise BenchFailed("the pulled folder is not a bf16 model that differs from the base: " + json.dumps(
                {k: result[k] for k in ("pulled_dtype", "tensors_changed")}))
    except BenchFailed as exc:
        keep = True
        log(f"scale_cli failed: {exc}")
        log(f"every process's log is kept in {work}")
        return 1
    except KeyboardInterrupt:
        log("interrupted; stopping every process")
        return 130
    finally:
        watch.stop()
        if procs:
            stop(procs, work / "coordinator")
        if not keep:
            shutil.rmtree(work, ignore_errors=True)
    result["load_average_peak"] = round(max(watch.load_peak, os.getloadavg()[0]), 2)
    result["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    result["cpu_cores"] = os.cpu_count()
    result["total_seconds"] = round(time.monotonic() - t_start, 1)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
