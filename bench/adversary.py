"""Benchmark: a real coordinator, honest volunteers, and one hostile volunteer per attack (issue 19).

    nice python bench/adversary.py --quick                      # every attack, small jobs
    python bench/adversary.py --attacks free-rider,copycat      # some of them

Every part is the real thing, as a user runs it (tests/procs.py): ``nomoat coordinator start`` on
its own data dir (embedded Redis, its Ray head), two honest outbound volunteers
``nomoat worker start --simulate-gpu`` training the tiny model for real, each joining with the join
code the coordinator printed (``<data-dir>/join.code``) and so minted a volunteer credential of its
own (kept in its own config dir), and, per attack, a hostile volunteer in this process that speaks
the coordinator's gRPC API with only what a volunteer has (the public join code, the credential it
mints with it, the job ids ``Status`` shows, what it is sent: its runs' specs with their lease
secrets). Each scenario is one job of the same size; the first
is the same job with no attacker (the baseline). Attacks:

* ``hijack``: heartbeat, fetch the shard of leases placed on other workers: task ids guessed as the
  job id plus a counter, fences as small numbers from one counter, its own worker id, no lease
  secret (it never sees another run's spec);
* ``forged-memory``: report every unit of its runs out of memory with a 1000 GB need;
* ``forged-speed``: report and upload with tokens x1000 in a millisecond;
* ``abandon``: take runs and never heartbeat, upload or report;
* ``free-rider``: upload random factors scaled to an honest adapter's norm;
* ``copycat``: one identity trains its task for real, a second (or, when a second cannot join, the
  same one) uploads the same bytes for its own tasks;
* ``scaled-x50``: train the task for real, upload the update x50;
* ``other-data``: train on other text (fortunes the job does not hold) with the task's settings;
* ``submit-flood``: a submitter sending many small jobs;
* ``watch-flood``: a volunteer (minted from the join code) holding many Watch streams and PEFT
  pulls of the whole patch chain that it reads one message of and then holds (a slow reader);
* ``sybil``: mint as many volunteers as it can with the public join code (then: can a newcomer
  still join? refused only for this address's limit counts as held: one from elsewhere would join).
  Last: it spends the loopback address's joins, which every other attacker needs.

The three floods run in processes of their own (bench/floods.py), so that a flood does not starve
this process, which measures. A hostile volunteer's training runs in a process of its own at a
lower priority (its own card, in truth; here the honest volunteers' CPU). Floods are judged by what they aim at: an honest
volunteer's call refused (its log), or its throughput below both 0.9 and the noise floor of the
attack-free runs (``--baselines`` of them, spread over the run, after a warm-up job that earns the
honest volunteers their way out of probation).

Per attack: ``succeeded`` (the attack did what it wanted: its adapter folded, a lease used, the
limit not held, ...), ``detail``, the honest volunteers' throughput (tokens of their accepted
adapters per second of the job) against the baseline, and their adapters refused. An attack is
written to report success wherever the defence is missing. Last line JSON: ``attacks_tried``,
``attacks_succeeded``, ``honest_throughput_ratio`` (the worst attack's), ``honest_refused_share``
and one entry per attack. Targets (issue 19): no attack succeeds, the ratio at least 0.9, honest
refusals at most 1 %.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import math
import multiprocessing
import os
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch

from nomoat import adapter as fmt
from nomoat.card import to_message
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.spec import UnitResult
from nomoat.tiny import read_fortunes
from nomoat.v1 import nomoat_pb2 as pb
from tests import procs
from tests.test_faults import dataset
from worker.cache import ModelCache
from worker.outbound import parse_specs
from worker.probe import parse_simulated
from worker.uploader import manifest_for

CARD = "RTX 3060:12:13"
HONEST = ("honest-a", "honest-b")


@dataclass
class Ctx:
    """The running coordinator, its honest volunteers, and what the attacks share."""

    args: argparse.Namespace
    tmp: Path
    cluster_dir: Path
    address: str
    coordinator: procs.Proc
    workers: dict[str, procs.Proc] = field(default_factory=dict)
    ledger: object = None
    seed: int = 0

    def token(self, role: str) -> str:
        return (self.cluster_dir / f"{role}.token").read_text().strip()

    def client(self, role: str = "admin", token: str | None = None) -> CoordinatorClient:
        return CoordinatorClient(self.address, token or self.token(role))

    def new_token(self, role: str, name: str) -> str:
        with self.client("admin") as admin:
            return admin.create_token(role, name).token

    def join_code(self) -> str:
        """The join code the coordinator printed once and keeps in its data dir: what the public has."""
        return (self.cluster_dir / "join.code").read_text().strip()


class JobRef:
    """The scenario's job id, set once it is submitted: an attacker registers before the job exists
    (as a volunteer already running would), then waits for it."""

    def __init__(self) -> None:
        self._id, self._set = "", threading.Event()
        self.ready = threading.Event()  # set by an attack that prepares (trains) before the job exists

    def set(self, job_id: str) -> None:
        self._id = job_id
        self._set.set()

    def get(self) -> str:
        self._set.wait()
        return self._id


class Hostile:
    """A volunteer's worker, driven by hand: everything it does is a call any worker may make."""

    def __init__(self, ctx: Ctx, name: str) -> None:
        """Joins as any volunteer does: registers with the public join code, which mints a
        credential of its own that it uses from then on."""
        self.ctx, self.name = ctx, name
        self.client = CoordinatorClient(ctx.address, ctx.join_code())
        reply = self.client.register(name, to_message(parse_simulated(CARD)))
        if reply.credential:
            self.client.token = reply.credential
        self.worker_id, self.lineage = reply.worker_id, reply.lineage
        self.uploaded: list[str] = []  # adapter ids the coordinator accepted from it
        self.units = 0  # units placed on it
        self.refusals: list[str] = []  # why its uploads were refused

    def take(self, stop: threading.Event, wait_s: float = 2.0):
        """The next run placed on it: (run id, its unit specs), or ("", [])."""
        try:
            reply = self.client.request_work(self.worker_id, wait_s, stop=stop)
        except NomoatError:
            return "", []
        specs = parse_specs(list(reply.task_specs)) if reply.run_id else []
        self.units += len(specs)
        for spec in specs:  # claim each unit (its base version) and keep its lease while it works
            threading.Thread(target=self._keep, args=(spec, stop), daemon=True).start()
        return reply.run_id, specs

    def _keep(self, spec, stop: threading.Event, every_s: float = 5.0) -> None:
        while not stop.is_set():
            try:
                if not self.client.heartbeat(spec.task_id, spec.fence, self.worker_id,
                                             secret=spec.lease_secret).ok:
                    return
            except NomoatError:
                return
            stop.wait(every_s)

    def shard(self, spec) -> list[str]:
        return [json.loads(line)["text"] for line in self.client.fetch_shard(spec.task_id, spec.fence, self.worker_id,
                                                                             spec.lease_secret).splitlines()]

    def upload(self, spec, adapter: fmt.Adapter, tokens: int | None = None) -> pb.UploadReply:
        data = fmt.to_bytes(adapter)
        manifest = manifest_for(spec.task_id, spec.fence, spec.base_version, adapter.rank, adapter.alpha,
                                tokens if tokens is not None else spec.tokens, 2.0, data, self.worker_id, self.lineage,
                                lease_secret=spec.lease_secret)
        try:
            reply = self.client.upload(manifest, data)
        except NomoatError as exc:
            reply = pb.UploadReply(accepted=False, reason=str(exc).splitlines()[0])
        if reply.accepted:
            self.uploaded.append(reply.adapter_id)
        else:
            self.refusals.append(reply.reason)
        return reply

    def train_at(self, version: int, texts: list[str], seed: int = 0) -> fmt.Adapter:
        """A real adapter on ``texts`` from ``version``, at the job defaults' settings as a task of
        a fold of 4 trains them (what it expects its units to ask for), before any unit arrives."""
        from coordinator.settings import JobDefaults
        from worker.trainer import LoraSpec, TrainSpec

        job = JobDefaults()
        folder = ModelCache(self.ctx.tmp / f"cache-{self.name}").ensure(self.client, self.lineage, version)
        return trained(folder, texts, LoraSpec(job.lora_rank, job.lora_alpha, job.target_modules),
                       TrainSpec(seq_len=job.seq_len, batch_size=2, micro_batch=2,
                                 learning_rate=2 * job.learning_rate, seed=seed))

    def said(self) -> str:
        """What happened to its units, for a detail line."""
        why = f"; refused: {self.refusals[0][:120]}" if self.refusals else ""
        return f"{self.units} units placed on it, {len(self.uploaded)} uploads accepted{why}"

    def report(self, run_id: str, units: list[UnitResult], specs=()) -> None:
        try:
            self.client.report_run(self.worker_id, run_id, [json.dumps(u.to_dict()) for u in units], [],
                                   {s.task_id: s.lease_secret for s in specs})
        except NomoatError:
            pass

    def train(self, spec, texts: list[str], seed: int = 0) -> fmt.Adapter:
        """A real adapter on ``texts``, from the task's base version, with the task's settings."""
        from worker.trainer import LoraSpec, TrainSpec

        folder = ModelCache(self.ctx.tmp / f"cache-{self.name}").ensure(self.client, self.lineage, spec.base_version)
        lora = LoraSpec(spec.lora.rank, spec.lora.alpha, tuple(spec.lora.target_modules))
        train = TrainSpec(seq_len=spec.train.seq_len, batch_size=spec.train.batch_size,
                          micro_batch=spec.train.batch_size, learning_rate=spec.train.learning_rate, seed=seed)
        return trained(folder, texts, lora, train)


