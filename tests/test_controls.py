"""Volunteer controls (worker.controls): hours, upload pacing, pause files, idle detection, power.

There is no GPU here: NVML is a stand-in named FakeNvml, with the calls and errors of the
``pynvml`` module that NvmlGpu drives. Everything else is real: files, the clock arithmetic,
the gRPC upload, the ledger's requeue.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
import subprocess
import threading
import time
from pathlib import Path

import pytest

from coordinator.ledger import TaskState
from coordinator.schedule.transport import Finished
from tests import rig as rigs
from tests.rig import Rig, published, rig  # noqa: F401  (fixtures)
from tests.test_task import leased_specs
from worker import uploader
from worker.controls import ControlError, ControlFiles, Controls, ControlSettings, Hours, TokenBucket
from worker.gpu import DutyCycle, NvmlGpu, SmiGpu, own_pids
from worker.idle import parse_logind, terminal_idle_seconds, user_idle_seconds
from worker.settings import NodeSettings
from worker.task import run_units


class FakeClock:
    """A monotonic clock that only sleeping moves."""

    def __init__(self) -> None:
        self.t = 1000.0
        self.slept: list[float] = []

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.t += seconds


# -- hours ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, inside, outside", [
    ("22-07", ["22:00", "23:59", "00:00", "06:59"], ["07:00", "12:00", "21:59"]),
    ("9:30-17:00", ["09:30", "16:59"], ["09:29", "17:00", "23:00"]),
    ("0-24", ["00:00", "12:00", "23:59"], []),
    ("23:15-00:45", ["23:15", "00:44"], ["00:45", "23:14"]),
])
def test_the_hours_window_wraps_midnight(text: str, inside: list[str], outside: list[str]) -> None:
    hours = Hours.parse(text)
    at = [dt.time.fromisoformat(t) for t in inside + outside]
    assert [hours.contains(t) for t in at] == [True] * len(inside) + [False] * len(outside)


@pytest.mark.parametrize("text, says", [
    ("22", "is not a window of hours; write START-END"),
    ("evening", "is not a window of hours"),
    ("25-07", "25:00 is not a time of day"),
    ("22:75-07", "22:75 is not a time of day"),
    ("24:30-07", "24:30 is not a time of day"),
    ("07-07", "starts and ends at the same time"),
])
def test_a_bad_hours_window_is_a_sentence(text: str, says: str) -> None:
    with pytest.raises(ControlError, match=says):
        Hours.parse(text)


def test_outside_the_hours_the_worker_may_not_train(tmp_path: Path) -> None:
    now = [dt.datetime(2026, 12, 2, 12, 0)]
    controls = Controls(ControlSettings(tmp_path, hours=Hours.parse("22-07")), now=lambda: now[0])
    assert controls.allowed_now() == (False, "outside the hours 22:00-07:00 (local time)")
    now[0] = dt.datetime(2026, 12, 2, 23, 30)
    assert controls.allowed_now() == (True, "")


# -- upload pacing ----------------------------------------------------------------------------


def test_the_token_bucket_keeps_the_average_rate() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=1000.0, burst=250.0, clock=clock, sleep=clock.sleep)
    start = clock()
    for _ in range(40):
        bucket.take(100)  # 4000 bytes in all
    # The first 250 bytes go at once (the burst); the other 3750 take 3.75 s at 1000 B/s.
    assert clock() - start == pytest.approx(3.75, abs=1e-9)


def test_a_request_above_the_burst_is_paid_for_by_the_next_one() -> None:
    clock = FakeClock()
    bucket = TokenBucket(rate=100.0, burst=50.0, clock=clock, sleep=clock.sleep)
    assert bucket.take(1000) == 0.0  # a full bucket lets one large chunk through ...
    # ... and the next waits for the debt: the bucket is at 50 - 1000 = -950, and 10 more bytes
    # need 960 bytes' worth of refill at 100 B/s.
    assert bucket.take(10) == pytest.approx(9.6)
    assert clock() - 1000.0 == pytest.approx(9.6)


def test_an_upload_is_paced_chunk_by_chunk(rig: Rig) -> None:  # noqa: F811
    _, _, (spec,) = leased_specs(rig, 1)
    data = rigs.make_adapter(rig.deps.shapes)
    manifest = rigs.manifest(spec.task_id, spec.fence, data, worker_id=spec.worker_id)
    paced: list[int] = []
    sent = uploader.upload(rig.client("worker"), manifest, data, pace=paced.append)
    assert sent.accepted, sent.reason
    assert sum(paced) == len(data) and max(paced) <= 1 << 20


def test_the_controls_pace_uploads_only_with_a_limit(tmp_path: Path) -> None:
    assert Controls(ControlSettings(tmp_path)).throttle_upload(10 << 20) == 0.0
    limited = Controls(ControlSettings(tmp_path, max_upload_mbps=8.0))  # 1 MB/s
    limited._bucket.clock = clock = FakeClock()
    limited._bucket.sleep = clock.sleep
    limited._bucket.at = clock()
    assert limited.throttle_upload(250_000) == 0.0  # the burst: a quarter second's worth
    assert [limited.throttle_upload(250_000) for _ in range(4)] == pytest.approx([0.25] * 4)  # then 1 MB/s


# -- pause and resume -------------------------------------------------------------------------


def test_pause_and_resume_go_through_the_state_dir(tmp_path: Path) -> None:
    controls = Controls(ControlSettings(tmp_path / "control"))
    assert controls.allowed_now() == (True, "")
    ControlFiles(tmp_path / "control").pause()  # what `nomoat worker pause` does
    allowed, why = controls.allowed_now()
    assert not allowed and "paused by `nomoat worker pause`" in why
    assert ControlFiles(tmp_path / "control").resume() and controls.allowed_now() == (True, "")
    assert not ControlFiles(tmp_path / "control").resume()  # resuming twice says it was not paused


def test_wait_until_allowed_returns_once_resumed_or_when_stopped(tmp_path: Path) -> None:
    files = ControlFiles(tmp_path)
    files.pause()
    controls = Controls(ControlSettings(tmp_path))
    stop = threading.Event()
    threading.Timer(0.3, files.resume).start()
    assert controls.wait_until_allowed(stop, every_s=0.05)
    files.pause()
    threading.Timer(0.3, stop.set).start()
    assert not controls.wait_until_allowed(stop, every_s=0.05)


def test_a_paused_worker_hands_back_what_it_has_not_started_and_the_lease_rules_see_no_failure(
        rig: Rig, tmp_path: Path) -> None:  # noqa: F811
    s, node, specs = leased_specs(rig, 2)
    node_settings = NodeSettings(cache_dir=tmp_path / "cache")
    ControlFiles(node_settings.control_dir).hold("outside the hours 22:00-07:00 (local time)")  # the agent's call
    units = run_units(specs, node_settings)
    assert [u.handed_back for u in units] == [True, True]
    assert all("outside the hours" in u.error for u in units)
    for unit in units:
        s._finished(Finished.of(unit, node.worker_id, node.node_id))
    for spec in specs:
        task = rig.ledger.tasks.get(spec.task_id)
        # Back in the queue with the attempt its lease took given back: a pause is not a failure.
        assert task.state is TaskState.PENDING and task.attempts == 0, task
        assert task.events == ()  # it never started: no heartbeat reached the coordinator


def test_only_the_holder_of_a_lease_may_hand_it_back(rig: Rig) -> None:  # noqa: F811
    from coordinator.schedule import holder

    _, _, (spec,) = leased_specs(rig, 1)
    owner = rig.registry.lookup(rig.tokens["worker"])
    other = rig.registry.lookup(rig.registry.create("worker"))
    assert holder.heartbeat(rig.ledger, rig.deps.settings, owner, spec.worker_id, spec.task_id, spec.fence,
                            secret=spec.lease_secret).ok
    for claim in (holder.claim_of(rig.ledger, other, "", spec.lease_secret),  # not its worker's
                  holder.claim_of(rig.ledger, other, spec.worker_id, spec.lease_secret),  # not its worker
                  holder.claim_of(rig.ledger, owner, spec.worker_id, "")):  # no secret
        assert not holder.hand_back(rig.ledger, spec.task_id, spec.fence, "", "paused", claim)
    assert rig.ledger.tasks.get(spec.task_id).state is TaskState.LEASED
    mine = holder.claim_of(rig.ledger, owner, spec.worker_id, spec.lease_secret)
    assert holder.hand_back(rig.ledger, spec.task_id, spec.fence, spec.worker_id, "paused", mine)
    task = rig.ledger.tasks.get(spec.task_id)
    assert task.state is TaskState.PENDING and task.attempts == 0
    assert not holder.hand_back(rig.ledger, spec.task_id, spec.fence, spec.worker_id, "paused", mine)


# -- idle detection ---------------------------------------------------------------------------


class FakeNvml:
    """Stands in for the ``pynvml`` module (no NVIDIA driver here): the calls NvmlGpu makes."""

    class NVMLError(Exception):
        pass

    class NVMLError_NoPermission(NVMLError):
        pass

    class Process:
        def __init__(self, pid: int) -> None:
            self.pid = pid

    def __init__(self, compute: tuple[int, ...] = (), graphics: tuple[int, ...] = (), power_w: float = 250.0,
                 may_set_limit: bool = True) -> None:
        self.compute, self.graphics = list(compute), list(graphics)
        self.power_mw = int(power_w * 1000)
        self.may_set_limit = may_set_limit
        self.limit_mw = 300_000
        self.initialised = False

    def nvmlInit(self) -> None:
        self.initialised = True

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        return f"gpu{index}"

    def nvmlDeviceGetComputeRunningProcesses(self, handle: str) -> list:
        return [self.Process(p) for p in self.compute]

    def nvmlDeviceGetGraphicsRunningProcesses(self, handle: str) -> list:
        return [self.Process(p) for p in self.graphics]

    def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
        return self.power_mw

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle: str) -> tuple[int, int]:
        return 100_000, 450_000

    def nvmlDeviceGetPowerManagementLimit(self, handle: str) -> int:
        return self.limit_mw

    def nvmlDeviceSetPowerManagementLimit(self, handle: str, mw: int) -> None:
        if not self.may_set_limit:
            raise self.NVMLError_NoPermission("Insufficient Permissions")
        self.limit_mw = mw


def idle_controls(tmp_path: Path, nvml: FakeNvml, user_idle: float | None = 3600.0) -> Controls:
    return Controls(ControlSettings(tmp_path, idle_only=True), gpu=NvmlGpu(nvml),
                    user_idle=lambda: user_idle, mine=lambda: {os.getpid(), 4242})


def test_idle_only_waits_while_another_process_uses_the_gpu(tmp_path: Path) -> None:
    nvml = FakeNvml(compute=(os.getpid(), 4242))  # only our own processes: idle for us
    controls = idle_controls(tmp_path, nvml)
    assert nvml.initialised and controls.allowed_now() == (True, "")
    nvml.graphics.append(777)  # a game starts
    assert controls.allowed_now() == (False, "another process uses the GPU (pid 777)")


def test_idle_only_waits_while_the_user_is_active(tmp_path: Path) -> None:
    assert idle_controls(tmp_path, FakeNvml(), user_idle=12.0).allowed_now() == (
        False, "the user is active (idle for less than 300 s)")
    assert idle_controls(tmp_path, FakeNvml(), user_idle=301.0).allowed_now() == (True, "")
    # Nothing says whether anyone is at the keyboard: the GPU alone decides.
    assert idle_controls(tmp_path, FakeNvml(), user_idle=None).allowed_now() == (True, "")


def test_logind_idle_hint_is_read_as_seconds_idle() -> None:
    now = 1_800_000_000.0
    assert parse_logind("IdleHint=no\nIdleSinceHint=0\n", now) == 0.0
    assert parse_logind(f"IdleHint=yes\nIdleSinceHint={int((now - 600) * 1e6)}\n", now) == pytest.approx(600)
    assert parse_logind("", now) is None


def test_without_logind_the_newest_terminal_read_counts(tmp_path: Path) -> None:
    now = time.time()
    a, b = tmp_path / "0", tmp_path / "1"
    for path, age in ((a, 900), (b, 40)):
        path.write_text("")
        os.utime(path, (now - age, now - age))
    assert terminal_idle_seconds(now, [a, b]) == pytest.approx(40, abs=1)
    assert terminal_idle_seconds(now, []) is None

    def no_logind(*args, **kwargs):
        return subprocess.CompletedProcess(args, 1, "", "System has not been booted with systemd")

    dev = tmp_path / "dev"
    (dev / "pts").mkdir(parents=True)
    (dev / "pts" / "3").write_text("")
    os.utime(dev / "pts" / "3", (now - 120, now - 120))
    assert user_idle_seconds(now, run=no_logind, dev=dev) == pytest.approx(120, abs=1)


def test_the_workers_own_processes_are_itself_and_its_descendants(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid, ppid in ((10, 1), (11, 10), (12, 11), (20, 1)):
        (proc / str(pid)).mkdir(parents=True)
        (proc / str(pid) / "stat").write_text(f"{pid} (python (x)) S {ppid} 0 0")
    assert own_pids(10, proc) == {10, 11, 12}


def test_nvidia_smi_is_the_fallback_reader() -> None:
    def smi(args, **kwargs):
        out = "1234\n5678\n" if "--query-compute-apps=pid" in args else "187.5\n"
        return subprocess.CompletedProcess(args, 0, out, "")

    gpu = SmiGpu(run=smi)
    assert gpu.processes() == {1234, 5678} and gpu.power_w() == 187.5
    assert "needs NVML" in gpu.set_power_limit(200)


# -- power ------------------------------------------------------------------------------------


def test_the_power_limit_is_set_through_nvml_when_permitted_and_restored(tmp_path: Path) -> None:
    nvml = FakeNvml()
    controls = Controls(ControlSettings(tmp_path, max_power_w=200), gpu=NvmlGpu(nvml))
    assert "power limit is set to 200 W" in controls.limit_power() and nvml.limit_mw == 200_000
    controls.close()
    assert nvml.limit_mw == 300_000


def test_without_permission_the_worker_duty_cycles(tmp_path: Path) -> None:
    nvml = FakeNvml(may_set_limit=False)
    controls = Controls(ControlSettings(tmp_path, max_power_w=200), gpu=NvmlGpu(nvml))
    note = controls.limit_power()
    assert note.startswith("duty-cycling to keep the card under 200 W") and "needs root" in note
    assert nvml.limit_mw == 300_000
    low = Controls(ControlSettings(tmp_path, max_power_w=50), gpu=NvmlGpu(FakeNvml())).limit_power()
    assert "duty-cycling" in low and "between 100 and 450 W" in low


def test_a_power_target_that_can_be_neither_set_nor_measured_is_a_sentence(tmp_path: Path) -> None:
    class Unreadable(FakeNvml):
        def nvmlDeviceGetPowerUsage(self, handle: str) -> int:
            raise self.NVMLError("Not Supported")

    controls = Controls(ControlSettings(tmp_path, max_power_w=200), gpu=NvmlGpu(Unreadable(may_set_limit=False)))
    with pytest.raises(ControlError, match="--max-power 200 cannot be kept: .*leave --max-power out"):
        controls.limit_power()


def test_duty_cycling_keeps_the_average_power_at_the_target() -> None:
    clock = FakeClock()
    readings = iter([300.0, 50.0] * 10)  # working draws 300 W, resting 50 W
    duty = DutyCycle(200.0, lambda: next(readings), clock=clock, sleep=clock.sleep)
    energy, elapsed = 0.0, 0.0
    for _ in range(10):
        clock.t += 2.0  # a 2-second step at 300 W
        energy += 2.0 * 300
        rested = duty.step()
        energy += rested * 50  # (the first rest assumes 0 W at rest, then measures 50 W)
        elapsed += 2.0 + rested
    assert energy / elapsed == pytest.approx(200.0, rel=0.03)
    assert not [s for s in clock.slept if s > 30.0]


def test_under_the_target_there_is_no_rest() -> None:
    clock = FakeClock()
    duty = DutyCycle(200.0, lambda: 150.0, clock=clock, sleep=clock.sleep)
    clock.t += 5
    assert duty.step() == 0.0 and clock.slept == []


# -- the command line -------------------------------------------------------------------------


def test_worker_start_refuses_bad_hours_with_a_sentence(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nomoat.cli import main

    result = CliRunner().invoke(main, ["worker", "start", "--simulate-gpu", "RTX 3060:12", "--cache-dir",
                                       str(tmp_path), "--hours", "25-07"])
    assert result.exit_code == 1
    assert "error: --hours '25-07': 25:00 is not a time of day" in result.output
    assert "Traceback" not in result.output


def test_worker_pause_and_resume_commands(tmp_path: Path) -> None:
    from click.testing import CliRunner

    from nomoat.cli import main

    runner = CliRunner()
    paused = runner.invoke(main, ["worker", "pause", "--cache-dir", str(tmp_path)])
    assert paused.exit_code == 0 and "paused" in paused.output
    assert ControlFiles(tmp_path / "control").paused()
    assert Controls(ControlSettings(tmp_path / "control")).allowed_now()[0] is False
    resumed = runner.invoke(main, ["worker", "resume", "--cache-dir", str(tmp_path)])
    assert resumed.exit_code == 0 and "resumed" in resumed.output
    assert ControlFiles(tmp_path / "control").paused() is None


# -- the agent --------------------------------------------------------------------------------


class FakeNode:
    """Stands in for the agent's Ray node (the fast tier starts no Ray): records being stopped."""

    log_path = Path("unused")

    def __init__(self) -> None:
        self.stopped = 0

    def stop(self, timeout: float) -> None:
        self.stopped += 1

    def alive(self) -> bool:
        return self.stopped == 0


