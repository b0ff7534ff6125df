//! `crabbox port`: a URL for a port served in a lease (Daytona's preview URL, or a
//! signed one; locally loopback), and `--forward LOCAL:REMOTE` to reach it from a port
//! of this machine (locally a TCP splice; on Daytona an HTTP proxy that adds the token).

use std::net::SocketAddr;

use super::Ctx;
use crate::cli::{CliError, exit};
use crate::pb;

/// `crabbox port [LEASE] PORT` / `crabbox port [LEASE] --forward LOCAL:REMOTE`.
pub async fn port(
    ctx: &Ctx,
    words: &[String],
    forward: Option<&str>,
    signed: Option<std::time::Duration>,
    show_secret: bool,
) -> Result<i32, CliError> {
    let parse_port = |s: &str, what: &str| -> Result<u16, CliError> {
        s.parse::<u16>()
            .ok()
            .filter(|p| *p >= 1)
            .ok_or_else(|| CliError::usage(format!("{what} {s:?} is not a port (1-65535)")))
    };
    let (lease, remote, local) = match (forward, words) {
        (Some(f), lease) if lease.len() <= 1 => {
            let (l, r) = f.split_once(':').ok_or_else(|| {
                CliError::usage(format!(
                    "--forward {f}: write LOCAL:REMOTE, e.g. --forward 8080:3000"
                ))
            })?;
            (
                lease.first().cloned(),
                parse_port(r, "remote port")?,
                Some(parse_port(l, "local port")?),
            )
        }
        (None, [p]) => (None, parse_port(p, "port")?, None),
        (None, [lease, p]) => (Some(lease.clone()), parse_port(p, "port")?, None),
        _ => {
            return Err(CliError::usage(
                "crabbox port [LEASE] PORT, or crabbox port [LEASE] --forward LOCAL:REMOTE",
            ));
        }
    };
    if forward.is_some() && signed.is_some() {
        return Err(CliError::usage(
            "--forward uses the preview's token itself: --signed does not go with it",
        ));
    }
    let mut c = ctx.clients().await?;
    let answer = c
        .leases
        .port(pb::PortRequest {
            lease: lease.unwrap_or_default(),
            repo_root: ctx.repo(),
            port: remote.into(),
            signed_ttl_secs: signed.map_or(0, |d| d.as_secs().max(1)),
        })
        .await?
        .into_inner();
    let Some(local) = local else {
        return print(ctx, &answer, signed.is_some(), show_secret);
    };
    forward_to(ctx, &answer, local).await
}

/// The signed URL's token part, redacted (`/s/<token>` or `<port>-<token>.` hosts).
fn redact_url(url: &str, token: &str) -> String {
    if token.is_empty() {
        url.to_string()
    } else {
        url.replace(token, "<redacted>")
    }
}

fn print(ctx: &Ctx, a: &pb::PortAnswer, signed: bool, show_secret: bool) -> Result<i32, CliError> {
    // A signed URL carries its token: the part after the last `/s/` or the host's label.
    let signed_token = if signed {
        a.url
            .rsplit_once("/s/")
            .map(|(_, t)| t.split('/').next().unwrap_or("").to_string())
            .unwrap_or_default()
    } else {
        String::new()
    };
    let url = if show_secret {
        a.url.clone()
    } else {
        redact_url(&a.url, &signed_token)
    };
    let token = if a.token.is_empty() {
        None
    } else if show_secret {
        Some(a.token.clone())
    } else {
        Some("<redacted>".to_string())
    };
    let expires = a
        .expires_at
        .as_ref()
        .map(|t| crate::clock::rfc3339(pb::timestamp_ms(Some(t))));
    if ctx.json {
        super::output::print_json(&serde_json::json!({
            "url": url,
            "token": token,
            "header": (!a.header.is_empty() && token.is_some()).then_some(&a.header),
            "expires_at": expires,
            "lease": a.lease.as_ref().map(super::output::lease_json),
        }));
        return Ok(exit::OK);
    }
    println!("{url}");
    if let Some(t) = &token {
        println!("{}: {t}", a.header);
    }
    if let Some(e) = &expires {
        ctx.progress(format!("the URL works until {e}"));
    }
    if !show_secret && (token.is_some() || !signed_token.is_empty()) {
        ctx.progress(
            "the access token is redacted: pass --show-secret to print it, or use \
             `crabbox port --forward LOCAL:REMOTE` to reach the port without it",
        );
    }
    Ok(exit::OK)
}

