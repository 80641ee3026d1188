"""The coordinator's HTTP port: the dashboard's data, its token check, its live stream, /metrics and
the Grafana dashboard built on them; and, in the slow tier, the page itself in headless Chromium.

The fast tests serve the real WebServer in-process on a free loopback port, over the rig's real
ledger (the session's redis-server), token registry and blob store. The slow test runs
`nomoat coordinator start --http ...` and two simulated workers as processes, submits a job, and
drives Debian's chromium with Debian's chromedriver (Selenium, no browser download) while the
job trains; it saves a screenshot (its path is printed).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import shutil
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from coordinator.collect import accept

from coordinator.observe import dashboard

from coordinator.observe import metrics

from coordinator.observe import status
from coordinator.ledger import AdapterState
from coordinator.collect.partial_uploads import PartialUploads
from coordinator.gateway.web.server import BAD_TOKEN, NO_TOKEN, WebServer
from tests.rig import ALPHA, RANK, SECRET, Rig, make_adapter, published, rig, submit_job  # noqa: F401  (fixtures)

ROOT = Path(__file__).resolve().parent.parent
GRAFANA = ROOT / "deploy" / "grafana" / "nomoat.json"
ARTIFACTS = ROOT / "artifacts"


@pytest.fixture
def web(rig: Rig) -> Iterator[WebServer]:
    server = WebServer("127.0.0.1:0", rig.ledger, rig.deps.settings, rig.registry, interval_s=0.1)
    server.start()
    yield server
    server.stop()


def get(url: str, token: str | None = None, header: bool = True) -> tuple[int, str, dict[str, str]]:
    """(status, body, headers) of a GET, the token as a bearer header or as ``?token=``."""
    if token is not None and not header:
        url += ("&" if "?" in url else "?") + f"token={token}"
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token and header else {})
    try:
        with urllib.request.urlopen(request, timeout=30) as reply:
            return reply.status, reply.read().decode(), dict(reply.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


# -- the token check ---------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["", "api/snapshot", "api/events", "metrics"])
def test_no_token_or_a_wrong_one_is_refused_with_a_sentence(rig: Rig, web: WebServer, path: str) -> None:
    code, body, headers = get(web.url + path)
    assert code == 401 and body.strip() == NO_TOKEN and headers["WWW-Authenticate"].startswith("Bearer")
    for header in (True, False):
        code, body, _ = get(web.url + path, "nmt_r_not-a-token", header=header)
        assert (code, body.strip()) == (401, BAD_TOKEN)
    code, body, _ = get(web.url + path, rig.tokens["worker"])
    assert code == 403 and body.startswith("A worker token may not open the dashboard; use a reader token")


def test_a_reader_token_opens_the_page_by_header_or_address_and_a_revoked_one_no_longer(rig: Rig,
                                                                                       web: WebServer) -> None:
    for role in ("reader", "admin"):
        code, body, headers = get(web.url, rig.tokens[role], header=False)
        assert code == 200 and "<title>nomoat dashboard</title>" in body
        assert "default-src 'self'" in headers["Content-Security-Policy"]
    code, body, headers = get(web.url + "api/snapshot", rig.tokens["reader"])
    assert code == 200 and headers["Content-Type"] == "application/json"
    assert [v["version"] for v in json.loads(body)["versions"]] == [0]
    # The page's own files and the health check need no token: they hold no data.
    assert get(web.url + "static/app.js")[0] == 200 and get(web.url + "healthz")[:2] == (200, "ok\n")
    assert get(web.url + "nowhere", rig.tokens["reader"])[0] == 404
    rig.registry.revoke(rig.tokens["reader"])
    assert get(web.url, rig.tokens["reader"], header=False)[:2] == (401, BAD_TOKEN + "\n")


def test_with_the_coordinators_certificate_the_port_is_https(rig: Rig) -> None:
    import ssl

    from tests.rig import Tls

    tls = Tls.make(rig.tmp / "tls")
    server = WebServer("127.0.0.1:0", rig.ledger, rig.deps.settings, rig.registry, tls_cert=str(tls.cert),
                       tls_key=str(tls.key))
    server.start()
    try:
        assert server.url.startswith("https://127.0.0.1:")
        context = ssl.create_default_context(cafile=str(tls.ca))
        request = urllib.request.Request(server.url + "api/snapshot",
                                         headers={"Authorization": f"Bearer {rig.tokens['reader']}"})
        with urllib.request.urlopen(request, timeout=30, context=context) as reply:
            assert reply.status == 200 and json.loads(reply.read())["versions"][0]["version"] == 0
        with pytest.raises(OSError):  # plain HTTP gets no answer from a TLS port
            urllib.request.urlopen(server.url.replace("https", "http") + "healthz", timeout=30).read()
    finally:
        server.stop()


def test_a_chosen_port_that_is_taken_fails_the_command_and_the_default_one_only_warns(capsys) -> None:
    from types import SimpleNamespace

    from nomoat import cli_operator as cli

    taken = SimpleNamespace(web=None, web_error="the dashboard cannot listen on 127.0.0.1:8470: Address in use")
    cli.say_dashboard(taken, explicit=False)
    assert "warning: the dashboard cannot listen on 127.0.0.1:8470" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.say_dashboard(taken, explicit=True)
    assert "choose another --http HOST:PORT, or --http off" in capsys.readouterr().err


# -- the live stream ---------------------------------------------------------------------------


def events(url: str, token: str) -> Iterator[dict]:
    """The snapshots an /api/events stream sends, parsed, as they arrive."""
    reply = urllib.request.urlopen(f"{url}api/events?token={token}", timeout=30)
    assert reply.headers["Content-Type"] == "text/event-stream"
    kind, data = "", []
    for raw in reply:
        line = raw.decode().rstrip("\n")
        if line.startswith("event: "):
            kind = line[len("event: "):]
        elif line.startswith("data: "):
            data.append(line[len("data: "):])
        elif not line and data:
            if kind == "snapshot":
                yield json.loads("\n".join(data))
            kind, data = "", []


def test_the_stream_sends_a_change_as_it_happens(rig: Rig, web: WebServer) -> None:
    job_id = submit_job(rig).job_id
    stream = events(web.url, rig.tokens["reader"])
    first = next(stream)
    (job,) = first["jobs"]
    assert (job["job_id"], job["tasks"]["leased"], job["progress"], job["eta_s"]) == (job_id, 0, 0.0, None)
    rig.lease(rig.ledger.tasks.ids(job_id)[0])
    changed = next(stream)
    assert changed["jobs"][0]["tasks"]["leased"] == 1
    scraped = samples(get(web.url + "metrics", rig.tokens["reader"])[1])
    assert scraped[("nomoat_http_streams", ())] == 1  # this process's open streams: this one


# -- the dashboard's data ------------------------------------------------------------------------


def test_the_eta_is_the_pace_so_far_and_unknown_before_a_task_finished(rig: Rig) -> None:
    job_id = submit_job(rig).job_id
    summary = status.job(rig.ledger, job_id)
    assert dashboard.eta_s(summary, summary.created + 60) is None and dashboard.progress(summary) == 0.0
    quarter = {**summary.tasks, "done": summary.total_tasks // 4, "pending": summary.total_tasks
               - summary.total_tasks // 4}
    from dataclasses import replace

    done = replace(summary, tasks=quarter, total_tasks=summary.total_tasks // 4 * 4)
    assert dashboard.eta_s(done, summary.created + 60) == pytest.approx(180.0)
    assert dashboard.eta_s(replace(done, state="done"), summary.created + 60) == 0.0


def test_the_loss_curve_has_one_point_per_version_the_base_one_from_the_jobs_first_measure(rig: Rig) -> None:
    job_id = submit_job(rig).job_id
    rig.ledger.jobs.set_base(job_id, 4.25, 0)
    view = status.overview(rig.ledger, rig.deps.settings)
    assert dashboard.loss_curve(view.jobs, view.versions) == [dashboard.LossPoint(0, 4.25, "base")]
    assert math.isnan(view.versions[0].eval_loss)  # version 0 has no loss of its own


# -- /metrics ----------------------------------------------------------------------------------


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of a Prometheus text exposition, by (name, sorted labels)."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def _manifest(task_id: str, fence: int, data: bytes) -> accept.Manifest:
    return accept.Manifest(task_id=task_id, fence=fence, base_version=0, rank=RANK, alpha=ALPHA, tokens=300,
                            train_loss=2.5, sha256=hashlib.sha256(data).hexdigest(), size=len(data),
                            lease_secret=SECRET)


def run_a_job_part_way(rig: Rig) -> tuple[str, int]:
    """Through the domain calls the servicers and loops make: a lease that expires and is
    re-issued, an upload under the stale fence (refused), the current one (accepted), a fold.
    Returns (job id, the accepted adapter's size)."""
    job_id = submit_job(rig).job_id
    first, second = rig.ledger.tasks.ids(job_id)[:2]
    stale = rig.ledger.leases.lease(first, time.time() - 1, 0, max_attempts=5)  # already past its deadline
    assert rig.ledger.leases.expire() == [first]
    fence = rig.lease(first)  # the re-issue
    rig.lease(second)
    partials = PartialUploads(rig.tmp / "uploads")
    worker = rig.registry.lookup(rig.tokens["worker"])
    data = make_adapter(rig.deps.shapes)
    for f in (stale, fence):
        accept.upload(rig.ledger, rig.store, rig.deps.shapes, partials, worker, _manifest(first, f, data), 0,
                       [data], max_bytes=1 << 24)
    assert rig.deps.operations.maybe_fold({job_id}) == 1
    return job_id, len(data)


def test_metrics_count_what_happened_from_the_ledger(rig: Rig, web: WebServer) -> None:
    job_id, size = run_a_job_part_way(rig)
    code, text, headers = get(web.url + "metrics", rig.tokens["reader"])
    assert code == 200 and headers["Content-Type"].startswith("text/plain; version=0.0.4")
    got = samples(text)
    total = len(rig.ledger.tasks.ids(job_id))
    assert got[("nomoat_tasks", (("state", "done"),))] == 1
    assert got[("nomoat_tasks", (("state", "leased"),))] == 1
    assert got[("nomoat_tasks", (("state", "pending"),))] == total - 2
    assert got[("nomoat_leases_total", ())] == 3
    assert got[("nomoat_task_reissues_total", ())] == 1
    assert got[("nomoat_leases_expired_total", ())] == 1
    assert got[("nomoat_uploads_total", (("outcome", "accepted"),))] == 1
    assert got[("nomoat_uploads_total", (("outcome", "refused"),))] == 1
    assert got[("nomoat_upload_bytes_total", ())] == size
    assert got[("nomoat_refusals_total", (("reason", "lease"), ("stage", "upload")))] == 1
    assert got[("nomoat_fold_duration_seconds_count", ())] == 1
    assert got[("nomoat_folds_total", (("outcome", "published"),))] == 1
    assert got[("nomoat_versions", ())] == 2 and got[("nomoat_version_latest", ())] == 1
    assert math.isfinite(got[("nomoat_version_eval_loss", ())])
    assert got[("nomoat_job_progress", (("job", job_id), ("name", "job")))] == pytest.approx(1 / total)


def test_a_second_frontend_on_the_same_ledger_reports_the_same_counters(rig: Rig, web: WebServer) -> None:
    run_a_job_part_way(rig)
    other = WebServer("127.0.0.1:0", rig.ledger, rig.deps.settings, rig.registry)
    other.start()
    try:
        ours, theirs = (samples(get(w.url + "metrics", rig.tokens["reader"])[1]) for w in (web, other))
    finally:
        other.stop()
    ledger_counted = {k: v for k, v in ours.items() if not k[0].startswith("nomoat_http_")}
    assert ledger_counted == {k: v for k, v in theirs.items() if not k[0].startswith("nomoat_http_")}
    assert ours[("nomoat_leases_total", ())] == 3


def test_the_dashboard_shows_the_refusal_and_the_versions_contributions(rig: Rig, web: WebServer) -> None:
    job_id, _ = run_a_job_part_way(rig)
    data = json.loads(get(web.url + "api/snapshot", rig.tokens["reader"])[1])
    (refusal,) = data["refusals"]
    assert (refusal["stage"], refusal["kind"], refusal["job"]) == ("upload", "lease", job_id)
    assert refusal["reason"].startswith("this worker holds no lease of task")  # a stale fence, told as such
    newest = data["versions"][0]
    (contribution,) = newest["contributions"]
    adapter = rig.ledger.adapters.get(contribution["adapter_id"])
    assert adapter.state is AdapterState.FOLDED and contribution["weight"] == pytest.approx(1.0)
    assert [p["version"] for p in data["loss_curve"]] == [0, 1]


def scrape_families(rig: Rig, web: WebServer) -> dict[str, str]:
    """Metric family name -> its type, from a scrape of a ledger with a job part way."""
    run_a_job_part_way(rig)
    text = get(web.url + "metrics", rig.tokens["reader"])[1]
    return {f.name: f.type for f in text_string_to_metric_families(text)}


def test_every_exported_family_is_in_a_scrape(rig: Rig, web: WebServer) -> None:
    families = scrape_families(rig, web)
    assert set(metrics.EXPORTED) <= set(families), set(metrics.EXPORTED) - set(families)


def test_the_grafana_dashboard_uses_only_metrics_the_coordinator_exports(rig: Rig, web: WebServer) -> None:
    board = json.loads(GRAFANA.read_text())
    assert board["title"] and board["uid"] and board["schemaVersion"] >= 30
    families = scrape_families(rig, web)
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    exported = {name + suffix for name, kind in families.items() if name in metrics.EXPORTED
                for suffix in suffixes.get(kind, ("",))}
    exprs = [t["expr"] for p in board["panels"] for t in p.get("targets", [])]
    assert len(exprs) >= 8
    for panel in board["panels"]:
        assert panel["type"] and panel["title"] and set(panel["gridPos"]) == {"h", "w", "x", "y"}
    for expr in exprs:
        named = set(re.findall(r"\bnomoat_[a-z0-9_]+", expr))
        assert named, f"{expr!r} names no nomoat metric"
        assert named <= exported, f"{expr!r} names {named - exported}, which the coordinator does not export"


# -- the page, in a browser (slow) ----------------------------------------------------------------

CHROMIUM, CHROMEDRIVER = Path("/usr/bin/chromium"), Path("/usr/bin/chromedriver")


def browser(download_dir: Path):
    if not (CHROMIUM.exists() and CHROMEDRIVER.exists()):
        pytest.skip("needs Debian's chromium and chromium-driver (.ci/debian-packages; `make debian-packages`)")
    import os

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    os.environ.setdefault("SE_OFFLINE", "true")  # Selenium Manager must never fetch a browser or driver

    options = webdriver.ChromeOptions()
    options.binary_location = str(CHROMIUM)
    for arg in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu",
                "--window-size=1280,1700", f"--user-data-dir={download_dir}"):
        options.add_argument(arg)
    return webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=options)


