import time, json, psycopg2, psycopg, pytest
from tests.fixtures.faults import rig_factory, request
@pytest.mark.parametrize("mode", ["pg2auto", "pg3"])
def test_dbg(rig_factory, mode):
    rig = rig_factory(env={"PGSIDECAR_RECONNECT_DEADLINE": "2s"})
    if mode == "pg3":
        conn = psycopg.connect(rig.sidecar.dsn(password=rig.cluster.users["app"]), autocommit=True)
    else:
        conn = rig.app(); conn.autocommit = True
    conn.cursor().execute("select 1")
    rig.cluster.stop("fast")
    try:
        conn.cursor().execute("select 2")
    except Exception as e:
        print("ERR", mode, repr(e), getattr(e, "pgcode", None) or getattr(e, "sqlstate", None))
