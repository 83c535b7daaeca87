"""The LLM call's hot-path SQL: Core statements compiled once, run on the DBAPI connection.

Tracking a call writes a usage row, two rollup increments and the budget's counters. Executing a
Core statement through a SQLAlchemy ``Connection`` costs ~100 µs of Python each on a slow
machine (execution context, parameter and result processing, events): more than SQLite takes to
run it, and most of what tracking added to a call. The statements are still built with
SQLAlchemy Core from the models (one source of truth for the schema and for each dialect's
syntax); ``Statement`` compiles each once per dialect and keeps its SQL text, parameter order
and bind processors, and ``Tx`` runs it on the DBAPI cursor.

``WriteGate.transaction()`` is the unit of work on a pooled DBAPI connection. On SQLite it also
admits one writer of the process at a time: SQLite has a single writer, and a connection that
finds the write lock taken sleeps in SQLite's busy handler (1, 2, 5, 10, ... ms) however soon
the lock is free, whereas a Python lock wakes the next writer the moment the last one commits.
Other processes still wait in the busy handler, up to ``SQLITE_BUSY_TIMEOUT_SECONDS``.

DBAPI errors leave ``transaction()`` as SQLAlchemy's own exceptions (``OperationalError``,
``IntegrityError``, ...), so callers handle one family of errors whichever path they use.
"""

from __future__ import annotations

import operator
import threading
import weakref
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from sqlalchemy import Connection, Engine
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.exc import DBAPIError
from sqlalchemy.sql import ClauseElement
from sqlalchemy.sql.compiler import SQLCompiler

Processor = Callable[[Any], Any]
T = TypeVar("T")


def dialect_insert(dialect: str) -> Any:
    """The dialect's ``insert`` (with ``on_conflict_do_*``): the ledger runs on these two."""
    if dialect == "postgresql":
        return postgresql.insert
    if dialect == "sqlite":
        return sqlite.insert
    raise NotImplementedError(f"Unsupported database dialect: {dialect}")


@dataclass(frozen=True, slots=True)
class Compiled:
    """One statement's SQL for one dialect, and how to turn named values into its parameters."""

    sql: str
    names: tuple[str, ...]
    processors: tuple[Processor | None, ...]
    positional: bool
    # Values the statement carries itself (literals such as ``.values(flag=True)``), by name.
    fixed: Mapping[str, Any]
    # Derived once, for ``params`` (a call's hot path runs it for every statement): the values
    # in parameter order in one C call, and only the processors there are (most are None).
    _pick: Callable[[Mapping[str, Any]], tuple[Any, ...]] = field(init=False, repr=False)
    _process: tuple[tuple[int, Processor], ...] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_pick", _picker(self.names))
        process = tuple((i, p) for i, p in enumerate(self.processors) if p is not None)
        object.__setattr__(self, "_process", process)

    def params(self, values: Mapping[str, Any]) -> Sequence[Any] | dict[str, Any]:
        if self.fixed:
            values = {**self.fixed, **values}
        bound: Sequence[Any] = self._pick(values)
        if self._process:
            bound = list(bound)
            for i, proc in self._process:
                bound[i] = proc(bound[i])
        return bound if self.positional else dict(zip(self.names, bound, strict=True))


def _picker(names: tuple[str, ...]) -> Callable[[Mapping[str, Any]], tuple[Any, ...]]:
    """``values[name]`` for each of ``names``, as a tuple (``KeyError`` for a missing one)."""
    if not names:
        return lambda _values: ()
    if len(names) == 1:
        (name,) = names
        return lambda values: (values[name],)
    return cast(Callable[[Mapping[str, Any]], tuple[Any, ...]], operator.itemgetter(*names))


class Statement:
    """A Core statement compiled on first use for each dialect.

    ``column_keys``: for an INSERT, the columns the values will name (all of them, always).
    """

    def __init__(
        self,
        build: Callable[[str], ClauseElement] | ClauseElement,
        column_keys: Sequence[str] | None = None,
    ) -> None:
        self._build = build
        self._column_keys = list(column_keys) if column_keys is not None else None
        self._compiled: dict[str, Compiled] = {}
        self._lock = threading.Lock()

    def compiled(self, dialect: Dialect) -> Compiled:
        try:
            return self._compiled[dialect.name]
        except KeyError:
            pass
        stmt = self._build(dialect.name) if callable(self._build) else self._build
        compiled = cast(SQLCompiler, stmt.compile(dialect=dialect, column_keys=self._column_keys))
        if any(bind.expanding for bind in compiled.binds.values()):
            raise ValueError("expanding (IN-list) parameters cannot be precompiled")
        positional = bool(dialect.positional)
        names = tuple(compiled.positiontup or ()) if positional else tuple(compiled.binds)
        processors = tuple(
            compiled.binds[name].type.dialect_impl(dialect).bind_processor(dialect)
            for name in names
        )
        fixed = {
            name: bind.value
            for name, bind in compiled.binds.items()
            if not bind.required and bind.callable is None
        }
        result = Compiled(str(compiled), names, processors, positional, fixed)
        with self._lock:
            self._compiled[dialect.name] = result
        return result


