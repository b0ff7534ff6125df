//! daytona-sim in-process, driven with raw HTTP and OpenSSH: what the SDK conformance suite
//! cannot reach (expired tokens, garbage input, faults, multipart pairing).

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use crabbox::sim::{self, Sim, SimConfig};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

struct Running {
    sim: Arc<Sim>,
    url: String,
    ssh_port: u16,
    http: reqwest::Client,
    _dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
        common::end_sandboxes_under(self.sim.engine.root());
    }
}

const KEY: &str = "dtn_rust_tests";

async fn start(tweak: impl FnOnce(&mut SimConfig)) -> Running {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = SimConfig::new(dir.path().to_path_buf());
    config.api_keys = vec![KEY.into()];
    config.create_delay = Duration::from_millis(20);
    config.start_delay = Duration::from_millis(20);
    let ssh = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind ssh");
    config.ssh_port = Some(ssh.local_addr().expect("addr").port());
    tweak(&mut config);
    let ssh_port = config.ssh_port.expect("port");
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let stop = CancellationToken::new();
    let (sim, addr, _task) = sim::start(config, listener, stop.clone())
        .await
        .expect("start");
    sim.preload_snapshots(&["default".into()]);
    sim::ssh::start(sim.clone(), ssh).expect("gateway");
    Running {
        sim,
        url: format!("http://{addr}"),
        ssh_port,
        http: reqwest::Client::new(),
        _dir: dir,
        stop,
    }
}

impl Running {
    async fn call(&self, method: reqwest::Method, path: &str, body: Option<Value>) -> (u16, Value) {
        let mut req = self
            .http
            .request(method, format!("{}{path}", self.url))
            .bearer_auth(KEY);
        if let Some(b) = body {
            req = req.json(&b);
        }
        let resp = req.send().await.expect("send");
        let status = resp.status().as_u16();
        let text = resp.text().await.expect("body");
        (
            status,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        )
    }