/// Serves 127.0.0.1:`local` until interrupted, reaching the lease's port.
async fn forward_to(ctx: &Ctx, a: &pb::PortAnswer, local: u16) -> Result<i32, CliError> {
    let addr = SocketAddr::from(([127, 0, 0, 1], local));
    let listener = tokio::net::TcpListener::bind(addr).await.map_err(|e| {
        CliError::usage(format!(
            "cannot listen on {addr}: {e} (pick another local port)"
        ))
    })?;
    let bound = listener
        .local_addr()
        .map_err(|e| CliError::new(exit::INTERNAL, e.to_string()))?;
    let direct = a.token.is_empty() && a.url.starts_with("http://127.0.0.1:");
    // Said on stdout: a script waits for this line before using the port.
    println!(
        "forwarding http://{bound} -> {}",
        redact_url(&a.url, &a.token)
    );
    ctx.progress("Ctrl-C stops it");
    let interrupted = tokio::signal::ctrl_c();
    if direct {
        // Loopback on this machine: any protocol, byte for byte.
        let target = a
            .url
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let serve = async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let target = target.clone();
                tokio::spawn(async move {
                    if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                        let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                    }
                });
            }
        };
        tokio::select! {
            () = serve => {}
            _ = interrupted => {}
        }
        return Ok(exit::OK);
    }
    // A preview URL: HTTP through it, with the token added to each request.
    let base = a.url.trim_end_matches('/').to_string();
    let (header, token) = (a.header.clone(), a.token.clone());
    let http = reqwest::Client::new();
    let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
        let (base, header, token, http) =
            (base.clone(), header.clone(), token.clone(), http.clone());
        async move { proxy(&http, &base, &header, &token, req).await }
    });
    tokio::select! {
        r = axum::serve(listener, app) => {
            r.map_err(|e| CliError::new(exit::INTERNAL, format!("forwarding: {e}")))?;
        }
        _ = interrupted => {}
    }
    Ok(exit::OK)
}

async fn proxy(
    http: &reqwest::Client,
    base: &str,
    header: &str,
    token: &str,
    req: axum::extract::Request,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let path = req
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let mut headers = req.headers().clone();
    for h in ["host", "connection", "content-length"] {
        headers.remove(h);
    }
    let mut call = http
        .request(req.method().clone(), format!("{base}{path}"))
        .headers(headers)
        .body(reqwest::Body::wrap_stream(
            req.into_body().into_data_stream(),
        ));
    if !token.is_empty() && !header.is_empty() {
        call = call.header(header, token);
    }
    match call.send().await {
        Ok(answer) => {
            let mut out = axum::response::Response::builder().status(answer.status().as_u16());
            for (k, v) in answer.headers() {
                if !matches!(
                    k.as_str(),
                    "connection" | "transfer-encoding" | "content-length"
                ) {
                    out = out.header(k, v);
                }
            }
            out.body(axum::body::Body::from_stream(answer.bytes_stream()))
                .unwrap_or_else(|_| {
                    (axum::http::StatusCode::BAD_GATEWAY, "bad answer").into_response()
                })
        }
        Err(e) => (
            axum::http::StatusCode::BAD_GATEWAY,
            format!("crabbox port --forward: the preview did not answer: {e}\n"),
        )
            .into_response(),
    }
}