_TRAINERS: concurrent.futures.ProcessPoolExecutor | None = None


def trained(folder: Path, texts: list[str], lora, train) -> fmt.Adapter:
    """A real adapter, trained in a process of its own at a lower priority (nice +5). A hostile
    volunteer trains on its own card; here its card is the honest volunteers' CPU: at their
    priority it would slow them by what a third trainer on two cores costs, not by anything the
    attack does (at the lowest it was so slow on a loaded machine that a lease it held stalled the
    job's tail), and in a thread of this process it would hold the interpreter's lock from the
    process that measures."""
    global _TRAINERS
    if _TRAINERS is None:
        _TRAINERS = concurrent.futures.ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn"),
                                                          initializer=os.nice, initargs=(5,))
    return fmt.from_bytes(_TRAINERS.submit(_train_bytes, str(folder), texts, lora, train).result())


def _train_bytes(folder: str, texts: list[str], lora, train) -> bytes:
    from worker.trainer import train_adapter

    torch.set_num_threads(1)
    return fmt.to_bytes(train_adapter(Path(folder), texts, lora, train)[0])


class Flood:
    """A flood (bench/floods.py) in a process of its own, so that it cannot starve this one, which
    measures the honest volunteers. ``result()`` stops it and reads what it got through, with the
    CPU seconds the flood's own client spent."""

    def __init__(self, ctx: Ctx, kind: str, token: str, *args: str) -> None:
        self.log = ctx.tmp / f"flood-{kind}.log"
        self._cpu0 = _children_cpu()
        with open(self.log, "wb") as err:
            self.p = subprocess.Popen([sys.executable, str(ROOT / "bench" / "floods.py"), kind, "--address",
                                       ctx.address, *args], stdout=subprocess.PIPE, stderr=err,
                                      env={**os.environ, "NOMOAT_TOKEN": token, "PYTHONPATH": str(ROOT)}, text=True)

    def result(self) -> dict:
        if self.p.poll() is None:
            self.p.terminate()
        try:
            out, _ = self.p.communicate(timeout=90)
        except subprocess.TimeoutExpired:
            self.p.kill()
            out, _ = self.p.communicate()
        lines = [line for line in (out or "").splitlines() if line.startswith("{")]
        got = json.loads(lines[-1]) if lines else {"broke": self.log.read_text(errors="replace")[-300:]}
        got["client_cpu_s"] = round(_children_cpu() - self._cpu0, 1)
        return got