class Tx:
    """Statements run on one DBAPI connection, inside the transaction its owner manages."""

    __slots__ = ("_cursor", "dialect")

    def __init__(self, dbapi_connection: Any, dialect: Dialect) -> None:
        self._cursor = dbapi_connection.cursor()
        self.dialect = dialect

    @classmethod
    def of(cls, conn: Connection) -> Tx:
        """Join a SQLAlchemy connection's transaction (the same DBAPI connection underneath)."""
        return cls(conn.connection, conn.dialect)

    @classmethod
    def coerce(cls, conn: Tx | Connection) -> Tx:
        return conn if isinstance(conn, Tx) else cls.of(conn)

    def execute(self, stmt: Statement, values: Mapping[str, Any]) -> Any:
        """Run ``stmt``; the DBAPI cursor (``rowcount``, ``fetchone()``)."""
        compiled = stmt.compiled(self.dialect)
        self._cursor.execute(compiled.sql, compiled.params(values))
        return self._cursor

    def execute_many(self, stmt: Statement, rows: Sequence[Mapping[str, Any]]) -> Any:
        """Run ``stmt`` once for each of ``rows`` (DBAPI ``executemany``: one call, and one
        round trip on PostgreSQL); the cursor, whose ``rowcount`` is the rows all of them
        changed."""
        compiled = stmt.compiled(self.dialect)
        self._cursor.executemany(compiled.sql, [compiled.params(values) for values in rows])
        return self._cursor

    def close(self) -> None:
        self._cursor.close()


class WriteGate:
    """Transactions on the engine's DBAPI connections; one writer at a time on SQLite.

    One per engine (``write_gate(engine)``), shared by every hot-path writer of the process. On
    SQLite the writers take turns on one connection kept for them (no pool checkout, no reset
    on return); reads and PostgreSQL use the engine's pool.
    """

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.dialect = engine.dialect
        self._sqlite = engine.dialect.name == "sqlite"
        self._lock = threading.Lock() if self._sqlite else None
        self._writer: Any = None  # SQLite: the writers' connection, checked out for good
        self._reader: Any = None  # SQLite: the connection of ``local_read``
        self._reader_lock = threading.Lock()

    @contextmanager
    def transaction(self, *, write: bool = True) -> Iterator[Tx]:
        """Commit when the block ends, roll back if it raises.

        ``write=False`` for a block that only reads: it does not queue behind writers.
        """
        if write and self._lock is not None:
            with self._lock:
                if self._writer is None:
                    self._writer = self._connect()
                try:
                    yield from self._run(self._writer)
                except BaseException:
                    if self._writer is not None and not self._writer.is_valid:
                        self._writer = None  # invalidated: the next writer connects afresh
                    raise
            return
        raw = self._connect()
        try:
            yield from self._run(raw)
        finally:
            raw.close()  # back to the pool

    @contextmanager
    def local_read(self) -> Iterator[Tx | None]:
        """A read that never waits (an event loop may run it); None where there is none.

        SQLite only: a WAL reader never waits for writers, and the connection is kept for this
        (no pool checkout that could wait). None on PostgreSQL (a network round trip) and when
        another thread is using the connection at that moment.
        """
        if self._lock is None or not self._reader_lock.acquire(blocking=False):
            yield None
            return
        try:
            if self._reader is None:
                self._reader = self._connect()
            yield from self._run(self._reader)
        except BaseException:
            if self._reader is not None and not self._reader.is_valid:
                self._reader = None
            raise
        finally:
            self._reader_lock.release()

    def close(self) -> None:
        """Give the kept connections back to the pool (the engine's ``dispose`` closes them)."""
        if self._lock is None:
            return
        with self._lock, self._reader_lock:
            for raw in (self._writer, self._reader):
                if raw is not None:
                    raw.close()
            self._writer = self._reader = None

    def _connect(self) -> Any:
        dbapi_error = self.dialect.loaded_dbapi.Error
        try:
            return self.engine.raw_connection()
        except dbapi_error as exc:  # unreachable database: SQLAlchemy's error, like every path
            raise DBAPIError.instance(None, None, exc, dbapi_error) from exc

    def _run(self, raw: Any) -> Iterator[Tx]:
        try:
            tx = Tx(raw, self.dialect)
            yield tx
            tx.close()
            raw.commit()
        except BaseException as exc:
            self._abort(raw, exc)
            dbapi_error = self.dialect.loaded_dbapi.Error
            if isinstance(exc, dbapi_error):
                raise DBAPIError.instance(None, None, exc, dbapi_error) from exc
            raise

    def _abort(self, raw: Any, exc: BaseException) -> None:
        try:
            raw.rollback()
        except Exception:
            raw.invalidate(exc)  # a connection that cannot even roll back is not reused
            return
        if not self._sqlite and isinstance(exc, self.dialect.loaded_dbapi.Error):
            # A failed PostgreSQL statement may mean a dead connection; a fresh one is cheap
            # next to handing a broken one to the next call.
            raw.invalidate(exc)


def per_engine(factory: Callable[[Engine], T]) -> Callable[[Engine], T]:
    """``factory(engine)`` made once per engine, on first use, and dropped with the engine."""
    made: weakref.WeakKeyDictionary[Engine, T] = weakref.WeakKeyDictionary()
    lock = threading.Lock()

    def get(engine: Engine) -> T:
        with lock:
            found = made.get(engine)
            if found is None:
                found = made[engine] = factory(engine)
            return found

    return get


write_gate = per_engine(WriteGate)
"""The engine's ``WriteGate``: one per engine, shared by every hot-path writer of the process."""
