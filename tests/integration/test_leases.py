"""Per-record leases on SQLite and PostgreSQL: one worker projects a record at a time."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from daemon_helpers import wait_for
from helpers import line, started, write_record
from pg import throwaway_database

from syncd.engine import Engine
from syncd.lease_heartbeat import LeaseHeartbeat
from syncd.ledger import SYNCED, Lease, LeaseHolder, LeaseLost, Ledger, Progress, RecordRow
from syncd.sources.local import LocalRecord
from tests.unit.test_engine_states import FakeSink

SOURCE = "file:///runs/a/run_record.jsonl"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Ledger]:
    if request.param == "sqlite":
        opened = Ledger(f"sqlite:///{tmp_path / 'ledger.db'}", "sink")
        yield opened
        opened.close()
        return
    with throwaway_database() as url:
        opened = Ledger(url, "sink")
        yield opened
        opened.close()


def test_a_held_lease_is_refused_then_taken_over_once_expired(ledger: Ledger) -> None:
    mine = ledger.acquire_lease(SOURCE, "host:1:a", ttl=0.5)
    assert isinstance(mine, Lease)
    theirs = ledger.acquire_lease(SOURCE, "host:2:b", ttl=30)
    assert isinstance(theirs, LeaseHolder) and theirs.owner == "host:1:a"
    assert 0 < theirs.expires_in <= 0.5
    assert isinstance(ledger.acquire_lease(SOURCE, "host:1:a", ttl=0.5), Lease)  # re-entrant

    def taken() -> Lease | None:
        got = ledger.acquire_lease(SOURCE, "host:2:b", ttl=30)
        return got if isinstance(got, Lease) else None

    stolen = wait_for(taken, timeout=10, what="the expired lease taken over")
    assert stolen.owner == "host:2:b"
    # the first owner's next step is fenced: no checkpoint, no renewal
    with pytest.raises(LeaseLost):
        ledger.renew_lease(mine)
    with pytest.raises(LeaseLost):
        ledger.commit(Progress(record=RecordRow(source=SOURCE, state=SYNCED), kind="applied"), mine)
    assert ledger.get_record(SOURCE) is None
    ledger.release_lease(mine)  # not ours any more: a no-op
    assert ledger.lease_of(SOURCE) is not None
    ledger.release_lease(stolen)
    assert ledger.lease_of(SOURCE) is None
    assert isinstance(ledger.acquire_lease(SOURCE, "host:1:a", ttl=5), Lease)


def test_racing_workers_get_one_lease(ledger: Ledger) -> None:
    """Many threads ask at once: exactly one wins (the row count decides)."""
    winners: list[str] = []
    barrier = threading.Barrier(8)

    def worker(i: int) -> None:
        barrier.wait()
        if isinstance(ledger.acquire_lease(SOURCE, f"w{i}", ttl=60), Lease):
            winners.append(f"w{i}")

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(winners) == 1


def test_a_record_leased_elsewhere_is_skipped_unchanged(ledger: Ledger, tmp_path: Path) -> None:
    path = write_record(
        tmp_path / "a", [started("r1"), line(1, "metrics", step=1, metrics={"m": 1.0})]
    )
    record = LocalRecord(path)
    other = ledger.acquire_lease(record.uri, "other-host:9:z", ttl=60)
    assert isinstance(other, Lease)
    sink = FakeSink()
    outcome = Engine(ledger, sink, worker="me").sync(record)
    assert outcome.busy and outcome.skipped and "other-host:9:z" in (outcome.message or "")
    assert 0 < outcome.busy_for <= 60
    assert sink.runs == {} and ledger.get_record(record.uri) is None
    ledger.release_lease(other)
    done = Engine(ledger, sink, worker="me").sync(record)
    assert not done.busy and done.state == SYNCED and done.metric_points == 1
    assert ledger.lease_of(record.uri) is None  # released at the end
    record.close()


def test_a_takeover_continues_from_the_last_checkpoint(ledger: Ledger, tmp_path: Path) -> None:
    """A worker died holding the lease after two lines: the taker writes only the rest."""
    lines = [started("r2"), *(line(i, "metrics", step=i, metrics={"m": float(i)}) for i in (1, 2))]
    path = write_record(tmp_path / "b", lines)
    record = LocalRecord(path)
    sink = FakeSink()
    first = Engine(ledger, sink, worker="dead", lease_ttl=0.5).sync(record)
    assert first.metric_points == 2
    write_record(path.parent, [line(3, "metrics", step=3, metrics={"m": 3.0})], mode="a")
    held = ledger.acquire_lease(record.uri, "dead", ttl=0.5)  # it took the lease, then died
    assert isinstance(held, Lease)
    taker = Engine(ledger, sink, worker="taker")
    assert taker.sync(record).busy

    outcome = wait_for(
        lambda: (o := taker.sync(record)) and not o.busy and o, timeout=10, what="takeover"
    )
    assert outcome.metric_points == 1 and outcome.state == SYNCED
    (run,) = sink.runs.values()
    assert sorted(p[1] for p in run["points"]) == [1, 2, 3]
    record.close()


def test_a_lease_of_a_dead_process_of_this_host_is_taken_over_at_once(ledger: Ledger) -> None:
    """A SIGKILLed service restarts and continues at once, without waiting for the TTL."""
    import socket
    import subprocess
    import sys

    gone = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    dead = f"{socket.gethostname()}:{gone}:a"
    assert isinstance(ledger.acquire_lease(SOURCE, dead, ttl=600), Lease)
    restarted = ledger.acquire_lease(SOURCE, f"{socket.gethostname()}:{1}:b", ttl=30)
    assert isinstance(restarted, Lease)
    # a live holder (this process) or one on another host keeps its lease until it expires
    alive = f"{socket.gethostname()}:{1}:c"
    assert isinstance(ledger.acquire_lease(SOURCE, alive, ttl=30), LeaseHolder)
    elsewhere = "another-host:12345:d"
    ledger.release_lease(restarted)
    assert isinstance(ledger.acquire_lease(SOURCE, elsewhere, ttl=600), Lease)
    assert isinstance(ledger.acquire_lease(SOURCE, alive, ttl=30), LeaseHolder)


def test_the_heartbeat_keeps_a_held_lease_and_reports_one_taken_over(ledger: Ledger) -> None:
    progressing = threading.Event()
    progressing.set()
    mine = ledger.acquire_lease(SOURCE, "host:1:a", ttl=1.0)
    assert isinstance(mine, Lease)
    beat = LeaseHeartbeat(ledger, name="a", progressing=progressing.is_set)
    beat.hold(mine)
    wait_for(lambda: beat.renewals >= 4, 10, what="renewals past the ttl")
    assert isinstance(ledger.acquire_lease(SOURCE, "host:2:b", ttl=30), LeaseHolder)
    beat.check()  # still ours
    # a wedged worker (no progress) is not renewed: the lease expires and is taken over
    progressing.clear()

    def taken() -> Lease | None:
        got = ledger.acquire_lease(SOURCE, "host:2:b", ttl=30)
        return got if isinstance(got, Lease) else None

    theirs = wait_for(taken, 10, what="the unrenewed lease taken over")
    progressing.set()
    wait_for(lambda: _raises_lost(beat), 10, what="the heartbeat finding the lease lost")
    held = ledger.lease_of(SOURCE)
    assert held is not None and held[0] == theirs.owner  # a lost lease is not renewed back
    beat.release()
    ledger.release_lease(theirs)
    # a new hold after a loss starts clean
    again = ledger.acquire_lease(SOURCE, "host:1:a", ttl=1.0)
    assert isinstance(again, Lease)
    before = beat.renewals
    beat.hold(again)
    wait_for(lambda: beat.renewals > before, 10, what="renewals of the new lease")
    beat.check()
    beat.release()
    ledger.release_lease(again)
    assert ledger.lease_of(SOURCE) is None


def _raises_lost(beat: LeaseHeartbeat) -> bool:
    try:
        beat.check()
    except LeaseLost:
        return True
    return False


def test_a_run_intent_is_noted_once_fenced_by_the_lease_and_outlives_a_resync(
    ledger: Ledger,
) -> None:
    """The first worker about to create a record's run learns it is the first; any later
    one (a retry, a takeover, a resync) learns a run may already exist."""
    mine = ledger.acquire_lease(SOURCE, "host:1:a", ttl=30)
    assert isinstance(mine, Lease)
    assert ledger.note_run_intent("rec-1", mine) is True
    assert ledger.note_run_intent("rec-1", mine) is False
    ledger.commit(
        Progress(record=RecordRow(source=SOURCE, record_id="rec-1", state=SYNCED), kind="applied"),
        mine,
    )
    assert ledger.forget([SOURCE]) == [SOURCE]
    assert ledger.note_run_intent("rec-1", mine) is False  # the run it announced may exist
    ledger.release_lease(mine)
    # a worker whose lease was taken over notes nothing
    stale = Lease(SOURCE, "host:9:gone", 30)
    with pytest.raises(LeaseLost):
        ledger.note_run_intent("rec-2", stale)
    theirs = ledger.acquire_lease(SOURCE, "host:2:b", ttl=30)
    assert isinstance(theirs, Lease)
    assert ledger.note_run_intent("rec-2", theirs) is True