def _children_cpu() -> float:
    """CPU seconds of this process's children that have ended (a flood's, once it is waited for)."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def random_like(adapter: fmt.Adapter, seed: int) -> fmt.Adapter:
    from coordinator.fold.folding import delta_norm

    g = torch.Generator().manual_seed(seed)
    factors = {m: (torch.randn(a.shape, generator=g), torch.randn(b.shape, generator=g))
               for m, (a, b) in adapter.factors.items()}
    ratio = math.sqrt(delta_norm(adapter) / delta_norm(fmt.Adapter(factors, adapter.rank, adapter.alpha)))
    return fmt.Adapter({m: (a * ratio, b * ratio) for m, (a, b) in factors.items()}, adapter.rank, adapter.alpha)


OTHER_TEXT = [f"{t}" for t in read_fortunes()[4000:4012]]  # text the job does not hold (about a task's tokens)


def folded(ctx: Ctx, adapter_ids: list[str]) -> int:
    return sum(1 for i in adapter_ids if (a := ctx.ledger.adapters.get(i)) and a.state.value == "folded")


def fates(ctx: Ctx, adapter_ids: list[str]) -> str:
    """What became of adapters: their states, and the checks that refused them (the reasons' starts)."""
    records = [a for i in adapter_ids if (a := ctx.ledger.adapters.get(i))]
    states = Counter(a.state.value for a in records)
    reasons = Counter(re.sub(r"[0-9.]+", "#", a.reason)[:60] for a in records if a.reason)
    return f"states {dict(states)}, reasons {dict(reasons.most_common(3))}"


def each_run(h: Hostile, stop: threading.Event, body: Callable) -> None:
    """Take runs until stopped, calling ``body(run_id, specs)`` on each."""
    while not stop.is_set():
        run_id, specs = h.take(stop)
        if run_id:
            body(run_id, specs)


# -- the attacks: each fills ``out`` with succeeded (bool) and detail (a sentence) -------------------


def hijack(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    """It never asks for work, so no lease is ever placed on it: any lease call it gets through is
    another worker's lease. Task ids: guessed as the job id plus a counter (the old scheme), and
    any it can read in what a volunteer sees (``Status``: the job's events, which name tasks);
    worker ids: its own and every one ``Status`` lists; fences 1..max_fence; never a secret."""
    h = Hostile(ctx, "hijacker")
    job_id = job.get()
    tried: set[tuple[str, str]] = set()  # (task, worker id claimed)
    used: set[str] = set()
    seen: set[str] = set()  # task ids read in Status
    leaked = 0
    while not stop.wait(1.0):
        status = h.client.status()
        mine = [j for j in status.jobs if j.job_id == job_id]
        total = mine[0].total_tasks if mine else 0
        seen |= {m for j in mine for e in j.events for m in re.findall(re.escape(job_id) + r"-t[0-9a-f]{8}", e)}
        workers = [h.worker_id, *(w.worker_id for w in status.workers if w.worker_id != h.worker_id)]
        guessed = [f"{job_id}-t{i:03d}" for i in range(total)]
        for task_id, claims in [*((t, workers) for t in sorted(seen)), *((t, workers[:1]) for t in guessed)]:
            for worker_id in claims:
                if stop.is_set() or task_id in used or (task_id, worker_id) in tried:
                    continue
                tried.add((task_id, worker_id))
                for fence in range(1, ctx.args.max_fence):
                    try:
                        if h.client.heartbeat(task_id, fence, worker_id).ok:
                            used.add(task_id)
                            break
                    except NomoatError:
                        pass
                for fence in range(1, 6):  # a shard fetch without the lease's secret, at the likeliest fences
                    try:
                        leaked += bool(h.client.fetch_shard(task_id, fence, worker_id))
                    except NomoatError:
                        pass
    out["succeeded"] = bool(used or leaked)
    out["detail"] = (f"heartbeats accepted on {len(used)} leases placed on other workers, {leaked} shards fetched "
                     f"({len(seen)} task ids read in Status, the rest guessed as job id + counter; claimed as its own "
                     f"worker and as each worker Status lists; fences 1..{ctx.args.max_fence - 1}; no lease secret)")


def forged_memory(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    h = Hostile(ctx, "forger-memory")
    each_run(h, stop, lambda run, specs: h.report(run, [UnitResult(s.task_id, s.fence, "CUDA out of memory",
                                                                   needs_vram_gb=1000.0) for s in specs], specs))
    tasks = ctx.ledger.tasks.of_job(job.get())
    raised = [t.task_id for t in tasks if t.min_vram_gb > 24]  # above any card in the run
    floors = [t for t in tasks if t.min_vram_gb >= 12]  # at the honest cards' memory (12 GB)
    state = (record.state.value if (record := ctx.ledger.jobs.get(job.get())) else "?")
    # it worked if a floor is above any card, or floors at the honest cards' size left the job unfinished
    out["succeeded"] = bool(raised) or (bool(floors) and state != "done")
    out["detail"] = (f"{len(raised)} tasks now need more than any card (24 GB), {len(floors)} at least the "
                     f"honest cards' 12 GB; job {state}; {h.said()}")


def forged_speed(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    """It trains every unit for real (at its own, honest, speed) and reports a thousand times the
    tokens in a millisecond, as report and as manifest. What it aims at: runs sized for the speed
    it claims. Judged against its real speed, as its own clock measures it (a run taken to the
    last upload accepted)."""
    from coordinator.schedule.scheduler import units_for
    from coordinator.settings import Settings

    h = Hostile(ctx, "forger-speed")
    sizes: list[int] = []
    tokens, seconds = [0], [0.0]

    def body(run_id: str, specs) -> None:
        began = time.monotonic()
        sizes.append(len(specs))
        units = []
        for s in specs:
            reply = h.upload(s, h.train(s, h.shard(s), seed=s.train.seed), tokens=s.tokens * 1000)
            tokens[0] += s.tokens if reply.accepted else 0
            units.append(UnitResult(s.task_id, s.fence, "" if reply.accepted else reply.reason,
                                    adapter_id=reply.adapter_id, tokens=s.tokens * 1000, seconds=0.001))
        seconds[0] += time.monotonic() - began
        h.report(run_id, units, specs)

    each_run(h, stop, body)
    real = tokens[0] / max(seconds[0], 1e-9)
    record = ctx.ledger.workers.get(h.worker_id)
    planned = record.tokens_per_s if record else 0.0
    settings = Settings(data_dir=ctx.cluster_dir)  # the coordinator's defaults (the bench sets neither)
    unit_tokens = ctx.args.tokens_per_task
    earned = units_for(3 * real, unit_tokens, settings.target_task_seconds, settings.max_units_per_run)
    # It worked if the scheduler plans with more than its real speed (3x: the coordinator's clock
    # includes the upload), or any run was bigger than three times its real speed earns.
    out["succeeded"] = planned > 3 * max(real, 1e-9) or max(sizes, default=0) > earned
    out["detail"] = (f"claimed {1000 * unit_tokens / 0.001:.3g} tokens/s; really {real:.0f} tokens/s by its own clock; "
                     f"the scheduler plans with {planned:.0f} tokens/s; its runs: {len(sizes)}, units per run "
                     f"{sizes[:12]} (3x its real speed earns at most {earned}); {h.said()}")


def abandon(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    h = Hostile(ctx, "abandoner")
    taken = [0]
    each_run(h, stop, lambda run, specs: taken.__setitem__(0, taken[0] + len(specs)))
    tasks = ctx.ledger.tasks.of_job(job.get())
    failed = [t for t in tasks if t.state.value == "failed"]
    with ctx.client("admin") as admin:
        stats = admin.worker_stats(h.worker_id)
    # still in good standing: its abandoned leases cost it nothing (not throttled or excluded)
    still_trusted = stats.trust not in ("throttled", "excluded") and not stats.trust_reason.startswith("banned")
    out["succeeded"] = bool(failed) or (taken[0] >= 3 and still_trusted)
    out["detail"] = (f"abandoned {taken[0]} leases; {len(failed)} tasks failed; its standing afterwards: "
                     f"{stats.trust or 'trusted'} ({stats.trust_reason[:80]})")


def uploads_then_judge(ctx: Ctx, h: Hostile, stop: threading.Event, out: dict, make: Callable, what: str) -> None:
    def body(run_id: str, specs) -> None:
        units = []
        for s in specs:
            reply = h.upload(s, make(s))
            units.append(UnitResult(s.task_id, s.fence, "" if reply.accepted else reply.reason,
                                    adapter_id=reply.adapter_id, tokens=s.tokens, seconds=1.0))
        h.report(run_id, units, specs)

    each_run(h, stop, body)
    n = folded(ctx, h.uploaded)
    out["succeeded"] = n > 0
    out["detail"] = f"{n} of its uploads ({what}) folded; {h.said()}; {fates(ctx, h.uploaded)}"


def free_rider(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    h = Hostile(ctx, "free-rider")
    calibrate = h.train_at(0, OTHER_TEXT)  # one real adapter on public text, for a plausible norm
    job.ready.set()
    uploads_then_judge(ctx, h, stop, out, lambda s: random_like(calibrate, seed=len(h.uploaded) + 1),
                       "random factors of an honest norm")


def copycat(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    worker_a = Hostile(ctx, "copycat-a")
    try:
        copier, second = Hostile(ctx, "copycat-b"), "a second identity"
    except NomoatError:  # the join code minted no second identity here: the same one copies
        copier, second = worker_a, "the same identity (a second could not join)"
    original: list[fmt.Adapter] = []

    def first(run_id: str, specs) -> None:  # identity A trains one task for real
        units = []
        for s in specs:
            if not original:
                original.append(worker_a.train(s, worker_a.shard(s)))
                reply = worker_a.upload(s, original[0])
                units.append(UnitResult(s.task_id, s.fence, "" if reply.accepted else reply.reason,
                                        adapter_id=reply.adapter_id, tokens=s.tokens, seconds=1.0))
        worker_a.report(run_id, units, specs)

    while not original and not stop.is_set():
        run_id, specs = worker_a.take(stop)
        if run_id:
            first(run_id, specs)
    uploads_then_judge(ctx, copier, stop, out, lambda s: original[0], f"copies, by {second}, of an adapter already uploaded")


def scaled(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    h = Hostile(ctx, "scaler")

    def make(spec) -> fmt.Adapter:
        honest = h.train(spec, h.shard(spec))
        return fmt.Adapter({m: (a, b * 50) for m, (a, b) in honest.factors.items()}, honest.rank, honest.alpha)

    uploads_then_judge(ctx, h, stop, out, make, "its own training x50")


def other_data(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    h = Hostile(ctx, "other-data")
    base = h.train_at(0, OTHER_TEXT)  # trained once; each upload a copy nudged off its sha256
    job.ready.set()

    def make(spec) -> fmt.Adapter:
        g = torch.Generator().manual_seed(len(h.uploaded) + len(h.refusals))
        return fmt.Adapter({m: (a, b * (1 + 1e-4 * torch.randn(b.shape, generator=g)))
                            for m, (a, b) in base.factors.items()}, base.rank, base.alpha)

    uploads_then_judge(ctx, h, stop, out, make, "trained on other text")


def sybil(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    """Mint as many volunteers as it can with the public join code, from a process of its own."""
    job.get()  # the flood starts with the job
    flood = Flood(ctx, "sybil", ctx.join_code(), "--count", str(ctx.args.sybils))
    stop.wait()
    got = flood.result()
    out["flood"] = got
    # On loopback the newcomer shares the flood's address: refused for that address's limit alone,
    # a newcomer from anywhere else would still join; refused for the overall limit, the flood won.
    per_address = "the most one address may" in got.get("newcomer_why", "")
    registered = got.get("registered", 0)
    out["succeeded"] = registered >= ctx.args.sybils or (not got.get("newcomer") and not per_address)
    out["denial"] = True  # judged also by the honest volunteers' calls and throughput (see scenario)
    out["detail"] = (f"{registered} identities minted, {got.get('refused', 0)} refused ({got.get('why')}); a newcomer "
                     f"from the same address {'could' if got.get('newcomer') else 'could not'} join afterwards"
                     + (f" ({got['newcomer_why'][:80]})" if got.get("newcomer_why") else "")
                     + f"; the flood's client used {got['client_cpu_s']} CPU s")


def submit_flood(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    """A submitter sending more small jobs than its share, from a process of its own."""
    folder = ctx.tmp / f"flood-{ctx.seed}"
    folder.mkdir()
    for i in range(ctx.args.flood_jobs):
        dataset(folder, 4, 100 + i, f"flood-{i:03d}.jsonl")  # small jobs: one task each
    job.get()  # the flood starts with the job
    flood = Flood(ctx, "submit", ctx.new_token("submitter", "flooder"), "--datasets", str(folder),
                  "--tokens-per-task", str(ctx.args.tokens_per_task))
    stop.wait()
    got = flood.result()
    out["flood"] = got
    accepted = got.get("accepted", 0)
    out["succeeded"] = accepted >= ctx.args.flood_jobs  # more jobs than one submitter's share
    out["detail"] = (f"{accepted} of {ctx.args.flood_jobs} jobs accepted, {got.get('refused', 0)} refused "
                     f"({got.get('why')}); the flood's client used {got['client_cpu_s']} CPU s")
    out["denial"] = True  # judged also by the honest volunteers' calls and throughput (see scenario)


def watch_flood(ctx: Ctx, job: JobRef, stop: threading.Event, out: dict) -> None:
    """A volunteer (minted from the join code) holding Watch streams and slow PEFT pulls of the
    whole patch chain, from a process of its own."""
    job_id = job.get()
    flood = Flood(ctx, "watch", ctx.join_code(), "--job", job_id, "--watchers", str(ctx.args.watchers),
                  "--pullers", str(ctx.args.pullers))
    stop.wait()
    got = flood.result()
    out["flood"] = got
    out["succeeded"] = False  # judged by the honest volunteers' calls and throughput (see scenario)
    out["denial"] = True
    out["detail"] = (f"{ctx.args.watchers} watchers and {ctx.args.pullers} held pulls: answers {got.get('answers')}, "
                     f"refused {got.get('refused')} ({got.get('why')}); the flood's client used "
                     f"{got['client_cpu_s']} CPU s")


free_rider.prepares = other_data.prepares = True  # type: ignore[attr-defined]  (they train before the job)

ATTACKS: dict[str, Callable] = {
    "hijack": hijack, "forged-memory": forged_memory, "forged-speed": forged_speed, "abandon": abandon,
    "free-rider": free_rider, "copycat": copycat, "scaled-x50": scaled, "other-data": other_data,
    "submit-flood": submit_flood, "watch-flood": watch_flood,
    "sybil": sybil,  # last: it spends this address's joins, which every other attacker needs
}


# -- one scenario: a job, the honest volunteers, at most one attacker -------------------------------


def scenario(ctx: Ctx, name: str, attack: Callable | None) -> dict:
    ctx.seed += 1
    stop, out, ref = threading.Event(), {"succeeded": False, "detail": ""}, JobRef()
    logs = {n: w.log.stat().st_size for n, w in ctx.workers.items()}  # what the honest volunteers say from here
    cpu0, load0 = coordinator_cpu(ctx), os.getloadavg()[0]
    thread = None
    if attack is not None:
        def guarded() -> None:
            try:
                attack(ctx, ref, stop, out)
            except Exception as exc:  # noqa: BLE001  (an attack that broke says so, and did not succeed)
                out["detail"] = f"the attack broke: {type(exc).__name__}: {exc}"[:300]
                out["broke"] = True
            finally:
                ref.ready.set()  # a preparing attack that broke is waited for no longer

        thread = threading.Thread(target=guarded, daemon=True)
        thread.start()
        # It registers (and asks for work) before the job exists; one that trains first is waited for.
        ref.ready.wait(600 if getattr(attack, "prepares", False) else ctx.args.head_start)
    with ctx.client("admin") as client:  # the data dir holds no submitter token: the operator submits
        job_id = client.submit(dataset(ctx.tmp, ctx.args.lines, ctx.seed, f"job-{ctx.seed}.jsonl"), name=name,
                               config=pb.JobConfig(tokens_per_task=ctx.args.tokens_per_task)).job_id
    ref.set(job_id)
    started = time.monotonic()
    end = started + ctx.args.job_timeout
    while time.monotonic() < end:
        job = ctx.ledger.jobs.get(job_id)
        if job and job.state.value in ("done", "failed") and not ctx.ledger.adapters.buffered():
            break
        time.sleep(1.0)
    seconds = time.monotonic() - started
    cpu = coordinator_cpu(ctx) - cpu0
    stop.set()
    if thread is not None:
        thread.join(120)
    honest_ids = {w.worker_id for w in ctx.ledger.workers.all() if w.name in HONEST}
    adapters = [ctx.ledger.adapters.get(t.adapter) for t in ctx.ledger.tasks.of_job(job_id) if t.adapter]
    honest = [a for a in adapters if a and a.worker in honest_ids]
    job = ctx.ledger.jobs.get(job_id)
    complaints = honest_complaints(ctx, logs)
    result = {"job": job_id, "state": job.state.value if job else "?", "seconds": round(seconds, 1),
              "honest_tokens": sum(a.tokens for a in honest),
              "honest_throughput": sum(a.tokens for a in honest) / max(seconds, 1e-9),
              "honest_adapters": len(honest), "honest_refused": sum(a.state.value == "rejected" for a in honest),
              "honest_complaints": complaints, "coordinator_cpu_s": round(cpu, 1),
              "load": [round(load0, 2), round(os.getloadavg()[0], 2)],
              **({k: v for k, v in out.items()} if attack else {})}
    print(f"[{name}] {result['state']} in {seconds:.0f} s; honest: {len(honest)} adapters, "
          f"{result['honest_refused']} refused, {result['honest_throughput']:.1f} tokens/s, "
          f"{len(complaints)} warnings; coordinator {cpu:.0f} CPU s; load {load0:.1f}; "
          + (f"succeeded={out['succeeded']}: {out['detail']}" if attack else ""), flush=True)
    return result


def coordinator_cpu(ctx: Ctx) -> float:
    """CPU seconds the coordinator's process has used (its gRPC gateway, scheduler and folder)."""
    try:
        fields = Path(f"/proc/{ctx.coordinator.p.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return math.nan


# What in an honest volunteer's log says one of its calls was refused or failed.
COMPLAINT = re.compile(r"\b(warning|error)\b", re.IGNORECASE)


def honest_complaints(ctx: Ctx, since: dict[str, int]) -> list[str]:
    """The warnings and errors the honest volunteers logged since ``since`` (their logs' sizes)."""
    lines = []
    for name, proc in ctx.workers.items():
        with open(proc.log, "rb") as fh:
            fh.seek(since[name])
            text = fh.read().decode(errors="replace")
        lines += [f"{name}: {line.strip()[:200]}" for line in text.splitlines() if COMPLAINT.search(line)]
    return lines


def start(args: argparse.Namespace, tmp: Path) -> Ctx:
    """The coordinator (no Ray: every volunteer here is outbound, and a Ray head timed out starting
    on a loaded machine; a fold of 2; a fold timeout of 15 s, not 120: a job's last adapter can
    wait that long for a fold, which made the attack-free runs' times vary by minutes) and the
    honest volunteers, joined with the printed join line."""
    data_dir = tmp / "coordinator"
    address = f"127.0.0.1:{procs.free_port()}"
    coordinator = procs.coordinator(data_dir, address, tmp / "coordinator.log", "--ray-address", "off", "--fold-every", "2", "--fold-timeout", "15",
                                    "--replicate-fraction", "0", "--lease-ttl", str(args.lease_ttl),
                                    "--eval-tokens", "1024", "--http", f"127.0.0.1:{procs.free_port()}")
    coordinator.wait_for("volunteers join with", timeout=300)
    ctx = Ctx(args, tmp, data_dir, address, coordinator, ledger=procs.ledger_of(data_dir))
    code = ctx.join_code()
    for name in HONEST:  # as the printed join line, each its own user (its own config dir: its credential)
        ctx.workers[name] = procs.Proc(["worker", "start", "--coordinator", address, "--simulate-gpu", CARD,
                                        "--threads", "1", "--name", name, "--cache-dir", str(tmp / f"cache-{name}")],
                                       tmp / f"{name}.log",
                                       env={"NOMOAT_TOKEN": code, "NOMOAT_CONFIG_DIR": str(tmp / f"config-{name}")})
    for proc in ctx.workers.values():
        proc.wait_for("joined (outbound-only)", timeout=300)
    return ctx


def stop_all(ctx: Ctx) -> None:
    if _TRAINERS is not None:
        _TRAINERS.shutdown(wait=False, cancel_futures=True)
    for proc in [*ctx.workers.values(), ctx.coordinator]:
        proc.interrupt(timeout=30)
        if proc.p.poll() is None:
            procs.kill_tree(proc.p.pid)
    procs.kill_leftovers(ctx.cluster_dir)


def baseline_points(attacks: int, n: int) -> set[int]:
    """Before which attacks (by index; ``attacks``: after the last) the ``n`` attack-free runs go:
    the first before any attack, the last after every one, the rest spread between, so that the
    spread of the baselines is the run-to-run noise over the whole run."""
    if n <= 1:
        return {0}
    return {round(i * attacks / (n - 1)) for i in range(n)}


def judge_denial(result: dict, floor: float) -> None:
    """A flood aims at the honest volunteers: it worked if one of their calls was refused for the
    flood (their logs say so) or their throughput fell below both the target (0.9) and the noise of
    the attack-free runs (``floor``: the worst baseline's ratio)."""
    refused = [c for c in result.get("honest_complaints", []) if re.search(
        r"exhaust|as many .* streams|too many|try again|refused|deadline|unavailable", c, re.IGNORECASE)]
    hurt = result["throughput_ratio"] < min(0.9, floor)
    result["succeeded"] = bool(result.get("succeeded")) or bool(refused) or hurt
    result["detail"] += (f"; honest calls refused or failing: {len(refused)}"
                         + (f" ({refused[0][:120]})" if refused else "")
                         + f"; throughput {result['throughput_ratio']} against a noise floor of {floor:.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--attacks", default=",".join(ATTACKS), help="which attacks, comma-separated")
    parser.add_argument("--quick", action="store_true", help="small jobs: a few minutes per attack on 2 cores")
    parser.add_argument("--lines", type=int, default=240, help="records per job")
    parser.add_argument("--tokens-per-task", type=int, default=2000)
    parser.add_argument("--job-timeout", type=float, default=900.0)
    parser.add_argument("--lease-ttl", type=float, default=20.0)
    parser.add_argument("--max-fence", type=int, default=200, help="fences the hijacker tries per task")
    parser.add_argument("--sybils", type=int, default=100)
    parser.add_argument("--flood-jobs", type=int, default=20)
    parser.add_argument("--watchers", type=int, default=40, help="watch-flood: Watch streams held")
    parser.add_argument("--pullers", type=int, default=40, help="watch-flood: PEFT pulls held (the Pull lane has 32)")
    parser.add_argument("--baselines", type=int, default=3, help="attack-free runs, spread over the run (at least 2)")
    parser.add_argument("--head-start", type=float, default=3.0, help="seconds an attacker has before the job")
    args = parser.parse_args()
    if args.quick:
        # more units than two honest runs hold (max_units_per_run 16 each), so an attacker gets some
        args.lines, args.tokens_per_task, args.job_timeout = 320, 400, 400.0
        # flood_jobs above the per-submitter job quota (Settings.max_jobs_per_submitter, 8): 8 would test nothing
        args.max_fence, args.sybils, args.flood_jobs = 60, 40, 12
    chosen = [a for a in args.attacks.split(",") if a]
    unknown = [a for a in chosen if a not in ATTACKS]
    if unknown:
        raise SystemExit(f"unknown attack(s) {', '.join(unknown)}: choose from {', '.join(ATTACKS)}")
    tmp = Path(tempfile.mkdtemp(prefix="nomoat-adversary-"))
    ctx = start(args, tmp)
    points = baseline_points(len(chosen), max(2, args.baselines))
    baselines: list[dict] = []
    results = {}
    try:
        # The volunteers start on probation (one unit at a time, every unit replicated): a first job
        # earns them their trust, and is not counted.
        warm_up = scenario(ctx, "warm-up", None)
        for i, name in enumerate([*chosen, None]):
            if i in points:
                baselines.append(scenario(ctx, f"baseline-{len(baselines) + 1}", None))
            if name is not None:
                results[name] = scenario(ctx, name, ATTACKS[name])
    finally:
        stop_all(ctx)
    speeds = [b["honest_throughput"] for b in baselines]
    mean = statistics.mean(speeds)
    floor = min(speeds) / mean  # the worst attack-free run against their mean: the noise
    for name, result in results.items():
        result["throughput_ratio"] = round(result["honest_throughput"] / max(mean, 1e-9), 3)
        if result.get("denial"):
            judge_denial(result, floor)
    counted = [*baselines, *results.values()]
    honest_adapters = sum(r["honest_adapters"] for r in counted)
    honest_refused = sum(r["honest_refused"] for r in counted)
    summary = {
        "attacks_tried": len(results),
        "attacks_succeeded": sum(bool(r.get("succeeded")) for r in results.values()),
        "honest_throughput_ratio": min((r["throughput_ratio"] for r in results.values()), default=math.nan),
        "honest_refused_share": round(honest_refused / max(1, honest_adapters), 4),
        "honest_adapters": honest_adapters, "honest_refused": honest_refused,
        "baseline_tokens_per_s": [round(x, 1) for x in speeds],
        "baseline_seconds": [b["seconds"] for b in baselines],
        "baseline_spread": round((max(speeds) - min(speeds)) / mean, 3),
        "baseline_ratios": [round(x / mean, 3) for x in speeds],
        "warm_up": {k: warm_up[k] for k in ("seconds", "honest_adapters", "honest_refused", "state")},
        "attacks": {n: {"succeeded": bool(r.get("succeeded")), "detail": r.get("detail", ""),
                        "throughput_ratio": r["throughput_ratio"], "honest_refused": r["honest_refused"],
                        "honest_adapters": r["honest_adapters"], "job_state": r["state"], "seconds": r["seconds"],
                        "honest_warnings": len(r["honest_complaints"]), "coordinator_cpu_s": r["coordinator_cpu_s"],
                        "load": r["load"], **({"broke": True} if r.get("broke") else {})}
                    for n, r in results.items()},
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