def test_a_pausing_agent_holds_its_node_lets_the_unit_finish_then_leaves_and_rejoins(tmp_path: Path) -> None:
    from nomoat.progress import ProgressFile, TaskProgress
    from worker import agent as agent_module
    from worker.agent import WorkerAgent
    from worker.probe import parse_simulated

    from nomoat.client import CoordinatorClient

    controls = Controls(ControlSettings(tmp_path / "control"))
    # A client that is never called (its channel connects lazily): the agent reads its token, a
    # worker token here, not a join code to swap for a credential.
    client = CoordinatorClient("127.0.0.1:1", token="a-worker-token")
    agent = WorkerAgent(client=client, card=parse_simulated("RTX 3060:12"), cache_dir=tmp_path, controls=controls)
    agent.node = node = FakeNode()
    rejoined = []
    agent.rejoin = lambda: rejoined.append(controls.files.held())  # a real rejoin starts a Ray node
    progress = ProgressFile(tmp_path / "control" / "progress.json")
    progress.write(TaskProgress("t-1", 3, 10, 2.0, 100.0, os.getpid()))  # a unit is in training
    seen: dict[str, object] = {}

    def unit_ends() -> None:
        seen["held while training"] = controls.files.held()
        seen["stopped while training"] = node.stopped
        progress.clear()

    controls.files.pause()
    threading.Timer(2.5, unit_ends).start()
    threading.Timer(4.0, controls.files.resume).start()
    agent_module.CHECK_EVERY_S, saved = 0.2, agent_module.CHECK_EVERY_S
    try:
        controls.wait_until_allowed = functools.partial(Controls.wait_until_allowed, controls, every_s=0.1)
        agent.pause(controls.allowed_now()[1])
    finally:
        agent_module.CHECK_EVERY_S = saved
        client.close()
    assert "paused by `nomoat worker pause`" in seen["held while training"]  # the tasks hand back the rest
    assert seen["stopped while training"] == 0  # the unit in training was not killed
    assert node.stopped == 1  # then the node left the cluster
    assert rejoined == [None]  # and rejoined once resumed, the hold lifted first