def keep_screenshot(driver, tmp_path: Path, name: str) -> Path:
    """Save a screenshot in the test's tmp dir and under artifacts/ (printed): what the page showed."""
    shot = tmp_path / name
    driver.save_screenshot(str(shot))
    ARTIFACTS.mkdir(exist_ok=True)
    kept = ARTIFACTS / name
    shutil.copy(shot, kept)
    print(f"\ndashboard screenshot: {kept} (and {shot})")
    assert kept.stat().st_size > 10_000
    return kept


def wait_for(predicate, timeout: float, what: str):
    end = time.monotonic() + timeout
    while not (value := predicate()):
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.2)
    return value


# The page redraws on every event, so it is read in one script each time (elements found by one
# call may be replaced before the next).
def on_page(driver, script: str):
    return driver.execute_script(script)


def finished_on_page(driver) -> int:
    return on_page(driver, "const c = document.querySelector('article.job'); return c ? +c.dataset.finished : -1")


def points_on_page(driver) -> list[int]:
    return on_page(driver, "return [...document.querySelectorAll('#loss-chart circle.point')]"
                           ".map((c) => +c.dataset.version).sort((a, b) => a - b)")


def texts_on_page(driver, selector: str) -> list[str]:
    return on_page(driver, f"return [...document.querySelectorAll({json.dumps(selector)})].map((e) => e.textContent)")