    async fn started_sandbox(&self) -> String {
        let (status, sb) = self
            .call(reqwest::Method::POST, "/api/sandbox", Some(json!({})))
            .await;
        assert_eq!(status, 200, "{sb}");
        let id = sb["id"].as_str().expect("id").to_string();
        for _ in 0..200 {
            let (_, s) = self
                .call(reqwest::Method::GET, &format!("/api/sandbox/{id}"), None)
                .await;
            if s["state"] == "started" {
                return id;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("sandbox never started");
    }
}

/// A Daytona-shaped error body.
fn assert_error_body(status: u16, body: &Value) {
    assert_eq!(body["statusCode"], status, "{body}");
    assert!(
        body["message"].as_str().is_some_and(|m| !m.is_empty()),
        "{body}"
    );
    assert!(
        body["timestamp"].is_string() && body["path"].is_string(),
        "{body}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stop_passes_through_stopping_for_its_delay() {
    let r = start(|c| c.stop_delay = Duration::from_millis(400)).await;
    let state = |s: &Value| s["state"].as_str().unwrap_or("").to_string();
    let (_, sb) = r
        .call(
            reqwest::Method::POST,
            "/api/sandbox",
            Some(json!({"name": "halts"})),
        )
        .await;
    let id = sb["id"].as_str().expect("id").to_string();
    let path = format!("/api/sandbox/{id}");
    for _ in 0..300 {
        if state(&r.call(reqwest::Method::GET, &path, None).await.1) == "started" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let (status, s) = r
        .call(reqwest::Method::POST, &format!("{path}/stop"), None)
        .await;
    assert_eq!(status, 200, "{s}");
    // The answer and a look right after both say stopping; it ends stopped.
    let (_, now) = r.call(reqwest::Method::GET, &path, None).await;
    assert_eq!(state(&now), "stopping", "{now}");
    let mut seen = vec![state(&now)];
    for _ in 0..300 {
        let st = state(&r.call(reqwest::Method::GET, &path, None).await.1);
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        if st == "stopped" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, ["stopping", "stopped"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn states_move_like_daytona() {
    let r = start(|c| {
        c.create_delay = Duration::from_millis(300);
        c.start_delay = Duration::from_millis(300);
    })
    .await;
    let (_, sb) = r
        .call(
            reqwest::Method::POST,
            "/api/sandbox",
            Some(json!({"name": "moves"})),
        )
        .await;
    assert_eq!(sb["state"], "creating");
    for field in [
        "kvm",
        "toolboxProxyUrl",
        "env",
        "organizationId",
        "cpu",
        "memory",
        "disk",
        "target",
    ] {
        assert!(sb.get(field).is_some(), "Sandbox has {field}");
    }
    let mut seen = vec![];
    for _ in 0..300 {
        let (_, s) = r
            .call(reqwest::Method::GET, "/api/sandbox/moves", None)
            .await;
        let st = s["state"].as_str().expect("state").to_string();
        if seen.last() != Some(&st) {
            seen.push(st.clone());
        }
        if st == "started" {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    assert_eq!(seen, ["creating", "starting", "started"]);
    // Delete: destroying, the name free at once, then 404.
    let (status, s) = r
        .call(reqwest::Method::DELETE, "/api/sandbox/moves", None)
        .await;
    assert_eq!((status, s["state"].as_str()), (200, Some("destroying")));
    let (status, _) = r
        .call(
            reqwest::Method::POST,
            "/api/sandbox",
            Some(json!({"name": "moves"})),
        )
        .await;
    assert_eq!(status, 200, "the name is free once destroying");
    let id = s["id"].as_str().expect("id").to_string();
    for _ in 0..300 {
        let (status, _) = r
            .call(reqwest::Method::GET, &format!("/api/sandbox/{id}"), None)
            .await;
        if status == 404 {
            return;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    panic!("a deleted sandbox never went 404");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn garbage_gets_daytona_errors_and_never_a_panic() {
    let r = start(|_| {}).await;
    let id = r.started_sandbox().await;
    use reqwest::Method as M;
    let routes: Vec<(M, String)> = vec![
        (M::POST, "/api/sandbox".into()),
        (M::PUT, format!("/api/sandbox/{id}/labels")),
        (M::POST, format!("/api/sandbox/{id}/network-settings")),
        (M::POST, "/api/snapshots".into()),
        (M::POST, format!("/toolbox/{id}/process/execute")),
        (M::POST, format!("/toolbox/{id}/process/session")),
        (M::POST, format!("/toolbox/{id}/files/bulk-download")),
        (M::POST, format!("/toolbox/{id}/process/session/nope/exec")),
        (M::POST, "/_sim/faults".into()),
    ];
    let bodies = [
        "",
        "{",
        "[]",
        "null",
        "{\"name\": 5}",
        "{\"labels\": \"x\"}",
        "\u{0}\u{1}",
        "{\"command\": []}",
    ];
    for (method, path) in &routes {
        for body in bodies {
            let resp = r
                .http
                .request(method.clone(), format!("{}{path}", r.url))
                .bearer_auth(KEY)
                .header("content-type", "application/json")
                .body(body)
                .send()
                .await
                .expect("send");
            let status = resp.status().as_u16();
            let json: Value = resp.json().await.unwrap_or(Value::Null);
            assert!(status < 500, "{method} {path} {body:?} -> {status} {json}");
            if status >= 400 {
                assert_error_body(status, &json);
            }
        }
    }
    // Unknown sandbox, unknown route, no token, wrong state.
    let (status, body) = r.call(M::GET, "/api/sandbox/nope", None).await;
    assert_eq!(status, 404);
    assert_error_body(status, &body);
    assert_eq!(body["source"], "DAYTONA_API");
    let (status, body) = r.call(M::GET, "/api/nothing-here", None).await;
    assert_eq!(status, 404);
    assert_error_body(status, &body);
    let resp = r
        .http
        .get(format!("{}/api/sandbox", r.url))
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 401);
    r.call(M::POST, &format!("/api/sandbox/{id}/stop"), None)
        .await;
    // (Stopped after the sim's stop delay: waited for, not slept on.)
    common::eventually(30, "the sandbox stops", || async {
        let (_, sb) = r.call(M::GET, &format!("/api/sandbox/{id}"), None).await;
        (sb["state"] == "stopped").then_some(())
    })
    .await;
    let (status, body) = r
        .call(
            M::POST,
            &format!("/toolbox/{id}/process/execute"),
            Some(json!({"command": "true"})),
        )
        .await;
    assert_eq!(status, 400);
    assert_eq!(body["source"], "DAYTONA_DAEMON");
    assert!(
        body["message"].as_str().expect("msg").contains("stopped"),
        "{body}"
    );
    // The sim is still up.
    let (status, _) = r.call(M::GET, "/api/sandbox", None).await;
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bulk_upload_pairs_parts_by_index_in_any_order() {
    let r = start(|_| {}).await;
    let id = r.started_sandbox().await;
    // Paths first (as the Python SDK sends them), then files in reverse order.
    let form = reqwest::multipart::Form::new()
        .text("files[0].path", "a/zero.txt")
        .text("files[1].path", "/tmp/one.txt")
        .part(
            "files[1].file",
            reqwest::multipart::Part::bytes(b"ONE".to_vec()).file_name("/tmp/one.txt"),
        )
        .part(
            "files[0].file",
            reqwest::multipart::Part::bytes(b"ZERO".to_vec()).file_name("a/zero.txt"),
        );
    let resp = r
        .http
        .post(format!("{}/toolbox/{id}/files/bulk-upload", r.url))
        .bearer_auth(KEY)
        .multipart(form)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 200);
    for (path, want) in [("a/zero.txt", "ZERO"), ("/tmp/one.txt", "ONE")] {
        let got = r
            .http
            .get(format!("{}/toolbox/{id}/files/download", r.url))
            .query(&[("path", path)])
            .bearer_auth(KEY)
            .send()
            .await
            .expect("send")
            .text()
            .await
            .expect("text");
        assert_eq!(got, want, "{path}");
    }
    // upload-v2 with a raw, streamed body.
    let big = vec![b'x'; 3 << 20];
    let resp = r
        .http
        .post(format!("{}/toolbox/{id}/files/upload-v2", r.url))
        .query(&[("path", "big.bin")])
        .bearer_auth(KEY)
        .body(big.clone())
        .send()
        .await
        .expect("send");
    let body: Value = resp.json().await.expect("json");
    assert_eq!(body["bytes"], big.len());
    // A path out of the sandbox, or through a symlink out of it, is refused.
    let (status, _) = r
        .call(
            reqwest::Method::POST,
            &format!("/toolbox/{id}/process/execute"),
            Some(json!({"command": "ln -s /etc /home/daytona/etc-link"})),
        )
        .await;
    assert_eq!(status, 200);
    for path in ["/etc/passwd", "etc-link/passwd", "../../../etc/passwd"] {
        let resp = r
            .http
            .get(format!("{}/toolbox/{id}/files/download", r.url))
            .query(&[("path", path)])
            .bearer_auth(KEY)
            .send()
            .await
            .expect("send");
        assert_eq!(resp.status().as_u16(), 400, "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn faults_drop_stick_and_error() {
    let r = start(|_| {}).await;
    let id = r.started_sandbox().await;
    // A dropped connection is an error on the client side, not an answer.
    r.call(
        reqwest::Method::POST,
        "/_sim/faults",
        Some(json!({"drop_rate": 1.0})),
    )
    .await;
    let resp = r
        .http
        .get(format!("{}/api/sandbox", r.url))
        .bearer_auth(KEY)
        .send()
        .await;
    let broken = match resp {
        Err(_) => true,
        Ok(resp) => resp.bytes().await.is_err(),
    };
    assert!(broken, "the connection was dropped");
    r.call(
        reqwest::Method::POST,
        "/_sim/faults",
        Some(json!({"drop_rate": 0.0, "stuck_create": true, "latency_ms": 5})),
    )
    .await;
    let (_, sb) = r
        .call(reqwest::Method::POST, "/api/sandbox", Some(json!({})))
        .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (_, again) = r
        .call(
            reqwest::Method::GET,
            &format!("/api/sandbox/{}", sb["id"].as_str().expect("id")),
            None,
        )
        .await;
    assert_eq!(again["state"], "creating", "a stuck create never finishes");
    let (_, faults) = r.call(reqwest::Method::POST, "/_sim/faults", Some(json!({"stuck_create": false, "latency_ms": 0, "sandbox_error": id, "error_reason": "boom"}))).await;
    assert_eq!(faults["stuck_create"], false);
    let (_, s) = r
        .call(reqwest::Method::GET, &format!("/api/sandbox/{id}"), None)
        .await;
    assert_eq!(
        (s["state"].as_str(), s["errorReason"].as_str()),
        (Some("error"), Some("boom"))
    );
    // Retry-After-<bucket>.
    r.call(reqwest::Method::POST, "/_sim/faults", Some(json!({"rate_limit_count": 1, "retry_after_secs": 3, "retry_after_bucket": "sandbox-create"}))).await;
    let resp = r
        .http
        .get(format!("{}/api/sandbox", r.url))
        .bearer_auth(KEY)
        .send()
        .await
        .expect("send");
    assert_eq!(resp.status().as_u16(), 429);
    assert_eq!(
        resp.headers()
            .get("retry-after-sandbox-create")
            .and_then(|v| v.to_str().ok()),
        Some("3")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_expired_ssh_token_is_refused() {
    let r = start(|_| {}).await;
    let id = r.started_sandbox().await;
    let (_, access) = r
        .call(
            reqwest::Method::POST,
            &format!("/api/sandbox/{id}/ssh-access?expiresInMinutes=1"),
            None,
        )
        .await;
    let token = access["token"].as_str().expect("token").to_string();
    let ssh = |token: String| {
        let port = r.ssh_port.to_string();
        async move {
            tokio::process::Command::new("ssh")
                .args([
                    "-p",
                    &port,
                    "-o",
                    "StrictHostKeyChecking=no",
                    "-o",
                    "UserKnownHostsFile=/dev/null",
                ])
                .args([
                    "-o",
                    "BatchMode=yes",
                    "-o",
                    "LogLevel=ERROR",
                    &format!("{token}@127.0.0.1"),
                    "echo in",
                ])
                .output()
                .await
                .expect("ssh ran")
        }
    };
    let ok = ssh(token.clone()).await;
    assert_eq!(
        String::from_utf8_lossy(&ok.stdout),
        "in\n",
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    // Age the token past its expiry.
    if let Ok(mut tokens) = r.sim.ssh_tokens.lock()
        && let Some(t) = tokens.get_mut(&token)
    {
        t.expires_ms = 1;
    }
    let refused = ssh(token.clone()).await;
    assert_eq!(refused.status.code(), Some(255));
    let (_, v) = r
        .call(
            reqwest::Method::GET,
            &format!("/api/sandbox/ssh-access/validate?token={token}"),
            None,
        )
        .await;
    assert_eq!(v["valid"], false);
    let _: BTreeMap<String, String> = BTreeMap::new();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_help_texts_curl_example_works_as_printed() {
    let r = start(|_| {}).await;
    // `curl -X POST http://ADDR/_sim/faults -d '{"error_rate":0.05}'` sends a form type.
    let resp = r
        .http
        .post(format!("{}/_sim/faults", r.url))
        .header("content-type", "application/x-www-form-urlencoded")
        .body(r#"{"error_rate":0.05}"#)
        .send()
        .await
        .expect("sent");
    assert!(resp.status().is_success(), "{}", resp.status());
    let now: serde_json::Value = r
        .http
        .get(format!("{}/_sim/faults", r.url))
        .send()
        .await
        .expect("get")
        .json()
        .await
        .expect("json");
    assert_eq!(now["error_rate"], 0.05);
    let bad = r
        .http
        .post(format!("{}/_sim/faults", r.url))
        .body("error_rate=1")
        .send()
        .await
        .expect("sent");
    assert_eq!(bad.status(), reqwest::StatusCode::BAD_REQUEST);
}

/// A WebSocket the sim ends while the client's frames are still unread (here: a refused
/// PTY attach, which reads nothing before it closes) ends with the closing handshake, not a
/// reset: the sim reads what the client sent until the client's close frame. Dropped with
/// those bytes unread, the kernel would reset the connection, and a client could lose the
/// frames sent before the reset (under load, crabbox's terminal client lost the exit so).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_socket_the_sim_ends_closes_cleanly_with_client_bytes_unread() {
    use futures_util::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::{Message, client::IntoClientRequest};
    let r = start(|_| {}).await;
    let id = r.started_sandbox().await;
    let url = format!(
        "{}/toolbox/{id}/process/pty/no-such-session/connect",
        r.url.replacen("http://", "ws://", 1)
    );
    let mut request = url.into_client_request().expect("request");
    request.headers_mut().insert(
        "authorization",
        format!("Bearer {KEY}").parse().expect("header"),
    );
    let (mut ws, _) = tokio_tungstenite::connect_async(request)
        .await
        .expect("connect");
    // Bytes in flight that the refusing side never asks for, then time for it to be done.
    ws.send(Message::Text("typed ahead".into()))
        .await
        .expect("send");
    tokio::time::sleep(Duration::from_millis(300)).await;
    let mut seen = Vec::new();
    loop {
        match tokio::time::timeout(Duration::from_secs(5), ws.next()).await {
            Err(_) => panic!("the socket neither closed nor ended; seen {seen:?}"),
            Ok(None) => break,
            Ok(Some(Ok(m))) => seen.push(m),
            Ok(Some(Err(e))) => panic!("the socket ended with {e} after {seen:?}"),
        }
    }
    assert!(
        matches!(&seen[..], [Message::Text(t), Message::Close(_)]
            if t.contains("Failed to connect to PTY session")),
        "{seen:?}"
    );
}
