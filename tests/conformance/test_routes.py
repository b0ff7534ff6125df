"""Every route the official SDK's generated clients can call, read from the installed SDK
packages themselves (so a new SDK version shows what is missing): daytona-sim serves it or
answers Daytona's error body with a 501 that names it, never the router's bare 404, never
another 5xx."""
import importlib
import inspect
import json
import os
import pkgutil
import re
import urllib.error
import urllib.request

from conftest import API_KEY, ROOT, Sim

ROUTE = re.compile(r"method='([A-Z]+)',\s*resource_path='([^']+)'")

# What issue 19 names as served faithfully (not 501).
MUST_SERVE = {
    ("toolbox", "GET", "/work-dir"), ("toolbox", "GET", "/user-home-dir"), ("toolbox", "GET", "/version"),
    ("toolbox", "POST", "/env"), ("toolbox", "GET", "/files/find"), ("toolbox", "GET", "/files/search"),
    ("toolbox", "POST", "/files/replace"), ("toolbox", "POST", "/files/move"),
    ("toolbox", "POST", "/files/permissions"), ("toolbox", "GET", "/port"),
    ("toolbox", "GET", "/port/{port}/in-use"), ("toolbox", "GET", "/system/metrics"),
    ("toolbox", "POST", "/process/pty"), ("toolbox", "GET", "/process/pty"),
    ("toolbox", "GET", "/process/pty/{sessionId}"), ("toolbox", "DELETE", "/process/pty/{sessionId}"),
    ("toolbox", "POST", "/process/pty/{sessionId}/resize"), ("toolbox", "GET", "/process/pty/{sessionId}/connect"),
    ("toolbox", "POST", "/process/session/{sessionId}/command/{commandId}/input"),
    ("toolbox", "POST", "/git/clone"), ("toolbox", "GET", "/git/status"), ("toolbox", "GET", "/git/branches"),
    ("toolbox", "POST", "/git/branches"), ("toolbox", "DELETE", "/git/branches"), ("toolbox", "POST", "/git/add"),
    ("toolbox", "POST", "/git/commit"), ("toolbox", "POST", "/git/checkout"),
    ("api", "POST", "/sandbox/{sandboxIdOrName}/pause"), ("api", "POST", "/sandbox/{sandboxIdOrName}/archive"),
    ("api", "POST", "/sandbox/{sandboxIdOrName}/autostop/{interval}"),
    ("api", "POST", "/sandbox/{sandboxIdOrName}/autoarchive/{interval}"),
    ("api", "POST", "/sandbox/{sandboxIdOrName}/autodelete/{interval}"),
    ("api", "POST", "/sandbox/{sandboxIdOrName}/resize"),
    ("api", "GET", "/sandbox/{sandboxIdOrName}/ports/{port}/preview-url"),
    ("api", "GET", "/sandbox/{sandboxIdOrName}/ports/{port}/signed-preview-url"),
    ("api", "GET", "/snapshots/{id}/build-logs"), ("api", "GET", "/sandbox/{sandboxIdOrName}/build-logs"),
}


TS_ROUTE = re.compile(r"const localVarPath = `([^`]+)`(.*?)method: '([A-Z]+)'", re.S)
TS_PARAM = re.compile(r"\$\{encodeURIComponent\(String\((\w+)\)\)\}")


def ts_routes():
    """The TypeScript SDK's generated clients (@daytona/api-client, toolbox-api-client),
    unpacked by test.sh into $DAYTONA_TS_SDK_DIR."""
    base = os.environ.get("DAYTONA_TS_SDK_DIR") or os.path.join(ROOT, ".sdk-ts", "0.218.0")
    routes = set()
    for pkg, surface in (("api-client", "api"), ("toolbox-api-client", "toolbox")):
        folder = os.path.join(base, pkg, "src", "api")
        assert os.path.isdir(folder), f"{folder} is missing: run ./test.sh, which unpacks the TypeScript SDK's clients"
        for name in os.listdir(folder):
            if name.endswith(".js"):
                src = open(os.path.join(folder, name)).read()
                for path, _, method in TS_ROUTE.findall(src):
                    routes.add((surface, method, TS_PARAM.sub(r"{\1}", path)))
    return sorted(routes)


def shape(route):
    surface, method, template = route
    return surface, method, re.sub(r"\{[^}]+\}", "{}", template)


def test_the_typescript_sdk_calls_no_route_the_python_one_does_not():
    """The TypeScript SDK's routes are checked through the Python SDK's list: each must be
    there (parameter names aside), so test_every_sdk_route_is_served_or_a_named_501 covers
    them too."""
    ts = ts_routes()
    assert len(ts) > 250, len(ts)
    missing = {shape(r) for r in ts} - {shape(r) for r in sdk_routes()}
    assert not missing, sorted(missing)


def sdk_routes():
    routes = set()
    for pkg, surface in (("daytona_api_client", "api"), ("daytona_toolbox_api_client", "toolbox")):
        api = importlib.import_module(pkg + ".api")
        for mod in pkgutil.iter_modules(api.__path__):
            src = inspect.getsource(importlib.import_module(f"{pkg}.api.{mod.name}"))
            routes.update((surface, m, p) for m, p in ROUTE.findall(src))
    return sorted(routes)


def call(sim, method, path):
    body = b"{}" if method in ("POST", "PUT", "PATCH") else None
    req = urllib.request.Request(sim.url + path, method=method, data=body,
                                 headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()


def test_every_sdk_route_is_served_or_a_named_501():
    routes = sdk_routes()
    assert len(routes) > 250, len(routes)
    sim = Sim()
    try:
        served, unserved, wrong = [], [], []
        for surface, method, template in routes:
            # Any value for each parameter: a missing sandbox is the handler's own 404.
            path = re.sub(r"\{[^}]+\}", "3000", template) if "port" in template else template
            path = re.sub(r"\{[^}]+\}", "sim-route-check", path)
            url = ("/api" if surface == "api" else "/toolbox/sim-route-check") + path
            status, raw = call(sim, method, url)
            try:
                body = json.loads(raw or b"null")
            except ValueError:
                body = None
            message = body.get("message", "") if isinstance(body, dict) else ""
            named = f"{method} /api{template}" if surface == "api" else f"{method} /toolbox/{{sandboxId}}{template}"
            if status == 501:
                if named in message and body.get("statusCode") == 501 and body.get("path") == url:
                    unserved.append(named)
                else:
                    wrong.append(f"{named}: a 501 that does not name the route: {raw[:200]!r}")
            elif status == 404 and message.startswith("Cannot "):
                wrong.append(f"{named}: the router's 404 ({message})")
            elif status >= 500:
                wrong.append(f"{named}: {status} {raw[:200]!r}")
            elif isinstance(body, dict) and status >= 400 and not ("statusCode" in body and "message" in body):
                wrong.append(f"{named}: {status} without Daytona's error body: {raw[:200]!r}")
            else:
                served.append(named)
        print(f"\nSDK routes: {len(routes)}; served {len(served)}, answered 501 {len(unserved)}")
        assert not wrong, "\n".join(wrong)
        must = {f"{m} /api{t}" if s == "api" else f"{m} /toolbox/{{sandboxId}}{t}" for s, m, t in MUST_SERVE}
        assert not must & set(unserved), sorted(must & set(unserved))
        assert must <= set(served), sorted(must - set(served))
    finally:
        sim.stop()
