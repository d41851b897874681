"""RunStore: runs, their events and their full scalar history, in a database.

Two backends behind one small interface (:class:`RunStore`):

- :class:`SqliteRunStore` — stdlib ``sqlite3`` in WAL mode, one file under the
  trainer's data dir: the embedded default;
- :class:`PostgresRunStore` — psycopg 3, for several trainer replicas sharing one
  run list (``--run-store postgresql://...``).

Both speak the same SQL (placeholders are written ``?`` and translated), so the
queries — upserts, the AIP-160 filter, the AIP-132 ordering, the down-sampling
of scalar history into min/mean/max buckets over equal step spans — exist once.
Calls are synchronous and blocking: the recorder's thread makes the writes
(:mod:`services.trainer.recorder`), RPC handlers make the reads with
``asyncio.to_thread``; a lock serialises the one connection. Every database
failure surfaces as :class:`RunStoreError` (UNAVAILABLE), and the connection is
dropped and re-opened on the next call, so a store that comes back is used again.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import logging
import math
import re
import sqlite3
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tensorwire.common.v1 import common_pb2 as cpb
from tensorwire.data.scalars import Bucket
from tensorwire.errors import InvalidArgumentError, UnavailableError

log = logging.getLogger(__name__)

LIVE_STATES = (cpb.RUN_STATE_PENDING, cpb.RUN_STATE_RUNNING, cpb.RUN_STATE_PAUSED)
"""States of a run that a trainer process is training (lost when it exits)."""

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


class RunStoreError(UnavailableError):
    """The run store cannot be reached or used (locked, corrupt, down)."""


@dataclass(frozen=True)
class BestMetric:
    """The best value so far of a run's main metric."""

    name: str
    value: float
    higher_is_better: bool = False


@dataclass
class RunRecord:
    """What the store keeps of one run (the row of table ``runs``)."""

    run_id: str
    task: str
    state: int
    params: dict[str, float]
    options: dict[str, str]
    seed: int
    created_at: float
    updated_at: float
    step: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    checkpoint_step: int = 0
    name: str = ""
    tags: tuple[str, ...] = ()
    notes: str = ""
    publish_as: tuple[str, ...] = ()
    ended_at: float = 0.0
    steps_per_second: float = 0.0
    """Live only (not stored)."""
    produced_at: float = 0.0
    """Live only (not stored): when ``step`` was produced."""
    best: BestMetric | None = None
    """Read from the scalar history when runs are listed (not a column)."""


