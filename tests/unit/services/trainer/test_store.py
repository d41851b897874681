"""RunStore: the same tests against SQLite and a real PostgreSQL server."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest

from services.trainer.store import (
    COARSE_STEPS,
    MAX_HISTORY_ABS,
    PostgresRunStore,
    RunEvent,
    RunRecord,
    RunStore,
    RunStoreError,
    SqliteRunStore,
    open_store,
    parse_filter,
)
from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.errors import InvalidArgumentError
from tests.support.postgres import pg_dsn, pg_server  # noqa: F401  (fixtures)


@pytest.fixture(params=["sqlite", "postgresql"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> RunStore:
    if request.param == "sqlite":
        s: RunStore = SqliteRunStore(tmp_path / "runs.sqlite3")
    else:
        s = PostgresRunStore(request.getfixturevalue("pg_dsn"))
    yield s
    s.close()


def rec(run_id: str, *, task: str = "spiral", state: int = cpb.RUN_STATE_COMPLETED, created: float = 0.0,
        name: str = "", tags: tuple[str, ...] = (), notes: str = "", step: int = 0) -> RunRecord:
    return RunRecord(run_id, task, state, {"learning_rate": 0.03}, {"dataset": "spiral"}, 7,
                     created or time.time(), created or time.time(), step=step, name=name, tags=tags,
                     notes=notes, metrics={"loss": 0.5}, publish_as=("spiral",))


def test_runs_round_trip_and_upsert(store: RunStore) -> None:
    r = rec("a1", name="first", tags=("best", "lr"), notes="note %_ \\ x", step=5)
    store.put_runs([r])
    assert store.get_run("a1") == r
    r.state, r.step, r.checkpoint_step, r.error = cpb.RUN_STATE_FAILED, 9, 8, "ValueError: boom"
    store.put_runs([r])
    got = store.get_run("a1")
    assert got is not None and (got.state, got.step, got.checkpoint_step, got.error) == (
        cpb.RUN_STATE_FAILED, 9, 8, "ValueError: boom")
    assert store.get_run("nope") is None


def test_events_in_order(store: RunStore) -> None:
    store.put_runs([rec("e1")])
    store.add_events([RunEvent("e1", 1.0, "state", 0, {"to": "RUN_STATE_RUNNING"}),
                      RunEvent("e1", 2.0, "checkpoint", 100, {"models": {"run-e1": 1}})])
    events = store.events("e1")
    assert [(e.kind, e.step) for e in events] == [("state", 0), ("checkpoint", 100)]
    assert events[1].detail == {"models": {"run-e1": 1}}


def test_scalars_raw_and_downsampled_over_equal_step_spans(store: RunStore) -> None:
    store.put_runs([rec("s1")])
    rows = [("s1", "loss", step, 1.0 / step) for step in range(1, 6_001)]  # raw: < 4 * 16 * 100
    rows += [("s1", "accuracy", step, step / 100) for step in range(1, 101)]
    store.add_scalars(rows)
    store.add_scalars([("s1", "loss", 1, 5.0)])  # a step written again replaces its value
    out = store.scalars("s1", max_points=100)
    acc = out["accuracy"]
    assert [b.step for b in acc] == list(range(1, 101)) and all(b.count == 1 for b in acc)
    loss = out["loss"]
    assert len(loss) == 100
    assert sum(b.count for b in loss) == 6_000  # every point is in a bucket
    assert all(b.step - b.first_step + 1 == 60 for b in loss)  # equal spans
    assert loss[0].hi == 5.0 and loss[0].lo == pytest.approx(1 / 60)
    assert loss[-1].first_step == 5941 and loss[-1].step == 6_000
    assert loss[50].lo <= loss[50].mean <= loss[50].hi
    assert set(store.scalars("s1", 100, names=["accuracy"])) == {"accuracy"}
    store.truncate_scalars("s1", 50)
    assert store.scalars("s1", 1000)["accuracy"][-1].step == 50
    with pytest.raises(InvalidArgumentError, match="max_points"):
        store.scalars("s1", 1)


def test_list_runs_filter_order_and_pages(store: RunStore) -> None:
    store.put_runs([
        rec("r1", task="spiral", state=cpb.RUN_STATE_COMPLETED, created=100, name="lr sweep 1", tags=("best",)),
        rec("r2", task="spiral", state=cpb.RUN_STATE_RUNNING, created=200, name="lr sweep 2"),
        rec("r3", task="anomaly", state=cpb.RUN_STATE_FAILED, created=300, name="other", notes="Weird LOSS"),
        rec("r4", task="anomaly", state=cpb.RUN_STATE_INTERRUPTED, created=400, name="x_y%z"),
    ])
    def ids(page):
        return [r.run_id for r in page.runs]
    assert ids(store.list_runs()) == ["r1", "r2", "r3", "r4"]
    assert ids(store.list_runs(order_by="created_at desc")) == ["r4", "r3", "r2", "r1"]
    assert ids(store.list_runs('task = "spiral"')) == ["r1", "r2"]
    assert ids(store.list_runs("state = RUNNING")) == ["r2"]
    assert ids(store.list_runs("state != RUN_STATE_RUNNING AND task = anomaly")) == ["r3", "r4"]
    assert ids(store.list_runs("name:sweep")) == ["r1", "r2"]
    assert ids(store.list_runs('tags:"best"')) == ["r1"]
    assert ids(store.list_runs("loss")) == ["r3"]  # a bare word searches name, tags, notes
    assert ids(store.list_runs("name:%")) == ["r4"]  # LIKE wildcards are literal
    assert ids(store.list_runs("name:_")) == ["r4"]
    first = store.list_runs(page_size=3, order_by="name")
    assert len(first.runs) == 3 and first.next_page_token and first.total_size == 4
    second = store.list_runs(page_size=3, order_by="name", page_token=first.next_page_token)
    assert len(second.runs) == 1 and not second.next_page_token
    assert set(ids(first) + ids(second)) == {"r1", "r2", "r3", "r4"}
    with pytest.raises(InvalidArgumentError, match="another filter or order_by"):
        store.list_runs(page_size=3, order_by="step", page_token=first.next_page_token)
    for bad, message in [("color = red", "unknown field 'color'"), ("state = SLEEPING", "unknown state"),
                         ("a OR b", "OR is not supported"), ('name = "open', "cannot parse"),
                         ("tags = x", "tags takes")]:
        with pytest.raises(InvalidArgumentError, match=message):
            store.list_runs(bad)
    with pytest.raises(InvalidArgumentError, match="order_by"):
        store.list_runs(order_by="loss desc")
    with pytest.raises(InvalidArgumentError, match="page_token"):
        store.list_runs(page_token="garbage!")
    with pytest.raises(InvalidArgumentError, match="page_size"):
        store.list_runs(page_size=-1)


def test_mark_interrupted_delete_and_prune(store: RunStore) -> None:
    store.put_runs([rec("live", state=cpb.RUN_STATE_RUNNING, created=1),
                    rec("paused", state=cpb.RUN_STATE_PAUSED, created=2),
                    rec("done1", created=3), rec("done2", created=4), rec("done3", created=5)])
    store.add_scalars([("done1", "loss", 1, 1.0)])
    assert sorted(store.mark_interrupted(99.0)) == ["live", "paused"]
    live = store.get_run("live")
    assert live is not None and live.state == cpb.RUN_STATE_INTERRUPTED and live.ended_at == 99.0
    assert store.events("live")[-1].detail["to"] == "RUN_STATE_INTERRUPTED"
    assert store.mark_interrupted(100.0) == []
    # Keep the newest 3 ended runs (INTERRUPTED ones count as ended).
    assert sorted(store.prune(3)) == ["live", "paused"]
    assert store.delete_run("done1") and store.scalars("done1") == {}
    assert not store.delete_run("done1")
    assert [r.run_id for r in store.list_runs().runs] == ["done2", "done3"]


def test_sqlite_corrupt_or_locked_file_is_an_error_then_recovers(tmp_path: Path) -> None:
    path = tmp_path / "runs.sqlite3"
    path.write_bytes(b"this is not a database" * 100)
    store = SqliteRunStore(path, timeout_s=0.2)
    with pytest.raises(RunStoreError, match="unavailable.*not a database"):
        store.put_runs([rec("c1")])
    path.unlink()
    store.put_runs([rec("c1")])  # the connection was re-opened: a new file
    assert store.get_run("c1") is not None
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        with pytest.raises(RunStoreError, match="locked"):
            store.put_runs([rec("c2")])
    finally:
        holder.rollback()
        holder.close()
    store.put_runs([rec("c2")])
    assert store.get_run("c2") is not None
    store.close()


def test_unreachable_postgres_is_an_error() -> None:
    pytest.importorskip("psycopg")
    store = PostgresRunStore("postgresql://nobody:secret@127.0.0.1:1/none", connect_timeout_s=1)
    assert "secret" not in store.description
    with pytest.raises(RunStoreError, match="unavailable"):
        store.get_run("x")


def test_open_store_specs(tmp_path: Path) -> None:
    assert open_store("none", tmp_path / "x") is None
    assert isinstance(open_store("", tmp_path / "d.sqlite3"), SqliteRunStore)
    assert isinstance(open_store(str(tmp_path / "e.db"), tmp_path / "d"), SqliteRunStore)
    with pytest.raises(InvalidArgumentError, match="postgresql://"):
        open_store("mysql://x", tmp_path)
    assert parse_filter("") == []


def test_a_long_series_is_read_from_its_blocks_exactly(store: RunStore) -> None:
    store.put_runs([rec("long")])
    n = 20_000  # >= 4 * 32 * 100 steps (< 4 * 64 * 100): the 32-step blocks answer
    for lo in range(1, n + 1, 5000):  # in batches, as the recorder writes
        store.add_scalars([("long", "loss", s, float(s % 97)) for s in range(lo, lo + 5000)])
    store.add_scalars([("long", "loss", 7, 1000.0)])  # written again: replaced, counted once
    buckets = store.scalars("long", 100)["loss"]
    assert 90 <= len(buckets) <= 101
    assert sum(b.count for b in buckets) == n
    assert buckets[0].first_step == 1 and buckets[-1].step == n
    assert buckets[0].hi == 1000.0 and min(b.lo for b in buckets) == 0.0
    spans = [b.step - b.first_step + 1 for b in buckets[1:-1]]
    assert max(spans) - min(spans) <= 32  # equal spans, to a block
    mean = sum(b.mean * b.count for b in buckets) / n
    exact = (sum(float(s % 97) for s in range(1, n + 1)) - 7 % 97 + 1000.0) / n
    assert mean == pytest.approx(exact)
    store.truncate_scalars("long", 10_005)
    after = store.scalars("long", 100)["loss"]
    assert after[-1].step == 10_005 and sum(b.count for b in after) == 10_005


def test_a_step_given_twice_in_one_batch_keeps_the_last_value(store: RunStore) -> None:
    store.put_runs([rec("twice")])
    store.add_scalars([("twice", "loss", s, float(s)) for s in range(1, 201)]
                      + [("twice", "loss", 3, 30.0), ("twice", "acc", 1, 0.5), ("twice", "loss", 3, 300.0)])
    raw = store.scalars("twice", 1000)
    assert [b.mean for b in raw["loss"][:4]] == [1.0, 2.0, 300.0, 4.0]
    assert len(raw["loss"]) == 200 and [b.mean for b in raw["acc"]] == [0.5]
    merged = store.scalars("twice", 2)["loss"]  # from the blocks: each step counted once
    assert sum(b.count for b in merged) == 200 and max(b.hi for b in merged) == 300.0


def test_each_series_keeps_its_extremes_through_writes_and_truncation(store: RunStore) -> None:
    store.put_runs([rec("ext"), rec("quiet")])
    for lo in range(1, 3001, 1000):  # in batches, as the recorder writes
        store.add_scalars([("ext", "loss", s, float(s)) for s in range(lo, lo + 1000)]
                          + [("ext", "acc", s, -float(s)) for s in range(lo, lo + 1000)])
    # A step given twice in one batch counts with its last value only.
    store.add_scalars([("ext", "loss", 3001, 9000.0), ("ext", "loss", 3001, 0.5)])
    assert store.extremes(["ext", "quiet", "nope"]) == {
        ("ext", "loss"): (0.5, 3000.0), ("ext", "acc"): (-3000.0, -1.0)}
    # A resumed run's history is cut back: its extremes are those of what is left.
    store.truncate_scalars("ext", 1234)
    assert store.extremes(["ext"]) == {("ext", "loss"): (1.0, 1234.0), ("ext", "acc"): (-1234.0, -1.0)}
    store.delete_run("ext")
    assert store.extremes(["ext"]) == {}


def test_a_store_from_before_the_series_extremes_gets_them_on_open(store: RunStore) -> None:
    store.put_runs([rec("old")])
    store.add_scalars([("old", "loss", s, float((s * 37) % 101)) for s in range(1, 501)])
    with store._tx() as cur:  # the series table as the first release made it
        cur.execute("ALTER TABLE series DROP COLUMN lo")
        cur.execute("ALTER TABLE series DROP COLUMN hi")
    store.close()
    assert store.extremes(["old"]) == {("old", "loss"): (0.0, 100.0)}  # re-opened: filled from the blocks
    store.add_scalars([("old", "loss", 501, 200.0)])
    assert store.extremes(["old"]) == {("old", "loss"): (0.0, 200.0)}


def _levels_match_points(store: RunStore, run_id: str) -> int:
    """Every coarse block level holds exactly the aggregate of the points under it."""
    levels = 0
    with store._tx() as cur:
        for steps in (16, *COARSE_STEPS):
            table = "scalar_blocks" if steps == 16 else f"scalar_blocks_{steps}"
            cur.execute(store._sql(
                f"SELECT name, block, first_step, last_step, lo, hi, n FROM {table} WHERE run_id = ? "
                "ORDER BY name, block"), (run_id,))
            got = [tuple(r) for r in cur.fetchall()]
            cur.execute(store._sql(
                f"SELECT name, step / {steps}, MIN(step), MAX(step), MIN(value), MAX(value), COUNT(*) "
                f"FROM scalars WHERE run_id = ? GROUP BY name, step / {steps} ORDER BY name, step / {steps}"),
                (run_id,))
            assert got == [tuple(r) for r in cur.fetchall()], table
            levels += bool(got)
    return levels


def test_coarse_block_levels_stay_exact_and_a_long_history_reads_few_rows(store: RunStore) -> None:
    store.put_runs([rec("pyr")])
    n = 9_000
    at = 1
    for size in (1, 37, 1000, 2963, 5000 - 1):  # uneven batches: edges fall mid-block
        store.add_scalars([("pyr", "loss", s, float((s * 7) % 113)) for s in range(at, at + size)])
        at += size
    store.add_scalars([("pyr", "loss", 300, 5000.0)])  # a step written again
    assert _levels_match_points(store, "pyr") == 1 + len(COARSE_STEPS)
    coarse = store.scalars("pyr", 2)["loss"]  # span >= 4 * 1024 * 2: from the 1024-step level
    assert sum(b.count for b in coarse) == n and max(b.hi for b in coarse) == 5000.0
    assert coarse[0].first_step == 1 and coarse[-1].step == n
    store.truncate_scalars("pyr", 5_555)  # a cut inside a block of every level
    assert _levels_match_points(store, "pyr") == 1 + len(COARSE_STEPS)
    assert sum(b.count for b in store.scalars("pyr", 2)["loss"]) == 5_555


def test_a_store_from_before_the_coarse_levels_gets_them_on_open(store: RunStore) -> None:
    store.put_runs([rec("older")])
    store.add_scalars([("older", "loss", s, float(s % 31)) for s in range(1, 3001)])
    with store._tx() as cur:
        for steps in COARSE_STEPS:
            cur.execute(f"DROP TABLE scalar_blocks_{steps}")
    store.close()
    assert _levels_match_points(store, "older") == 1 + len(COARSE_STEPS)  # re-opened: built once


def test_a_batch_of_many_series_and_runs_with_rewritten_steps_stays_exact(store: RunStore) -> None:
    """One batch holds many series of several runs (PostgreSQL writes each block level
    of all of them in one statement); steps written again in a later batch replace
    only themselves, also between sparse steps and after a truncation."""
    store.put_runs([rec("m1"), rec("m2")])
    names = [f"metric_{i}" for i in range(12)]
    want: dict[tuple[str, str, int], float] = {}
    seen: dict[tuple[str, str], list[float]] = {}  # extremes: every value written since a cut

    def write(points: list[tuple[str, str, int, float]]) -> None:
        store.add_scalars(points)
        want.update({(r, n, s): v for r, n, s, v in points})
        for r, n, _, v in points:
            seen.setdefault((r, n), []).append(v)

    write([(r, n, s, float(s * (i + 1))) for r in ("m1", "m2") for i, n in enumerate(names)
           for s in range(1, 701)] + [("m1", "sparse", s, float(s)) for s in range(10, 1001, 10)])
    # Rewritten steps in a later batch, mid-block and across blocks, of a few series;
    # steps between sparse ones; new steps after the end.
    write([("m1", "metric_3", s, -float(s)) for s in range(95, 140)]
          + [("m2", "metric_0", 1, 1e6), ("m1", "sparse", 15, 0.25), ("m1", "sparse", 500, 7.0)]
          + [("m2", "metric_11", s, 0.5) for s in range(701, 750)])
    store.truncate_scalars("m1", 333)  # a resumed run: its history cut back, then rewritten
    want = {k: v for k, v in want.items() if k[0] != "m1" or k[2] <= 333}
    for key in [k for k in seen if k[0] == "m1"]:
        seen[key] = [v for k, v in want.items() if k[:2] == key]
    write([("m1", n, s, 3.0) for n in names[:5] for s in range(300, 400)])
    for run_id in ("m1", "m2"):
        got = {(run_id, n, b.step): b.mean for n, bs in store.scalars(run_id, 10_000).items() for b in bs}
        assert got == {k: v for k, v in want.items() if k[0] == run_id}, run_id
        assert _levels_match_points(store, run_id) == 1 + len(COARSE_STEPS)
        assert store.extremes([run_id]) == {
            k: (min(v), max(v)) for k, v in seen.items() if k[0] == run_id}, run_id


def test_points_keep_their_exact_values_and_any_series_name(store: RunStore) -> None:
    """Values read back as the same doubles (PostgreSQL receives them as text), series
    names with the characters of array syntax stay whole."""
    import math
    import random

    rng = random.Random(15)
    odd = ['a"b', "c,d", "{e}", "f\\g", "h i", "NULL", ""]
    values = [rng.uniform(-1e6, 1e6) for _ in range(300)] + [
        1e-300, -1e-300, 5e-324, 1.7976931348623157e308, -0.0, math.inf, 0.1 + 0.2]
    store.put_runs([rec("x,\"1"), rec("plain")])
    store.add_scalars([("x,\"1", name, s, v) for name in odd for s, v in enumerate(values, 1)]
                      + [("plain", "loss", 1, 2.5)])
    got = store.scalars("x,\"1", 10_000)
    assert sorted(got) == sorted(odd)
    # SQLite keeps the finite points only (it cannot store a NaN; see the next test), and
    # neither keeps a finite point beyond MAX_HISTORY_ABS (test_huge_finite_points_...)
    kept = [(s, v) for s, v in enumerate(values, 1)
            if (isinstance(store, PostgresRunStore) or math.isfinite(v))
            and not (math.isfinite(v) and abs(v) > MAX_HISTORY_ABS)]
    for name in odd:
        assert [b.step for b in got[name]] == [s for s, _ in kept]
        assert [b.mean for b in got[name]] == [v for _, v in kept]  # == : bit-exact but for -0.0 == 0.0
    assert store.scalars("plain", 10)["loss"][0].mean == 2.5
    if isinstance(store, PostgresRunStore):  # SQLite: -0.0 reads back 0.0
        assert math.copysign(1, got["a\"b"][len(kept) - 3].mean) == -1  # the -0.0
        store.add_scalars([("plain", "loss", 2, math.nan)])
        assert math.isnan(store.scalars("plain", 10)["loss"][1].mean)


def test_non_finite_points_never_fail_a_batch(store: RunStore) -> None:
    """A NaN loss, or +inf and -inf in one block, is written with its batch (SQLite:
    left out of the history, which keeps the batch's finite points)."""
    import math

    store.put_runs([rec("r")])
    store.write(records=[rec("r", step=5)], rows=[("r", "loss", 1, 1.0), ("r", "loss", 2, math.nan),
                                                  ("r", "loss", 3, math.inf), ("r", "loss", 4, -math.inf),
                                                  ("r", "acc", 1, 0.5)])
    store.add_scalars([("r", "loss", 5, 0.25)])
    got = store.scalars("r", 64)
    assert store.get_run("r").step == 5  # type: ignore[union-attr]
    assert got["acc"][0].mean == 0.5
    steps = [b.step for b in got["loss"]]
    assert steps[0] == 1 and steps[-1] == 5 and got["loss"][-1].mean == 0.25
    if isinstance(store, PostgresRunStore):
        assert steps == [1, 2, 3, 4, 5]


def test_huge_finite_points_never_fail_a_batch(store: RunStore) -> None:
    """Finite points near the float limit: a block's or a coarse level's sum of them
    must not overflow to +inf and -inf in one sum (SQLite: NaN, which it stores as
    NULL) or to an error (PostgreSQL raises on float8 overflow)."""
    import math

    store.put_runs([rec("r")])
    big = 1.5e308
    rows = [("r", "loss", step, big) for step in range(1, 33)]            # blocks 0-1: +inf sums
    rows += [("r", "loss", step, -big) for step in range(33, 65)]         # blocks 2-3: -inf sums
    rows += [("r", "loss", 65, 1.0)]
    store.write(records=[rec("r", step=65)], rows=rows)
    store.add_scalars([("r", "loss", 66, 0.5)])
    got = store.scalars("r", 64)
    assert store.get_run("r").step == 65  # type: ignore[union-attr]
    assert got["loss"][-1].step == 66 and got["loss"][-1].mean == 0.5
    assert store.scalars("r", 2)["loss"]  # the coarse read answers too
    # Just inside the bound every point is kept, and its sums stay finite.
    edge = [("r", "edge", step, MAX_HISTORY_ABS * (-1) ** step) for step in range(1, 200)]
    store.add_scalars(edge)
    assert [b.mean for b in store.scalars("r", 1000)["edge"]] == [v for *_, v in edge]
    assert all(math.isfinite(b.mean) for b in store.scalars("r", 3)["edge"])
