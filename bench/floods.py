"""The floods of bench/adversary.py, each run in a process of its own.

    python bench/floods.py sybil  --address HOST:PORT --count 40
    python bench/floods.py submit --address HOST:PORT --datasets DIR
    python bench/floods.py watch  --address HOST:PORT --job JOB --watchers 40 --pullers 40

The token comes in the environment (``NOMOAT_TOKEN``: the join code for ``sybil`` and ``watch``,
which registers a volunteer of its own and floods with the credential it minted; a submitter's
token for ``submit``). A flood runs until it has sent what it was asked to or is sent SIGTERM, then
prints one line of JSON: what it got through and what was refused.

Why a process of its own: a flood in the benchmark's process starves the process that measures
the honest volunteers (its threads take the interpreter's lock and the cores' time), so what the
benchmark saw was its own slowness, not the coordinator's.
"""

from __future__ import annotations

import argparse
import json
import signal
import sys
import threading
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nomoat.card import to_message
from nomoat.client import CoordinatorClient, NomoatError
from nomoat.v1 import nomoat_pb2 as pb
from worker.probe import parse_simulated

CARD = "RTX 3060:12:13"


def first_line(exc: BaseException) -> str:
    details = getattr(exc, "details", None)  # a grpc.RpcError: its status's sentence
    text = details() if callable(details) else str(exc)
    return ((text or "").splitlines() or [type(exc).__name__])[0][:160]


def sybil(args: argparse.Namespace, stop: threading.Event) -> dict:
    """Mint as many volunteers as the public join code gives; then can a newcomer still join?"""
    card = to_message(parse_simulated(CARD))
    registered, refused, why = 0, 0, Counter()
    for i in range(args.count):
        if stop.is_set():
            break
        try:  # each registration with the code mints a new volunteer (a credential of its own)
            with CoordinatorClient(args.address) as client:
                registered += bool(client.register(f"sybil-{i}", card).credential)
        except NomoatError as exc:
            refused += 1
            why[first_line(exc)] += 1
    try:  # a new honest volunteer joining with the same public line afterwards
        with CoordinatorClient(args.address) as client:
            client.register("newcomer", card)
        newcomer, newcomer_why = True, ""
    except NomoatError as exc:
        newcomer, newcomer_why = False, first_line(exc)
    return {"registered": registered, "refused": refused, "why": dict(why.most_common(3)),
            "newcomer": newcomer, "newcomer_why": newcomer_why}


def submit(args: argparse.Namespace, stop: threading.Event) -> dict:
    """One submitter sending every dataset in ``--datasets`` as a job of its own."""
    accepted, refused, why = 0, 0, Counter()
    with CoordinatorClient(args.address) as client:
        for path in sorted(Path(args.datasets).glob("*.jsonl")):
            if stop.is_set():
                break
            try:
                client.submit(path, name=path.stem, config=pb.JobConfig(tokens_per_task=args.tokens_per_task))
                accepted += 1
            except NomoatError as exc:
                refused += 1
                why[first_line(exc)] += 1
    return {"accepted": accepted, "refused": refused, "why": dict(why.most_common(3))}


def watch(args: argparse.Namespace, stop: threading.Event) -> dict:
    """A volunteer (minted from the join code) holding Watch streams open and pulls that it reads
    one message of and then holds (a slow reader keeps its stream, and the lane's slot, busy);
    ``--pullers`` ask for the whole patch chain as PEFT (``since 0``)."""
    with CoordinatorClient(args.address) as joiner:
        credential = joiner.register("watcher", to_message(parse_simulated(CARD))).credential
    lock = threading.Lock()
    answers, refused, why = Counter(), Counter(), Counter()

    def count(kind: str, exc: BaseException | None = None) -> None:
        with lock:
            if exc is None:
                answers[kind] += 1
            else:
                refused[kind] += 1
                why[first_line(exc)] += 1

    def watcher() -> None:
        client = CoordinatorClient(args.address, credential)
        while not stop.is_set():
            try:
                for _ in client.watch(args.job, timeout=args.hold_s):
                    count("watch")
                    if stop.is_set():
                        break
            except NomoatError as exc:
                if "did not answer in time" not in str(exc):  # its own deadline (hold_s) ends a held stream
                    count("watch", exc)
                    stop.wait(0.2)

    def puller() -> None:
        client = CoordinatorClient(args.address, credential)
        request = pb.PullRequest(version=-1, since=0, format=pb.PullRequest.Format.Value("PEFT"))
        while not stop.is_set():
            call = client._pull(request, timeout=args.hold_s + 5, metadata=client._meta)
            try:
                next(call)  # one chunk read, then the stream is held: the server waits on this reader
                count("pull")
                stop.wait(args.hold_s)
            except StopIteration:  # nothing to pull
                stop.wait(0.2)
            except Exception as exc:  # noqa: BLE001  (grpc.RpcError: a refusal)
                if "DEADLINE_EXCEEDED" not in repr(exc):
                    count("pull", exc)
                stop.wait(0.2)
            finally:
                call.cancel()

    threads = [threading.Thread(target=watcher, daemon=True) for _ in range(args.watchers)]
    threads += [threading.Thread(target=puller, daemon=True) for _ in range(args.pullers)]
    for t in threads:
        t.start()
    while not stop.wait(0.5):
        pass
    return {"watchers": args.watchers, "pullers": args.pullers, "answers": dict(answers), "refused": dict(refused),
            "why": dict(why.most_common(4))}


FLOODS = {"sybil": sybil, "submit": submit, "watch": watch}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("kind", choices=sorted(FLOODS))
    parser.add_argument("--address", required=True)
    parser.add_argument("--count", type=int, default=40, help="sybil: registrations to try")
    parser.add_argument("--datasets", default="", help="submit: a folder of .jsonl files, one job each")
    parser.add_argument("--tokens-per-task", type=int, default=400)
    parser.add_argument("--job", default="", help="watch: the job to watch")
    parser.add_argument("--watchers", type=int, default=40)
    parser.add_argument("--pullers", type=int, default=40)
    parser.add_argument("--hold-s", type=float, default=20.0, help="watch: how long each stream is held")
    args = parser.parse_args()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    result = FLOODS[args.kind](args, stop)
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
