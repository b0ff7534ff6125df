"""Bad input, table-driven, on every route daytona-sim serves (read from the SDK as in
test_routes): garbage bodies, wrong types, huge bodies, path traversal and wrong auth.
Never a 5xx caused by the input, always Daytona's error body, nothing written outside the
sandbox, and the sim still serving afterwards."""
import json
import os
import re
import urllib.error
import urllib.request

from daytona import CreateSandboxFromSnapshotParams

from conftest import API_KEY, Sim
from test_routes import sdk_routes

MARK = "/tmp/daytona-sim-escape-check"

BODIES = [
    ("garbage", b"\x00\xff{not json", "application/json"),
    ("wrong types", json.dumps({"command": 5, "path": ["x"], "files": "a", "labels": 3, "cpu": "lots",
                                "sessionId": {"a": 1}, "name": None, "url": 7, "data": 1}).encode(), "application/json"),
    ("array", b"[1,2,3]", "application/json"),
    ("huge", b'{"command": "' + b"x" * (3 * 1024 * 1024) + b'"}', "application/json"),
    ("traversal", json.dumps({"path": "../../../../../../etc", "source": "../../../../etc/passwd",
                              "destination": MARK, "files": [MARK, "../../../../etc/passwd"],
                              "url": "/etc", "name": "../../x", "sessionId": "../../x", "command": "true"}).encode(),
     "application/json"),
    ("form", b"a=1&b=2", "application/x-www-form-urlencoded"),
]
QUERIES = ["path=../../../../../../etc/passwd", "path=/etc/shadow", "path=%2e%2e/%2e%2e/%2e%2e/etc",
           f"path={MARK}&pattern=x", "path=&pattern=", "port=-1", "follow=maybe", "path=%00"]
PARAMS = ["..", "%2e%2e", "x%2Fy", "-1", "99999999999999999999", "a" * 2000]


def request(sim, method, path, body=None, ctype=None, auth=True):
    headers = {}
    if auth is True:
        headers["Authorization"] = f"Bearer {API_KEY}"
    elif auth:
        headers["Authorization"] = auth
    if ctype:
        headers["Content-Type"] = ctype
    req = urllib.request.Request(sim.url + path, method=method, data=body, headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except (urllib.error.URLError, ConnectionError) as e:
        return 0, f"no answer: {e}".encode()


def check(problems, what, status, raw):
    if status == 0 or (status >= 500 and status != 501):
        problems.append(f"{what}: {status} {raw[:200]!r}")
        return
    if status >= 400:
        try:
            body = json.loads(raw)
        except ValueError:
            problems.append(f"{what}: {status} not JSON: {raw[:200]!r}")
            return
        if not (isinstance(body, dict) and body.get("statusCode") == status and body.get("message")):
            problems.append(f"{what}: {status} without Daytona's error body: {raw[:200]!r}")


def test_bad_input_on_every_served_route():
    if os.path.exists(MARK):
        os.remove(MARK)
    sim = Sim()
    try:
        client = sim.client()
        sb = client.create(CreateSandboxFromSnapshotParams(snapshot="default"), timeout=60)
        sb.process.create_session("bad")
        fill = {"sandboxIdOrName": sb.id, "sandboxId": sb.id, "sessionId": "bad", "port": "3000",
                "interval": "15", "ttlMinutes": "60", "isPublic": "false"}
        routes = []
        for surface, method, template in sdk_routes():
            path = re.sub(r"\{([^}]+)\}", lambda m: fill.get(m.group(1), "x"), template)
            url = ("/api" if surface == "api" else f"/toolbox/{sb.id}") + path
            status, _ = request(sim, method, url, b"{}" if method != "GET" else None, "application/json")
            if status != 501:
                routes.append((surface, method, template, url))
        # Lifecycle changes last, so that the toolbox routes meet a started sandbox.
        routes.sort(key=lambda r: (r[0] == "api", r[3]))
        problems, count = [], 0
        for surface, method, template, url in routes:
            name = f"{method} {template}"
            for auth in (False, "Bearer dtn_wrong", "Basic Zm9vOmJhcg==", "Bearer " + "x" * 10000):
                status, raw = request(sim, method, url, auth=auth)
                count += 1
                check(problems, f"{name} auth={str(auth)[:20]}", status, raw)
                if status not in (401, 403) and not template.startswith("/preview"):
                    problems.append(f"{name} auth={str(auth)[:20]}: {status}, not refused")
            if method in ("POST", "PUT", "PATCH", "DELETE"):
                for label, body, ctype in BODIES:
                    status, raw = request(sim, method, url, body, ctype)
                    count += 1
                    check(problems, f"{name} body={label}", status, raw)
            for q in QUERIES:
                status, raw = request(sim, method, f"{url}?{q}", b"{}" if method != "GET" else None,
                                      "application/json")
                count += 1
                check(problems, f"{name} ?{q}", status, raw)
            # Odd values in each path parameter.
            for bad in PARAMS:
                odd = re.sub(r"/x(?=/|$)", "/" + bad, url) if "/x" in url else None
                for p in ("bad", "3000", "15"):
                    if odd is None and f"/{p}" in url:
                        odd = url.replace(f"/{p}", "/" + bad, 1)
                if odd and odd != url:
                    status, raw = request(sim, method, odd, b"{}" if method != "GET" else None, "application/json")
                    count += 1
                    check(problems, f"{name} param={bad[:20]}", status, raw)
        print(f"\n{len(routes)} served routes, {count} bad requests")
        assert not problems, "\n".join(problems[:60]) + f"\n({len(problems)} problems)"
        assert not os.path.exists(MARK), "a request wrote outside the sandbox"
        status, _ = request(sim, "GET", "/api/sandbox")
        assert status == 200, "the sim stopped serving"
        # Still whole: a new sandbox works end to end (the first was deleted by the table's
        # well-formed DELETE).
        fresh = client.create(CreateSandboxFromSnapshotParams(snapshot="default"), timeout=60)
        assert fresh.process.exec("echo ok").result.strip() == "ok"
        client.delete(fresh)
    finally:
        sim.stop()