@dataclass(frozen=True)
class RunEvent:
    """Something that happened to a run: ``kind`` is state | params | checkpoint |
    labels | resumed; ``detail`` is a small JSON object."""

    run_id: str
    at: float
    kind: str
    step: int = 0
    detail: Mapping[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class RunPage:
    runs: list[RunRecord]
    next_page_token: str = ""
    total_size: int = 0


# -- AIP-160 filter and AIP-132 order_by ------------------------------------------

_FILTER_FIELDS = ("state", "task", "name", "tags", "run_id")
_ORDER_FIELDS = {
    "created_at": "created_at", "updated_at": "updated_at", "name": "name", "task": "task",
    "state": "state", "step": "step", "run_id": "run_id",
}
_TERM = re.compile(
    r"""\s*(?:(?P<field>[A-Za-z_]+)\s*(?P<op>!=|=|:)\s*)?"""
    r"""(?P<value>"(?:[^"\\]|\\.)*"|[^\s"()]+)\s*"""
)


@dataclass(frozen=True)
class Condition:
    """One term of a filter: ``field op value`` (field '' = a global search)."""

    field: str
    op: str
    value: str | int


def _state_value(raw: str) -> int:
    name = raw.upper()
    if not name.startswith("RUN_STATE_"):
        name = "RUN_STATE_" + name
    try:
        return cpb.RunState.Value(name)
    except ValueError:
        known = ", ".join(n.removeprefix("RUN_STATE_") for n in cpb.RunState.keys()[1:])
        raise InvalidArgumentError(f"filter: unknown state {raw!r}; known: {known}") from None


def parse_filter(text: str) -> list[Condition]:
    """An AIP-160 filter: terms joined by AND (or juxtaposed). Fields: state (=, !=),
    task (=, !=), name (=, !=, ':' = contains), tags (':' = has the tag), run_id (=);
    a bare word or "quoted phrase" searches name, tags and notes."""
    text = text.strip()
    if len(text) > 1000:
        raise InvalidArgumentError(f"filter is {len(text)} characters long; at most 1000")
    out: list[Condition] = []
    pos = 0
    while pos < len(text):
        m = _TERM.match(text, pos)
        if m is None or m.end() == pos:
            raise InvalidArgumentError(f"filter: cannot parse {text[pos:]!r}")
        pos = m.end()
        field_, op, value = m.group("field"), m.group("op"), m.group("value")
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if field_ is None:
            if value == "AND":
                continue
            if value in ("OR", "NOT") or value.startswith("-"):
                raise InvalidArgumentError(f"filter: {value} is not supported; join terms with AND")
            out.append(Condition("", ":", value))
            continue
        field_ = field_.lower()
        if field_ not in _FILTER_FIELDS:
            raise InvalidArgumentError(
                f"filter: unknown field {field_!r}; known: {', '.join(_FILTER_FIELDS)}"
            )
        if field_ == "state":
            if op == ":":
                raise InvalidArgumentError("filter: state takes = or !=")
            out.append(Condition(field_, op, _state_value(value)))
        elif field_ == "tags" and op != ":":
            raise InvalidArgumentError('filter: tags takes ":" (tags:"best")')
        elif field_ in ("task", "run_id") and op == ":":
            raise InvalidArgumentError(f"filter: {field_} takes = or !=")
        else:
            out.append(Condition(field_, op, value))
    return out


def parse_order_by(text: str) -> list[tuple[str, bool]]:
    """AIP-132 order_by: ``field [desc], ...`` -> [(column, descending)]."""
    out: list[tuple[str, bool]] = []
    for part in (p.strip() for p in text.split(",")):
        if not part:
            continue
        words = part.split()
        if len(words) > 2 or (len(words) == 2 and words[1].lower() not in ("asc", "desc")):
            raise InvalidArgumentError(f"order_by: {part!r} is not 'field' or 'field desc'")
        column = _ORDER_FIELDS.get(words[0].lower())
        if column is None:
            raise InvalidArgumentError(
                f"order_by: unknown field {words[0]!r}; known: {', '.join(_ORDER_FIELDS)}"
            )
        out.append((column, len(words) == 2 and words[1].lower() == "desc"))
    return out or [("created_at", False)]


def _like(value: str) -> str:
    return "%" + value.lower().replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


def filter_sql(conditions: Sequence[Condition]) -> tuple[str, list[Any]]:
    """The WHERE clause (with ``?`` placeholders) of parsed conditions."""
    clauses: list[str] = []
    args: list[Any] = []
    for c in conditions:
        if c.field == "":
            clauses.append(
                "(LOWER(name) LIKE ? ESCAPE '\\' OR LOWER(tags) LIKE ? ESCAPE '\\' "
                "OR LOWER(notes) LIKE ? ESCAPE '\\')"
            )
            args += [_like(str(c.value))] * 3
        elif c.field == "tags":
            clauses.append("LOWER(tags) LIKE ? ESCAPE '\\'")
            args.append(_like(json.dumps(str(c.value))))
        elif c.op == ":":  # name contains
            clauses.append(f"LOWER({c.field}) LIKE ? ESCAPE '\\'")
            args.append(_like(str(c.value)))
        else:
            clauses.append(f"{c.field} {'=' if c.op == '=' else '<>'} ?")
            args.append(c.value)
    return (" WHERE " + " AND ".join(clauses)) if clauses else "", args


def matches(record: RunRecord, conditions: Sequence[Condition]) -> bool:
    """Whether ``record`` passes the conditions (the same meaning as filter_sql)."""
    for c in conditions:
        if c.field == "":
            needle = str(c.value).lower()
            hay = (record.name, json.dumps(list(record.tags)), record.notes)
            if not any(needle in h.lower() for h in hay):
                return False
        elif c.field == "tags":
            if str(c.value).lower() not in (t.lower() for t in record.tags):
                return False
        else:
            have = getattr(record, c.field)
            if c.op == ":":
                if str(c.value).lower() not in str(have).lower():
                    return False
            elif (have == c.value) != (c.op == "="):
                return False
    return True


def _token_key(filter_: str, order_by: str) -> str:
    return hashlib.sha256(f"{filter_}\0{order_by}".encode()).hexdigest()[:16]


def encode_page_token(offset: int, filter_: str, order_by: str) -> str:
    raw = json.dumps({"o": offset, "k": _token_key(filter_, order_by)}).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_page_token(token: str, filter_: str, order_by: str) -> int:
    """The offset of a page token; INVALID_ARGUMENT if it is not ours or was made
    for another filter/order_by (AIP-158)."""
    if not token:
        return 0
    try:
        data = json.loads(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
        offset, key = int(data["o"]), str(data["k"])
    except (ValueError, KeyError, TypeError, binascii.Error):
        raise InvalidArgumentError("page_token is not a token this server gave out") from None
    if key != _token_key(filter_, order_by) or offset < 0:
        raise InvalidArgumentError(
            "page_token was made for another filter or order_by; start again without it"
        )
    return offset


def check_page_size(page_size: int) -> int:
    if page_size < 0:
        raise InvalidArgumentError(f"page_size must be >= 0, got {page_size}")
    return min(page_size or DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)


# -- the interface -----------------------------------------------------------------


ScalarRow = tuple[str, str, int, float]
"""(run_id, series, step, value)."""


class RunStore(ABC):
    """Where runs, events and scalar history live. Blocking calls; thread-safe."""

    description: str = "run store"

    @abstractmethod
    def write(self, records: Sequence[RunRecord] = (), events: Sequence[RunEvent] = (),
              rows: Sequence[ScalarRow] = ()) -> None:
        """One batch, all or nothing: runs inserted or replaced, events appended,
        scalar points added (each step of a series is written once)."""

    def put_runs(self, records: Sequence[RunRecord]) -> None:
        self.write(records=records)

    def add_events(self, events: Sequence[RunEvent]) -> None:
        self.write(events=events)

    def add_scalars(self, rows: Sequence[ScalarRow]) -> None:
        self.write(rows=rows)

    @abstractmethod
    def get_run(self, run_id: str) -> RunRecord | None: ...

    @abstractmethod
    def list_runs(self, filter_: str = "", order_by: str = "", page_size: int = 0,
                  page_token: str = "") -> RunPage: ...

    @abstractmethod
    def events(self, run_id: str) -> list[RunEvent]: ...

    @abstractmethod
    def scalars(self, run_id: str, max_points: int = 1024, names: Iterable[str] = ()
                ) -> dict[str, list[Bucket]]:
        """Each series of the run in at most ``max_points`` buckets of equal step span
        (min/mean/max; raw points when there are few enough)."""

    @abstractmethod
    def extremes(self, run_ids: Sequence[str]) -> dict[tuple[str, str], tuple[float, float]]:
        """(lowest, highest) value of every stored series of the runs, by (run id, series)."""

    @abstractmethod
    def truncate_scalars(self, run_id: str, after_step: int) -> None:
        """Forget points after ``after_step`` (a run resumed from an older checkpoint)."""

    @abstractmethod
    def delete_run(self, run_id: str) -> bool:
        """Remove the run, its events and history; whether it existed."""

    @abstractmethod
    def mark_interrupted(self, at: float) -> list[str]:
        """Runs left in a live state by a trainer that exited become INTERRUPTED."""

    @abstractmethod
    def prune(self, keep: int) -> list[str]:
        """Delete all but the newest ``keep`` ended runs; the deleted ids."""

    @abstractmethod
    def close(self) -> None: ...


# -- the SQL both backends share ---------------------------------------------------

_RUN_COLUMNS = (
    "run_id", "task", "state", "params", "options", "seed", "created_at", "updated_at", "step",
    "metrics", "error", "checkpoint_step", "name", "tags", "notes", "publish_as", "ended_at",
)


def _row(rec: RunRecord) -> tuple[Any, ...]:
    return (
        rec.run_id, rec.task, rec.state, json.dumps(rec.params), json.dumps(rec.options), rec.seed,
        rec.created_at, rec.updated_at, rec.step, json.dumps(rec.metrics), rec.error,
        rec.checkpoint_step, rec.name, json.dumps(list(rec.tags)), rec.notes,
        json.dumps(list(rec.publish_as)), rec.ended_at,
    )


def _record(row: Sequence[Any]) -> RunRecord:
    v = dict(zip(_RUN_COLUMNS, row, strict=True))
    return RunRecord(
        run_id=v["run_id"], task=v["task"], state=int(v["state"]), params=json.loads(v["params"]),
        options=json.loads(v["options"]), seed=int(v["seed"]), created_at=float(v["created_at"]),
        updated_at=float(v["updated_at"]), step=int(v["step"]), metrics=json.loads(v["metrics"]),
        error=v["error"], checkpoint_step=int(v["checkpoint_step"]), name=v["name"],
        tags=tuple(json.loads(v["tags"])), notes=v["notes"],
        publish_as=tuple(json.loads(v["publish_as"])), ended_at=float(v["ended_at"]),
    )


_UPSERT_RUN = (
    f"INSERT INTO runs ({', '.join(_RUN_COLUMNS)}) VALUES ({', '.join('?' * len(_RUN_COLUMNS))}) "
    "ON CONFLICT (run_id) DO UPDATE SET "
    + ", ".join(f"{c} = excluded.{c}" for c in _RUN_COLUMNS[1:])
)
_UPSERT_SCALAR = (
    "INSERT INTO scalars (run_id, name, step, value) VALUES (?, ?, ?, ?) "
    "ON CONFLICT (run_id, name, step) DO UPDATE SET value = excluded.value"
)

BLOCK_STEPS = 16
"""Steps per pre-aggregated block (table scalar_blocks): a long series is
down-sampled from its blocks, 16 times fewer rows than its points."""
MAX_HISTORY_ABS = 1e280
"""The largest finite magnitude the scalar history keeps (see :meth:`SqlRunStore.write`)."""

_SET_BLOCK = (
    "ON CONFLICT (run_id, name, block) DO UPDATE SET first_step = excluded.first_step, "
    "last_step = excluded.last_step, total = excluded.total, lo = excluded.lo, hi = excluded.hi, "
    "n = excluded.n"
)


@dataclass(frozen=True)
class SpanSql:
    """How a statement picks the rows of some series between two keys: ``source``
    is its FROM clause, with ``{table}`` and ``{key}`` (the key column) to fill in.
    SQLite: one series per statement, executed for each (run_id, name, lo, end);
    PostgreSQL: every series in one statement, the spans sent as four arrays."""

    source: str

    def _from(self, table: str, key: str) -> str:
        return self.source.format(table=table, key=key)

    def upsert_blocks(self) -> str:
        # Blocks are (re)computed from their points (by primary key): exact whatever was
        # written twice or truncated. Every block from a series' first step in the
        # batch to its last.
        return (
            "INSERT INTO scalar_blocks (run_id, name, block, first_step, last_step, total, lo, hi, n) "
            f"SELECT run_id, name, step / {BLOCK_STEPS}, MIN(step), MAX(step), SUM(value), MIN(value), "
            f"MAX(value), COUNT(*) {self._from('scalars', 'step')} "
            f"GROUP BY run_id, name, step / {BLOCK_STEPS} " + _SET_BLOCK
        )

    def upsert_level(self, table: str, finer: str, ratio: int) -> str:
        """Rows of ``table`` from those of ``finer`` (``ratio`` of them each) whose
        blocks are in the spans: recomputed whole, like the blocks from their points."""
        return (
            f"INSERT INTO {table} (run_id, name, block, first_step, last_step, total, lo, hi, n) "
            f"SELECT run_id, name, block / {ratio}, MIN(first_step), MAX(last_step), SUM(total), MIN(lo), "
            f"MAX(hi), SUM(n) {self._from(finer, 'block')} "
            f"GROUP BY run_id, name, block / {ratio} " + _SET_BLOCK
        )

    def upsert_series(self) -> str:
        # Each series keeps the lowest and highest value written to it (a run's best metric
        # is then one row, whatever the length of its history): after each batch, from the
        # blocks it touched (just recomputed from their points: a step given twice counts
        # with the value kept). A step rewritten later with another value leaves its old
        # one counted; the recorder rewrites a step only with its own value, and a resumed
        # run is truncated first, which recomputes them (_SERIES_FROM_BLOCKS).
        return (
            f"INSERT INTO series (run_id, name, lo, hi) SELECT run_id, name, MIN(lo), MAX(hi) "
            f"{self._from('scalar_blocks', 'block')} GROUP BY run_id, name "
            "ON CONFLICT (run_id, name) DO UPDATE SET "
            "lo = CASE WHEN series.lo IS NULL OR excluded.lo < series.lo THEN excluded.lo ELSE series.lo END, "
            "hi = CASE WHEN series.hi IS NULL OR excluded.hi > series.hi THEN excluded.hi ELSE series.hi END "
            # Only a batch that goes past them writes the row (a plateau costs no page write).
            "WHERE series.lo IS NULL OR series.hi IS NULL OR excluded.lo < series.lo OR excluded.hi > series.hi"
        )


COARSE_STEPS = (32, 64, 128, 256, 512, 1024)
"""Steps per row of the coarser block tables (``scalar_blocks_<steps>``), each
made from the level below it (2 of its rows): a long series is down-sampled from
the coarsest level that still has at least 4 rows per bucket, so reading it costs
4 to 8 rows per bucket, not its length (1M steps, 1024 buckets: 7,813 rows per
series instead of 62,500 blocks; 128 buckets: 977). Each level costs a write one
more statement per batch (SQLite: per series and batch), and 1/32, 1/64... of the
points in rows.
A store opened by a trainer from before the levels gets them built once; a trainer
from before them that writes to a store after that leaves them behind its points
(several trainers on one PostgreSQL: upgrade them all together)."""

_LEVELS: tuple[tuple[str, int], ...] = (("scalar_blocks", BLOCK_STEPS),) + tuple(
    (f"scalar_blocks_{steps}", steps) for steps in COARSE_STEPS)
"""(table, steps per row), finest first."""


@dataclass(frozen=True)
class ScalarSql:
    """The statements that write a batch's blocks, coarse levels and series extremes."""

    blocks: str
    levels: tuple[tuple[str, int, int], ...]
    """(statement, steps per row, steps per row of the finer level), coarse in order."""
    series: str

    @classmethod
    def of(cls, spans: SpanSql) -> ScalarSql:
        return cls(spans.upsert_blocks(), tuple(
            (spans.upsert_level(table, finer, steps // finer_steps), steps, finer_steps)
            for (finer, finer_steps), (table, steps) in itertools.pairwise(_LEVELS)
        ), spans.upsert_series())


_SCALAR_TABLES = ("scalars",) + tuple(table for table, _ in _LEVELS)


def _block_table(table: str, types: tuple[str, str, str]) -> str:
    """The schema of one block level; ``types``: (integer, float, table suffix)."""
    integer, real, suffix = types
    return (f"CREATE TABLE IF NOT EXISTS {table} (run_id TEXT NOT NULL, name TEXT NOT NULL, "
            f"block {integer} NOT NULL, first_step {integer} NOT NULL, last_step {integer} NOT NULL, "
            f"total {real} NOT NULL, lo {real} NOT NULL, hi {real} NOT NULL, n {integer} NOT NULL, "
            f"PRIMARY KEY (run_id, name, block)){suffix}")


_SERIES_FROM_BLOCKS = (
    # Extremes again from the blocks (after a truncation; for a store written before
    # the series had them): WHERE chooses the rows.
    "UPDATE series SET lo = (SELECT MIN(b.lo) FROM scalar_blocks b WHERE b.run_id = series.run_id "
    "AND b.name = series.name), hi = (SELECT MAX(b.hi) FROM scalar_blocks b WHERE b.run_id = series.run_id "
    "AND b.name = series.name) WHERE "
)


def _block_spans(rows: Sequence[ScalarRow]) -> list[tuple[str, str, int, int]]:
    """(run_id, name, first step, end step) of the blocks each series of ``rows`` touched."""
    spans: dict[tuple[str, str], list[int]] = {}
    for run_id, name, step, _ in rows:
        span = spans.get((run_id, name))
        if span is None:
            spans[(run_id, name)] = [step, step]
        elif step < span[0]:
            span[0] = step
        elif step > span[1]:
            span[1] = step
    return [(run_id, name, lo - lo % BLOCK_STEPS, hi - hi % BLOCK_STEPS + BLOCK_STEPS)
            for (run_id, name), (lo, hi) in sorted(spans.items())]


_TERMINAL_SQL = ", ".join(
    str(s) for s in (cpb.RUN_STATE_STOPPED, cpb.RUN_STATE_FAILED, cpb.RUN_STATE_COMPLETED,
                     cpb.RUN_STATE_INTERRUPTED)
)
_LIVE_SQL = ", ".join(str(s) for s in LIVE_STATES)


class SqlRunStore(RunStore):
    """The queries, once; a backend supplies the connection, schema and placeholders."""

    schema: tuple[str, ...] = ()
    placeholder = "?"
    errors: tuple[type[BaseException], ...] = ()
    _scalar_sql = ScalarSql.of(SpanSql("FROM {table} WHERE run_id = ? AND name = ? AND {key} >= ? AND {key} < ?"))

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._conn: Any = None

    @abstractmethod
    def _connect(self) -> Any: ...

    def _migrate(self, cur: Any) -> None:
        """Bring a store written by an older trainer up to the schema (on connect)."""
        # Series got their extremes (lo, hi) after the first release: filled once
        # from the blocks (a series written since always has them).
        self._add_float_columns(cur, "series", ("lo", "hi"))
        cur.execute(_SERIES_FROM_BLOCKS + "lo IS NULL")
        # The coarse block levels came later: an empty level under a filled one is
        # built from it once (every write since fills them all).
        for (finer, finer_steps), (table, steps) in itertools.pairwise(_LEVELS):
            cur.execute(f"SELECT 1 FROM {table} LIMIT 1")
            if cur.fetchone() is not None:
                continue
            cur.execute(f"SELECT 1 FROM {finer} LIMIT 1")
            if cur.fetchone() is None:
                continue
            ratio = steps // finer_steps
            log.info("%s: building %s from %s (once)", self.description, table, finer)
            cur.execute(
                f"INSERT INTO {table} (run_id, name, block, first_step, last_step, total, lo, hi, n) "
                f"SELECT run_id, name, block / {ratio}, MIN(first_step), MAX(last_step), SUM(total), "
                f"MIN(lo), MAX(hi), SUM(n) FROM {finer} WHERE true GROUP BY run_id, name, block / {ratio} "
                # two new trainers opening one old PostgreSQL store at once: the second
                # one's build finds the first one's rows (WHERE: SQLite's upsert syntax)
                "ON CONFLICT (run_id, name, block) DO NOTHING")

    @abstractmethod
    def _add_float_columns(self, cur: Any, table: str, names: Sequence[str]) -> None:
        """Add those of ``names`` that ``table`` lacks, as nullable float columns."""

    def _sql(self, text: str) -> str:
        return text if self.placeholder == "?" else text.replace("?", self.placeholder)

    @contextmanager
    def _tx(self) -> Iterator[Any]:
        """A cursor in a transaction; committed on success. A database error drops
        the connection (the next call re-opens it) and becomes RunStoreError."""
        with self._lock:
            try:
                if self._conn is None:
                    self._conn = self._connect()
                    cur = self._conn.cursor()
                    for statement in self.schema:
                        cur.execute(statement)
                    self._migrate(cur)
                    self._conn.commit()
                cur = self._conn.cursor()
                yield cur
                self._conn.commit()
            except self.errors as exc:
                self._drop()
                raise RunStoreError(f"{self.description} is unavailable: {exc}") from exc
            except BaseException:
                if self._conn is not None:
                    try:
                        self._conn.rollback()
                    except self.errors:
                        self._drop()
                raise

    def _drop(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # closing a broken connection may fail too
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()

    # -- writes ----------------------------------------------------------
    def write(self, records: Sequence[RunRecord] = (), events: Sequence[RunEvent] = (),
              rows: Sequence[ScalarRow] = ()) -> None:
        if not (records or events or rows):
            return
        with self._tx() as cur, self._batch(cur):
            if records:
                cur.executemany(self._sql(_UPSERT_RUN), [_row(r) for r in records])
            if events:
                cur.executemany(
                    self._sql("INSERT INTO events (run_id, at, kind, step, detail) VALUES (?, ?, ?, ?, ?)"),
                    [(e.run_id, e.at, e.kind, e.step, json.dumps(dict(e.detail))) for e in events],
                )
            # A finite point beyond +-MAX_HISTORY_ABS (a run that diverged) is left out of
            # the history: the sums behind the blocks' means would overflow (PostgreSQL
            # raises on float8 overflow; SQLite makes +inf and -inf, then a NaN it stores
            # as NULL) and fail the whole batch. Up to 2^63 points of 1e280 sum safely.
            rows = [row for row in rows if not (math.isfinite(row[3]) and abs(row[3]) > MAX_HISTORY_ABS)]
            if rows:
                self._write_scalars(cur, rows)

    def _batch(self, cur: Any) -> AbstractContextManager[Any]:
        """Around the statements of one :meth:`write` (in its transaction)."""
        return nullcontext()

    def _write_scalars(self, cur: Any, rows: Sequence[ScalarRow]) -> None:
        """The points, their series and the blocks they fall in (in a transaction)."""
        spans = _block_spans(rows)
        sql = self._scalar_sql
        self._upsert_points(cur, rows, spans)
        self._each_span(cur, sql.blocks, spans)
        for statement, steps, finer_steps in sql.levels:
            # Every coarse row the batch touched: [lo, end) widened to its edges.
            self._each_span(cur, statement, [
                (run_id, name, (lo - lo % steps) // finer_steps, -(-end // steps) * steps // finer_steps)
                for run_id, name, lo, end in spans])
        self._each_span(cur, sql.series, [
            (run_id, name, lo // BLOCK_STEPS, end // BLOCK_STEPS) for run_id, name, lo, end in spans])

    def _each_span(self, cur: Any, statement: str, spans: Sequence[tuple[str, str, int, int]]) -> None:
        """``statement`` (of :class:`SpanSql`) for each (run_id, name, lo, end)."""
        cur.executemany(self._sql(statement), spans)

    def _upsert_points(self, cur: Any, rows: Sequence[ScalarRow],
                       spans: Sequence[tuple[str, str, int, int]]) -> None:
        cur.executemany(self._sql(_UPSERT_SCALAR), rows)

    def truncate_scalars(self, run_id: str, after_step: int) -> None:
        with self._tx() as cur:
            cur.execute(self._sql("DELETE FROM scalars WHERE run_id = ? AND step > ?"), (run_id, after_step))
            block = after_step // BLOCK_STEPS
            cur.execute(self._sql("DELETE FROM scalar_blocks WHERE run_id = ? AND block >= ?"), (run_id, block))
            cur.execute(self._sql("SELECT DISTINCT name FROM scalars WHERE run_id = ?"), (run_id,))
            names = [name for (name,) in cur.fetchall()]
            sql = self._scalar_sql
            # The block the cut falls in, again from its remaining points.
            self._each_span(cur, sql.blocks,
                            [(run_id, name, block * BLOCK_STEPS, (block + 1) * BLOCK_STEPS) for name in names])
            # And each coarse level's, from the level below (just cut itself).
            for (table, steps), (statement, _, finer_steps) in zip(_LEVELS[1:], sql.levels):
                cut = after_step // steps
                cur.execute(self._sql(f"DELETE FROM {table} WHERE run_id = ? AND block >= ?"), (run_id, cut))
                self._each_span(cur, statement, [
                    (run_id, name, cut * steps // finer_steps, (cut + 1) * steps // finer_steps)
                    for name in names])
            cur.execute(self._sql(_SERIES_FROM_BLOCKS + "run_id = ?"), (run_id,))

    def delete_run(self, run_id: str) -> bool:
        with self._tx() as cur:
            for table in (*_SCALAR_TABLES, "series", "events"):
                cur.execute(self._sql(f"DELETE FROM {table} WHERE run_id = ?"), (run_id,))
            cur.execute(self._sql("DELETE FROM runs WHERE run_id = ?"), (run_id,))
            return bool(cur.rowcount)

    def mark_interrupted(self, at: float) -> list[str]:
        with self._tx() as cur:
            cur.execute(f"SELECT run_id, step, state FROM runs WHERE state IN ({_LIVE_SQL})")
            rows = cur.fetchall()
            cur.execute(
                self._sql(f"UPDATE runs SET state = ?, updated_at = ?, ended_at = ? "
                          f"WHERE state IN ({_LIVE_SQL})"),
                (cpb.RUN_STATE_INTERRUPTED, at, at),
            )
            cur.executemany(
                self._sql("INSERT INTO events (run_id, at, kind, step, detail) VALUES (?, ?, ?, ?, ?)"),
                [(r[0], at, "state", r[1], json.dumps({
                    "from": cpb.RunState.Name(int(r[2])), "to": "RUN_STATE_INTERRUPTED",
                    "reason": "the trainer exited while the run was live"})) for r in rows],
            )
        return [r[0] for r in rows]

    def prune(self, keep: int) -> list[str]:
        with self._tx() as cur:
            cur.execute(self._sql(
                f"SELECT run_id FROM runs WHERE state IN ({_TERMINAL_SQL}) "
                "ORDER BY created_at DESC, run_id DESC LIMIT -1 OFFSET ?"
                if self.placeholder == "?" else
                f"SELECT run_id FROM runs WHERE state IN ({_TERMINAL_SQL}) "
                "ORDER BY created_at DESC, run_id DESC OFFSET ?"), (keep,))
            victims = [r[0] for r in cur.fetchall()]
            for run_id in victims:
                for table in (*_SCALAR_TABLES, "series", "events", "runs"):
                    cur.execute(self._sql(f"DELETE FROM {table} WHERE run_id = ?"), (run_id,))
        return victims

    # -- reads -----------------------------------------------------------
    def get_run(self, run_id: str) -> RunRecord | None:
        with self._tx() as cur:
            cur.execute(self._sql(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs WHERE run_id = ?"), (run_id,))
            row = cur.fetchone()
        return _record(row) if row else None

    def list_runs(self, filter_: str = "", order_by: str = "", page_size: int = 0,
                  page_token: str = "") -> RunPage:
        conditions = parse_filter(filter_)
        order = parse_order_by(order_by)
        size = check_page_size(page_size)
        offset = decode_page_token(page_token, filter_, order_by)
        where, args = filter_sql(conditions)
        order_sql = ", ".join(f"{col} {'DESC' if desc else 'ASC'}" for col, desc in order)
        tie = "run_id DESC" if order[-1][1] else "run_id ASC"
        with self._tx() as cur:
            cur.execute(self._sql(f"SELECT COUNT(*) FROM runs{where}"), args)
            total = int(cur.fetchone()[0])
            cur.execute(
                self._sql(f"SELECT {', '.join(_RUN_COLUMNS)} FROM runs{where} "
                          f"ORDER BY {order_sql}, {tie} LIMIT ? OFFSET ?"),
                [*args, size + 1, offset],
            )
            rows = cur.fetchall()
        more = len(rows) > size
        token = encode_page_token(offset + size, filter_, order_by) if more else ""
        return RunPage([_record(r) for r in rows[:size]], token, total)

    def events(self, run_id: str) -> list[RunEvent]:
        with self._tx() as cur:
            cur.execute(self._sql("SELECT run_id, at, kind, step, detail FROM events WHERE run_id = ? "
                                  "ORDER BY at, id"), (run_id,))
            rows = cur.fetchall()
        return [RunEvent(r[0], float(r[1]), r[2], int(r[3]), json.loads(r[4])) for r in rows]

    def extremes(self, run_ids: Sequence[str]) -> dict[tuple[str, str], tuple[float, float]]:
        # One row per series (kept as points are written), not a scan of the history.
        out: dict[tuple[str, str], tuple[float, float]] = {}
        ids = list(dict.fromkeys(run_ids))
        with self._tx() as cur:
            for at in range(0, len(ids), 500):  # within any backend's limit of parameters
                chunk = ids[at:at + 500]
                cur.execute(self._sql(
                    f"SELECT run_id, name, lo, hi FROM series WHERE run_id IN ({', '.join('?' * len(chunk))}) "
                    "AND lo IS NOT NULL"), chunk)
                for run_id, name, lo, hi in cur.fetchall():
                    out[(run_id, name)] = (float(lo), float(hi))
        return out

    def scalars(self, run_id: str, max_points: int = 1024, names: Iterable[str] = ()
                ) -> dict[str, list[Bucket]]:
        if max_points < 2:
            raise InvalidArgumentError(f"max_points must be >= 2, got {max_points}")
        wanted = set(names)
        out: dict[str, list[Bucket]] = {}
        with self._tx() as cur:
            cur.execute(self._sql("SELECT name FROM series WHERE run_id = ? ORDER BY name"), (run_id,))
            for (name,) in cur.fetchall():
                if wanted and name not in wanted:
                    continue
                # The first and last step: two primary-key seeks, not a scan.
                # (Apart: SQLite seeks for a lone MIN() or MAX(), scans for both.)
                bounds = []
                for agg in ("MIN", "MAX"):
                    cur.execute(self._sql(f"SELECT {agg}(step) FROM scalars WHERE run_id = ? AND name = ?"),
                                (run_id, name))
                    bounds.append(cur.fetchone()[0])
                lo, hi = bounds
                if lo is None:
                    continue
                lo, hi = int(lo), int(hi)
                if hi - lo + 1 <= max_points:
                    cur.execute(self._sql("SELECT step, value FROM scalars WHERE run_id = ? AND name = ? "
                                          "ORDER BY step"), (run_id, name))
                    out[name] = [Bucket(s, s, v, v, v, 1) for s, v in cur.fetchall()]
                    continue
                # Equal step spans: bucket b covers steps lo + [b, b+1) * span / n. A
                # long series is read from the coarsest block level with at least 4
                # rows per bucket (a bucket's edges then fall on block edges, within a
                # quarter of a bucket of the exact span).
                span = hi - lo + 1
                level = [(t, s) for t, s in _LEVELS if span >= 4 * s * max_points]
                if level:
                    table, steps = level[-1]
                    cur.execute(self._sql(
                        "SELECT MIN(first_step), MAX(last_step), SUM(total), MIN(lo), MAX(hi), SUM(n) "
                        f"FROM {table} WHERE run_id = ? AND name = ? "
                        "GROUP BY ((block * ? - ?) * ?) / ? ORDER BY MIN(first_step)"),
                        (run_id, name, steps, lo, max_points, span))
                    out[name] = [Bucket(int(a), int(b), float(t) / int(c), float(mn), float(mx), int(c))
                                 for a, b, t, mn, mx, c in cur.fetchall()]
                    continue
                cur.execute(self._sql(
                    "SELECT MIN(step), MAX(step), AVG(value), MIN(value), MAX(value), COUNT(*) "
                    "FROM scalars WHERE run_id = ? AND name = ? "
                    "GROUP BY ((step - ?) * ?) / ? ORDER BY MIN(step)"),
                    (run_id, name, lo, max_points, span))
                out[name] = [Bucket(int(a), int(b), float(m), float(mn), float(mx), int(c))
                             for a, b, m, mn, mx, c in cur.fetchall()]
        return out


class SqliteRunStore(SqlRunStore):
    """The embedded default: one SQLite file (WAL), made on first use."""

    schema = (
        "PRAGMA journal_mode=WAL",
        "PRAGMA synchronous=NORMAL",
        "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, task TEXT NOT NULL, "
        "state INTEGER NOT NULL, params TEXT NOT NULL, options TEXT NOT NULL, seed INTEGER NOT NULL, "
        "created_at REAL NOT NULL, updated_at REAL NOT NULL, step INTEGER NOT NULL, metrics TEXT NOT NULL, "
        "error TEXT NOT NULL, checkpoint_step INTEGER NOT NULL, name TEXT NOT NULL, tags TEXT NOT NULL, "
        "notes TEXT NOT NULL, publish_as TEXT NOT NULL, ended_at REAL NOT NULL)",
        "CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at)",
        "CREATE TABLE IF NOT EXISTS events (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, "
        "at REAL NOT NULL, kind TEXT NOT NULL, step INTEGER NOT NULL, detail TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS events_run ON events (run_id, at)",
        "CREATE TABLE IF NOT EXISTS scalars (run_id TEXT NOT NULL, name TEXT NOT NULL, "
        "step INTEGER NOT NULL, value REAL NOT NULL, PRIMARY KEY (run_id, name, step)) WITHOUT ROWID",
        *(_block_table(table, ("INTEGER", "REAL", " WITHOUT ROWID")) for table, _ in _LEVELS),
        "CREATE TABLE IF NOT EXISTS series (run_id TEXT NOT NULL, name TEXT NOT NULL, "
        "lo REAL, hi REAL, PRIMARY KEY (run_id, name)) WITHOUT ROWID",
    )
    errors = (sqlite3.Error,)

    def _add_float_columns(self, cur: Any, table: str, names: Sequence[str]) -> None:
        cur.execute(f"PRAGMA table_info({table})")
        have = {row[1] for row in cur.fetchall()}
        for name in names:
            if name not in have:
                cur.execute(f"ALTER TABLE {table} ADD COLUMN {name} REAL")

    def _write_scalars(self, cur: Any, rows: Sequence[ScalarRow]) -> None:
        # SQLite stores a NaN as NULL, and a block's sum of +inf and -inf is a NaN:
        # one such point failed its whole batch, and the recorder retried it until
        # its buffer dropped points. SQLite's history keeps the finite points (the
        # chart joins their neighbours); the live stream still shows the gap, and
        # PostgreSQL keeps every value.
        finite = [row for row in rows if math.isfinite(row[3])]
        if finite:
            super()._write_scalars(cur, finite)

    def __init__(self, path: Path, *, timeout_s: float = 2.0) -> None:
        super().__init__()
        self.path = Path(path)
        self.timeout_s = timeout_s
        self.description = f"run store {str(self.path)!r} (SQLite)"

    def _connect(self) -> sqlite3.Connection:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise sqlite3.OperationalError(f"cannot make {self.path.parent}: {exc}") from exc
        return sqlite3.connect(self.path, timeout=self.timeout_s, check_same_thread=False,
                               isolation_level="DEFERRED")


_PG_SPANS = SpanSql(
    # Each span an index range scan: LATERAL ... OFFSET 0 keeps the planner from
    # making it a join, which the cached plan of a small table makes a hash join
    # over a scan of the whole table (then a batch costs as much as the history).
    "FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::bigint[]) WITH ORDINALITY "
    "AS w(w_run, w_name, w_lo, w_end, w_series), "
    "LATERAL (SELECT *, ctid AS row_id FROM {table} WHERE run_id = w_run AND name = w_name "
    "AND {key} >= w_lo AND {key} < w_end OFFSET 0) AS t")
_PG_CLEAR_POINTS = (
    # The batch's steps that are stored already (a step written again): found in the
    # spans' range scans (in a run that appends, the few points of its first block),
    # deleted by row id, so the points go in with a plain INSERT (ON CONFLICT costs
    # the server about twice as much per point). Points as in _PG_INSERT_POINTS.
    "DELETE FROM scalars WHERE ctid = ANY(ARRAY(SELECT row_id "
    + _PG_SPANS.source.format(table="scalars", key="step")
    + " WHERE (w_series, step) IN (SELECT * FROM unnest(%s::bigint[], %s::bigint[]))))"
)
_PG_BATCH_SETTINGS = (
    # For the transaction of one batch. Generic plans: the statements are the same every
    # batch (psycopg prepares them), their plans the same whatever the values
    # (per-span index range scans): planning them each time cost the server about a
    # quarter of a batch. synchronous_commit off: the batch's COMMIT does not wait
    # for its WAL to reach the disk; a crash of the server can lose the batches of the
    # last ~0.6 s (3 x wal_writer_delay), never corrupt the store (PostgreSQL's
    # documented guarantee). Deletes, truncations and the boot sweep stay synchronous.
    "SELECT set_config('plan_cache_mode', 'force_generic_plan', true), "
    "set_config('synchronous_commit', 'off', true)"
)
_PG_INSERT_POINTS = (
    # Each point: its series (an index into the batch's series), step and value, sent
    # as three array literals (text): dumping arrays element by element cost the
    # client 1-3 us per element, more than the server's insert.
    "INSERT INTO scalars (run_id, name, step, value) SELECT k.r[i], k.n[i], s, v "
    "FROM (SELECT %b::text[] AS r, %b::text[] AS n) AS k, "
    "unnest(%s::bigint[], %s::bigint[], %s::float8[]) AS p(i, s, v)"
)


class PostgresRunStore(SqlRunStore):
    """Runs in PostgreSQL (psycopg 3): several trainers share one run list."""

    schema = (
        "CREATE TABLE IF NOT EXISTS runs (run_id TEXT PRIMARY KEY, task TEXT NOT NULL, "
        "state INTEGER NOT NULL, params TEXT NOT NULL, options TEXT NOT NULL, seed BIGINT NOT NULL, "
        "created_at DOUBLE PRECISION NOT NULL, updated_at DOUBLE PRECISION NOT NULL, "
        "step BIGINT NOT NULL, metrics TEXT NOT NULL, error TEXT NOT NULL, "
        "checkpoint_step BIGINT NOT NULL, name TEXT NOT NULL, tags TEXT NOT NULL, notes TEXT NOT NULL, "
        "publish_as TEXT NOT NULL, ended_at DOUBLE PRECISION NOT NULL)",
        "CREATE INDEX IF NOT EXISTS runs_created ON runs (created_at)",
        "CREATE TABLE IF NOT EXISTS events (id BIGSERIAL PRIMARY KEY, run_id TEXT NOT NULL, "
        "at DOUBLE PRECISION NOT NULL, kind TEXT NOT NULL, step BIGINT NOT NULL, detail TEXT NOT NULL)",
        "CREATE INDEX IF NOT EXISTS events_run ON events (run_id, at)",
        "CREATE TABLE IF NOT EXISTS scalars (run_id TEXT NOT NULL, name TEXT NOT NULL, "
        "step BIGINT NOT NULL, value DOUBLE PRECISION NOT NULL, PRIMARY KEY (run_id, name, step))",
        *(_block_table(table, ("BIGINT", "DOUBLE PRECISION", "")) for table, _ in _LEVELS),
        "CREATE TABLE IF NOT EXISTS series (run_id TEXT NOT NULL, name TEXT NOT NULL, "
        "lo DOUBLE PRECISION, hi DOUBLE PRECISION, PRIMARY KEY (run_id, name))",
    )
    placeholder = "%s"
    _scalar_sql = ScalarSql.of(_PG_SPANS)

    def _add_float_columns(self, cur: Any, table: str, names: Sequence[str]) -> None:
        for name in names:
            cur.execute(f"ALTER TABLE {table} ADD COLUMN IF NOT EXISTS {name} DOUBLE PRECISION")

    def __init__(self, dsn: str, *, connect_timeout_s: float = 3.0) -> None:
        super().__init__()
        import psycopg  # late: only this backend needs it

        self._psycopg = psycopg
        self.errors = (psycopg.Error,)
        self.dsn = dsn
        self.connect_timeout_s = connect_timeout_s
        self.description = f"run store {redact_dsn(dsn)!r} (PostgreSQL)"

    def _connect(self) -> Any:
        conn = self._psycopg.connect(self.dsn, connect_timeout=max(1, int(self.connect_timeout_s)))
        # Concurrent trainers create the schema at once: one at a time.
        with conn.cursor() as cur:
            cur.execute("SELECT pg_advisory_xact_lock(7215)")
        return conn

    def _sql(self, text: str) -> str:
        # psycopg's placeholder is %s; a literal % (none in our SQL but LIKE args) stays in args.
        return text.replace("?", "%s")

    @contextmanager
    def _batch(self, cur: Any) -> Iterator[None]:
        # A batch is one round trip: its statements and COMMIT go in one pipeline
        # (psycopg sends them without waiting for each answer).
        with self._conn.pipeline():
            cur.execute(_PG_BATCH_SETTINGS)
            yield
            self._conn.commit()

    def _each_span(self, cur: Any, statement: str, spans: Sequence[tuple[str, str, int, int]]) -> None:
        # Every series in one statement, the spans as four binary arrays.
        if spans:
            cur.execute(statement, [list(column) for column in zip(*spans, strict=True)])

    def _upsert_points(self, cur: Any, rows: Sequence[ScalarRow],
                       spans: Sequence[tuple[str, str, int, int]]) -> None:
        # Two statements whatever the number of points (executemany would cost a round
        # of Python and of the server per point). A step given twice: the last value wins.
        points = {(run_id, name, step): value for run_id, name, step, value in rows}
        series = {(run_id, name): str(i) for i, (run_id, name, _, _) in enumerate(spans, 1)}
        index = "{" + ",".join([series[(run_id, name)] for run_id, name, _ in points]) + "}"
        steps = "{" + ",".join([str(step) for _, _, step in points]) + "}"
        # repr: the shortest text that reads back as the same double (nan, inf too).
        values = "{" + ",".join(map(repr, points.values())) + "}"
        columns = [list(column) for column in zip(*spans, strict=True)]
        cur.execute(_PG_CLEAR_POINTS, [*columns, index, steps])
        cur.execute(_PG_INSERT_POINTS, [columns[0], columns[1], index, steps, values])


def redact_dsn(dsn: str) -> str:
    """The DSN without its password, for logs."""
    return re.sub(r"(://[^:/@]+):[^@]*@", r"\1:***@", dsn)


def open_store(spec: str, default_path: Path) -> RunStore | None:
    """The store a ``--run-store`` value names: '' = SQLite at ``default_path``, a
    path = SQLite there, ``postgresql://...`` = PostgreSQL, 'none' = no store."""
    spec = spec.strip()
    if spec.lower() == "none":
        return None
    if spec.startswith(("postgresql://", "postgres://")):
        return PostgresRunStore(spec)
    if "://" in spec:
        raise InvalidArgumentError(
            f"run store {redact_dsn(spec)!r}: use a file path, postgresql://..., or none"
        )
    return SqliteRunStore(Path(spec) if spec else default_path)
