"""psycopg 3 through the gateway: binary results, pipeline mode, COPY,
server-side cursors, LISTEN/NOTIFY, prepared statements, denial recovery.

Run by tests/tests/psycopg.rs with AGENTGATE_DSN pointing at a gateway in
front of a database loaded with xtask/demo/sample.sql.
"""

import os
import threading

import psycopg
import pytest
from psycopg import sql

DSN = os.environ["AGENTGATE_DSN"]


@pytest.fixture
def conn():
    with psycopg.connect(DSN, autocommit=True) as c:
        yield c


def test_binary_results(conn):
    with conn.cursor(binary=True) as cur:
        cur.execute("SELECT id, name, 1.5::float8, NULL::int FROM customers ORDER BY id")
        rows = cur.fetchall()
    assert rows[0] == (1, "Ada Lovelace", 1.5, None)
    assert len(rows) == 4


def test_pipeline_mode(conn):
    with conn.pipeline():
        curs = [conn.execute("SELECT %s::int * 2", (i,)) for i in range(50)]
    assert [c.fetchone()[0] for c in curs] == [i * 2 for i in range(50)]


def test_pipeline_with_an_error_then_recovery(conn):
    with pytest.raises(psycopg.errors.DivisionByZero):
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELECT 1 / 0")
            conn.execute("SELECT 2")
    assert conn.execute("SELECT 3").fetchone() == (3,)


def test_denied_statement_in_pipeline_and_after(conn):
    with pytest.raises(psycopg.errors.InsufficientPrivilege) as e:
        conn.execute("SELEC 1")
    assert str(e.value).startswith("agentgate:")
    with pytest.raises(psycopg.errors.InsufficientPrivilege):
        with conn.pipeline():
            conn.execute("SELECT 1")
            conn.execute("SELEC 2")
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_copy_both_ways(conn):
    conn.execute("CREATE TEMP TABLE c (id int, body text)")
    with conn.cursor() as cur:
        with cur.copy("COPY c FROM STDIN") as cp:
            for i in range(500):
                cp.write_row((i, f"row {i}"))
        with cur.copy("COPY c TO STDOUT (FORMAT binary)") as cp:
            cp.set_types(["int4", "text"])
            rows = list(cp.rows())
    assert len(rows) == 500
    assert rows[7] == (7, "row 7")


def test_server_side_cursor():
    with psycopg.connect(DSN) as c:
        with c.cursor(name="big") as cur:
            cur.itersize = 100
            cur.execute("SELECT g FROM generate_series(1, 1000) g")
            total = sum(r[0] for r in cur)
    assert total == 500500


def test_prepared_statements(conn):
    for i in range(10):
        row = conn.execute("SELECT name FROM customers WHERE id = %s", (1 + i % 4,), prepare=True).fetchone()
        assert row[0]


def test_listen_notify():
    got = []
    with psycopg.connect(DSN, autocommit=True) as listener:
        listener.execute("LISTEN events")
        pid_holder = {}

        def notify():
            with psycopg.connect(DSN, autocommit=True) as n:
                pid_holder["pid"] = n.execute("SELECT pg_backend_pid()").fetchone()[0]
                n.execute(sql.SQL("NOTIFY events, {}").format(sql.Literal("hello")))

        t = threading.Thread(target=notify)
        t.start()
        for n in listener.notifies(timeout=10, stop_after=1):
            got.append(n)
        t.join()
    assert got and got[0].payload == "hello"
    assert got[0].pid == pid_holder["pid"]


def test_cancel(conn):
    def cancel_soon():
        import time
        time.sleep(0.5)
        conn.cancel_safe()

    t = threading.Thread(target=cancel_soon)
    t.start()
    with pytest.raises(psycopg.errors.QueryCanceled):
        conn.execute("SELECT pg_sleep(20)")
    t.join()
    assert conn.execute("SELECT 1").fetchone() == (1,)


def test_parameter_status_as_the_server_sends_it():
    with psycopg.connect(DSN + " client_encoding=utf8") as c:
        assert c.info.parameter_status("client_encoding") == "UTF8"
        assert c.info.backend_pid == c.execute("SELECT pg_backend_pid()").fetchone()[0]