@pytest.mark.slow
def test_the_page_follows_the_ledger_live_in_chromium(rig: Rig, web: WebServer, tmp_path: Path) -> None:
    """The page over the in-process server while the test moves a job on through the domain calls
    the servicers make (leases, uploads of hand-made adapters, folds): no Ray, so it runs anywhere."""
    from coordinator.schedule import registration
    from nomoat.v1 import nomoat_pb2 as pb

    job_id = submit_job(rig).job_id
    identity = rig.registry.lookup(rig.tokens["worker"])
    volunteers = []
    for name, card, vram, speed in (("volunteer-0", "RTX 3060", 12, 310.0), ("volunteer-1", "RTX 4090", 24, 920.0)):
        message = pb.Card(name=card, vram_gb=vram, simulated=True)
        joining = registration.Registration("", name, f"node-{name}", message.SerializeToString(), card, vram)
        volunteers.append(registration.register(rig.ledger, rig.deps.settings, identity, joining))
        rig.ledger.workers.record_run(volunteers[-1], f"node-{name}", int(speed * 10), 10.0)
    partials = PartialUploads(rig.tmp / "uploads")
    tasks = iter(rig.ledger.tasks.ids(job_id))

    def train(n: int, seed: int) -> None:
        for i in range(n):
            task_id, worker_id = next(tasks), volunteers[i % 2]
            base = rig.ledger.versions.latest()
            fence = rig.lease(task_id, base)
            data = make_adapter(rig.deps.shapes, seed=seed + i)
            m = accept.Manifest(task_id=task_id, fence=fence, base_version=base, rank=RANK,
                                 alpha=ALPHA, tokens=300, train_loss=2.5, sha256=hashlib.sha256(data).hexdigest(),
                                 size=len(data), worker_id=worker_id, lease_secret=SECRET)
            assert accept.upload(rig.ledger, rig.store, rig.deps.shapes, partials, identity, m, 0, [data],
                                  max_bytes=1 << 24).ok
            if i == 0:  # the same result again under an older fence: refused, and shown with its reason
                accept.upload(rig.ledger, rig.store, rig.deps.shapes, partials, identity,
                               accept.Manifest(**{**m.__dict__, "fence": fence - 1}), 0, [data], max_bytes=1 << 24)
        assert rig.deps.operations.maybe_fold({job_id}) is not None

    driver = browser(tmp_path / "chromium")
    try:
        driver.get(web.url + "?token=nmt_r_wrong")
        assert BAD_TOKEN in driver.find_element("tag name", "body").text
        driver.get(web.url + f"?token={rig.tokens['reader']}")
        wait_for(lambda: driver.find_elements("css selector", "#live[data-state=live]"), 60, "the live stream")
        driver.execute_script("window.notReloaded = true")  # gone if the page reloads
        assert finished_on_page(driver) == 0
        for round_, n in enumerate((2, 3)):
            before = finished_on_page(driver)
            train(n, seed=10 * round_)
            wait_for(lambda: finished_on_page(driver) == before + n, 30, "the job's progress to move on the page")
            versions = len(rig.ledger.versions.all())
            wait_for(lambda: len(points_on_page(driver)) == versions, 30, "one chart point per version")
            assert points_on_page(driver) == list(range(versions))
        assert driver.execute_script("return window.notReloaded === true")
        total = len(rig.ledger.tasks.ids(job_id))
        bar = on_page(driver, "const p = document.querySelector('article.job progress'); return [p.value, p.max]")
        assert bar == [5, total]
        assert texts_on_page(driver, "#workers tbody .worker-name") == ["volunteer-0", "volunteer-1"]
        assert texts_on_page(driver, "#workers tbody td.num")[::2] == ["310 tok/s", "920 tok/s"]
        refusals = texts_on_page(driver, "#refusals tbody td.reason")
        # An upload under an older fence is told only that it holds no such lease (issue 19: no
        # states, fences or holders to anyone but the holder).
        assert len(refusals) == 2 and all(r.startswith("this worker holds no lease of task ") for r in refusals)
        keep_screenshot(driver, tmp_path, "dashboard-inprocess.png")
    finally:
        driver.quit()


@pytest.mark.slow
def test_the_page_follows_a_training_job_live_in_chromium(tmp_path: Path) -> None:
    import random

    from nomoat.demo import DEMO_DATA
    from tests.procs import Proc, free_port, run, wait_until, worker

    lines = DEMO_DATA.read_text(encoding="utf-8").splitlines()
    random.Random(3).shuffle(lines)
    dataset = tmp_path / "train.jsonl"
    dataset.write_text("\n".join(lines[:600]) + "\n", encoding="utf-8")
    data_dir, address, http = tmp_path / "coordinator", f"127.0.0.1:{free_port()}", f"127.0.0.1:{free_port()}"
    coordinator = Proc(["coordinator", "start", "--data-dir", str(data_dir), "--listen", address, "--http", http,
                        "--fold-every", "2", "--tokens-per-task", "2500"], tmp_path / "coordinator.log")
    procs: list[Proc] = []
    driver = None
    try:
        coordinator.wait_for("dashboard: ", timeout=240)
        assert f"dashboard: http://{http}/" in coordinator.output()
        reader = (data_dir / "reader.token").read_text().strip()
        for i, card in enumerate(("RTX 3060:12", "RTX 4090:24")):  # one after the other: Ray starts are heavy
            procs.append(worker(address, data_dir, tmp_path, f"volunteer-{i}", card))
            procs[-1].wait_for("joined", timeout=240)
        admin = {"NOMOAT_COORDINATOR": address, "NOMOAT_TOKEN": (data_dir / "admin.token").read_text().strip()}
        submitted = run(["submit", str(dataset), "--name", "live"], admin, timeout=300)
        assert submitted.returncode == 0, submitted.stdout + submitted.stderr

        driver = browser(tmp_path / "chromium")
        driver.get(f"http://{http}/?token=nmt_r_wrong")
        assert BAD_TOKEN in driver.find_element("tag name", "body").text

        driver.get(f"http://{http}/?token={reader}")
        wait_until(lambda: driver.find_elements("css selector", "#live[data-state=live]"), 60, "the live stream")
        driver.execute_script("window.notReloaded = true")  # gone if the page reloads

        def finished() -> int:
            cards = driver.find_elements("css selector", "article.job")
            return int(cards[0].get_attribute("data-finished")) if cards else -1

        wait_until(lambda: finished_on_page(driver) >= 0, 60, "the job's card")
        first = finished_on_page(driver)
        total = on_page(driver, "return document.querySelector('article.job progress').max")
        assert first < total, "the job finished before the page could watch it"
        wait_until(lambda: finished_on_page(driver) > first, 600, "the job's progress to move on the page", every=1)
        assert driver.execute_script("return window.notReloaded === true")
        wait_until(lambda: texts_on_page(driver, "article.job .badge") in (["done"], ["failed"]), 900,
                   "the job to finish, as the page shows it", every=2)
        assert texts_on_page(driver, "article.job .badge") == ["done"]
        versions = len(json.loads(run(["status", "--json"], admin, timeout=60).stdout)["versions"])
        wait_until(lambda: len(points_on_page(driver)) == versions, 30, "one chart point per version")
        assert points_on_page(driver) == list(range(versions))
        assert driver.execute_script("return window.notReloaded === true")
        assert sorted(texts_on_page(driver, "#workers tbody .worker-name")) == ["volunteer-0", "volunteer-1"]

        keep_screenshot(driver, tmp_path, "dashboard.png")
        (ARTIFACTS / "dashboard-metrics.txt").write_text(get(f"http://{http}/metrics", reader)[1])
        print(f"the job's metrics: {ARTIFACTS / 'dashboard-metrics.txt'}")
    finally:
        if driver is not None:
            driver.quit()
        codes = [p.interrupt() for p in procs] + [coordinator.interrupt()]
    assert codes == [0] * len(codes), codes
