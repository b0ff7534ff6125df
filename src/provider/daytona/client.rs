//! Daytona's REST API (control plane and toolbox) over reqwest: authentication headers,
//! lenient JSON, one error type that keeps Daytona's message, retries that honour
//! `Retry-After` (and `Retry-After-<bucket>`) on 429 and retry 5xx and dropped connections
//! with jittered backoff on idempotent calls only. Every error message is redacted.

use std::time::Duration;

use reqwest::header::{AUTHORIZATION, HeaderMap, HeaderValue};
use reqwest::{Method, RequestBuilder, StatusCode};
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

use crate::provider::{ProviderError, ProviderErrorKind};

/// How a client authenticates. The secrets are `SecretString`s: their `Debug` says
/// `[REDACTED]`, and reading one takes an explicit `expose_secret()`.
#[derive(Clone, Debug)]
pub enum Credentials {
    ApiKey(SecretString),
    Jwt {
        token: SecretString,
        organization_id: String,
    },
}

impl Credentials {
    fn secret(&self) -> &str {
        match self {
            Credentials::ApiKey(k) => k.expose_secret(),
            Credentials::Jwt { token, .. } => token.expose_secret(),
        }
    }
}

/// Whether a call may be repeated after a failure whose outcome is unknown.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Idempotent {
    Yes,
    /// Never re-sent on a 5xx or a dropped connection (a create, a command): the caller
    /// recovers by looking the effect up.
    No,
}

/// Retry policy: attempts and backoff bounds.
#[derive(Debug, Clone, Copy)]
pub struct RetryPolicy {
    pub attempts: u32,
    pub base: Duration,
    pub cap: Duration,
    /// The longest `Retry-After` honoured (longer ones fail the call).
    pub max_retry_after: Duration,
    /// Rate limiting (429) is waited out up to this many times and this much in total.
    pub rate_limited_attempts: u32,
    pub rate_limited_wait: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 6,
            base: Duration::from_millis(100),
            cap: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(60),
            rate_limited_attempts: 50,
            rate_limited_wait: Duration::from_secs(180),
        }
    }
}

/// The retry decisions of one call, shared by every request and the log WebSocket's
/// handshake: a 429 is waited out (its `Retry-After`, bounded) whatever the call, since it
/// was refused before any work; a 5xx or a dropped connection is retried with jittered
/// backoff only when the call is idempotent.
#[derive(Debug)]
pub struct Retries {
    policy: RetryPolicy,
    idempotent: Idempotent,
    attempts: u32,
    rate_limited: u32,
    waited: Duration,
}

impl Retries {
    pub fn new(policy: RetryPolicy, idempotent: Idempotent) -> Self {
        Retries {
            policy,
            idempotent,
            attempts: 0,
            rate_limited: 0,
            waited: Duration::ZERO,
        }
    }

    /// After a failed try (`status` None: no answer), how long to wait before the next
    /// one, or, when the call must fail now, what to add to its error message.
    pub fn after_failure(
        &mut self,
        status: Option<StatusCode>,
        retry_after: Option<Duration>,
    ) -> Result<Duration, String> {
        let code = status.map(|s| s.as_u16());
        let retryable = match code {
            Some(429) => {
                self.rate_limited += 1;
                self.rate_limited < self.policy.rate_limited_attempts
                    && self.waited < self.policy.rate_limited_wait
            }
            Some(500..=599) | None => {
                self.attempts += 1;
                self.idempotent == Idempotent::Yes && self.attempts < self.policy.attempts
            }
            _ => {
                self.attempts += 1;
                false
            }
        };
        if !retryable {
            let tries = self.attempts + self.rate_limited;
            return Err(if tries > 1 {
                format!(" (after {tries} attempts)")
            } else {
                String::new()
            });
        }
        let delay = match retry_after {
            Some(d) if d > self.policy.max_retry_after => {
                return Err(format!(" (asked to retry after {}s)", d.as_secs()));
            }
            Some(d) => d,
            None if code == Some(429) => backoff(self.policy, self.rate_limited),
            None => backoff(self.policy, self.attempts),
        };
        self.waited += delay;
        Ok(delay)
    }
}

/// A Daytona API client.
#[derive(Clone)]
pub struct Client {
    http: reqwest::Client,
    api_url: String,
    credentials: Option<Credentials>,
    pub retry: RetryPolicy,
}

/// Removes every secret we know of, and anything that looks like one, from `text`.
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| s.len() >= 4) {
        out = out.replace(s, "<redacted>");
    }
    // `Bearer xyz`, Daytona keys (`dtn_…`), JWT-shaped tokens.
    let mut result = String::with_capacity(out.len());
    let mut rest = out.as_str();
    while let Some(i) = rest.find("Bearer ") {
        result.push_str(&rest[..i + 7]);
        let after = &rest[i + 7..];
        let end = after
            .find(|c: char| c.is_whitespace() || c == '"' || c == '\'')
            .unwrap_or(after.len());
        result.push_str("<redacted>");
        rest = &after[end..];
    }
    result.push_str(rest);
    result
        .split_inclusive(|c: char| c.is_whitespace() || c == '"' || c == '\'' || c == '@')
        .map(|word| {
            let (core, tail) = split_tail(word);
            let looks_secret = core.starts_with("dtn_")
                || (core.starts_with("eyJ") && core.matches('.').count() == 2 && core.len() > 20);
            if looks_secret {
                format!("<redacted>{tail}")
            } else {
                word.to_string()
            }
        })
        .collect()
}

fn split_tail(word: &str) -> (&str, &str) {
    match word.char_indices().last() {
        Some((i, c)) if c.is_whitespace() || c == '"' || c == '\'' || c == '@' => {
            (&word[..i], &word[i..])
        }
        _ => (word, ""),
    }
}

/// Whether Daytona's message says an organization quota is used up (its 403s for the
/// total CPU, memory, disk or sandbox count).
fn is_quota(message: &str) -> bool {
    let m = message.to_ascii_lowercase();
    m.contains("limit exceeded") || m.contains("quota")
}

fn kind_for(status: StatusCode, message: &str) -> ProviderErrorKind {
    match status.as_u16() {
        401 => ProviderErrorKind::Auth,
        // A quota is not a permission: nothing is wrong with the key.
        403 if is_quota(message) => ProviderErrorKind::Provisioning,
        403 => ProviderErrorKind::Permission,
        404 => ProviderErrorKind::NotFound,
        408 | 429 | 500..=599 => ProviderErrorKind::Unavailable,
        400 | 409 | 422 => ProviderErrorKind::Invalid,
        _ => ProviderErrorKind::Other,
    }
}

/// A failed HTTP answer, with Daytona's message.
#[derive(Debug, Clone)]
pub struct HttpError {
    pub status: Option<StatusCode>,
    pub error: ProviderError,
}

impl Client {
    pub fn new(api_url: &str, credentials: Option<Credentials>) -> Result<Client, ProviderError> {
        let http = reqwest::Client::builder()
            .connect_timeout(Duration::from_secs(10))
            .user_agent(concat!("crabbox/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| {
                ProviderError::new(
                    ProviderErrorKind::Other,
                    format!("building the HTTP client: {e}"),
                )
            })?;
        Ok(Client {
            http,
            api_url: api_url.trim_end_matches('/').to_string(),
            credentials,
            retry: RetryPolicy::default(),
        })
    }

    /// What the events channel's connect packet carries: the token (a secret: never log
    /// it) and, with a JWT, the organization.
    pub fn event_credentials(&self) -> Option<(SecretString, Option<String>)> {
        self.credentials.as_ref().map(|c| match c {
            Credentials::ApiKey(k) => (k.clone(), None),
            Credentials::Jwt {
                token,
                organization_id,
            } => (token.clone(), Some(organization_id.clone())),
        })
    }

    pub fn api_url(&self) -> &str {
        &self.api_url
    }

    /// What identifies the account, for keyed names: the credentials themselves, which
    /// only ever enter a one-way key derivation.
    pub fn account_material(&self) -> String {
        match &self.credentials {
            Some(Credentials::ApiKey(k)) => k.expose_secret().to_string(),
            Some(Credentials::Jwt {
                organization_id, ..
            }) => organization_id.clone(),
            None => String::new(),
        }
    }

    pub fn has_credentials(&self) -> bool {
        self.credentials.is_some()
    }

    /// Redacts this client's secrets (and secret-shaped words) from a message.
    pub fn redact(&self, text: &str) -> String {
        let secrets: Vec<&str> = self.credentials.iter().map(|c| c.secret()).collect();
        redact(text, &secrets)
    }

    fn err(&self, kind: ProviderErrorKind, message: String) -> ProviderError {
        ProviderError::new(kind, self.redact(&message))
    }

    /// The headers every Daytona request carries: auth and client identification. The
    /// log WebSocket's handshake carries the same ones.
    pub fn auth_headers(&self) -> Result<HeaderMap, ProviderError> {
        let creds = self.credentials.as_ref().ok_or_else(no_credentials)?;
        let value = |v: &str| {
            HeaderValue::from_str(v).map_err(|_| {
                ProviderError::new(
                    ProviderErrorKind::Auth,
                    "the Daytona credentials contain characters that cannot go in an HTTP \
                     header; check the API key or token",
                )
            })
        };
        let mut h = HeaderMap::new();
        let mut auth = value(&format!("Bearer {}", creds.secret()))?;
        auth.set_sensitive(true);
        h.insert(AUTHORIZATION, auth);
        h.insert("X-Daytona-Source", HeaderValue::from_static("crabbox"));
        h.insert(
            "X-Daytona-SDK-Version",
            HeaderValue::from_static(env!("CARGO_PKG_VERSION")),
        );
        if let Credentials::Jwt {
            organization_id, ..
        } = creds
        {
            h.insert("X-Daytona-Organization-ID", value(organization_id)?);
        }
        Ok(h)
    }

    /// A request on this client's connection pool (auth is added when it is sent).
    pub fn request(&self, method: Method, url: &str) -> RequestBuilder {
        self.http.request(method, url)
    }

    /// The control-plane URL of `path` (which starts with `/`).
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.api_url)
    }

    /// A JSON call to an absolute URL, with retries as `idempotent` allows.
    pub async fn json(
        &self,
        method: Method,
        url: &str,
        body: Option<&Value>,
        idempotent: Idempotent,
    ) -> Result<Value, HttpError> {
        self.send(idempotent, || {
            let mut req = self.http.request(method.clone(), url);
            if let Some(b) = body {
                req = req.json(b);
            }
            Ok(req)
        })
        .await
        .map(|bytes| {
            if bytes.is_empty() {
                Value::Null
            } else {
                // Lenient: an answer we cannot parse is kept as a string, never a failure.
                serde_json::from_slice(&bytes)
                    .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&bytes).into_owned()))
            }
        })
    }

    /// Sends the request `make` builds (again on each retry); answers the body.
    pub async fn send(
        &self,
        idempotent: Idempotent,
        make: impl Fn() -> Result<RequestBuilder, ProviderError>,
    ) -> Result<Vec<u8>, HttpError> {
        let mut retries = Retries::new(self.retry, idempotent);
        loop {
            let req = make()
                .and_then(|r| Ok(r.headers(self.auth_headers()?)))
                .map_err(|e| HttpError {
                    status: None,
                    error: e,
                })?;
            let (http, request) = req.build_split();
            let request = request.map_err(|e| HttpError {
                status: None,
                error: self.err(
                    ProviderErrorKind::Invalid,
                    format!("building a request: {e}"),
                ),
            })?;
            let route = crate::metrics::route(request.method().as_str(), request.url().path());
            let sent = std::time::Instant::now();
            let answer = http.execute(request).await;
            let code = answer.as_ref().map_or(0, |r| r.status().as_u16());
            crate::metrics::provider_request("daytona", &route, code, sent.elapsed());
            tracing::debug!(%route, status = code, ms = sent.elapsed().as_millis() as u64, "daytona call");
            let (status, retry_after, message) = match answer {
                Ok(resp) => {
                    let status = resp.status();
                    let retry_after = retry_after(resp.headers());
                    match resp.bytes().await {
                        Ok(body) if status.is_success() => return Ok(body.to_vec()),
                        Ok(body) => (Some(status), retry_after, self.message(status, &body)),
                        // Answer cut mid-body: like a dropped connection.
                        Err(e) => (
                            None,
                            None,
                            format!("the connection dropped mid-answer: {e}"),
                        ),
                    }
                }
                Err(e) => (None, None, connect_message(&e)),
            };
            match retries.after_failure(status, retry_after) {
                Ok(delay) => {
                    let status_text =
                        status.map_or("no answer".to_string(), |s| s.as_u16().to_string());
                    tracing::debug!(%route, status = %status_text,
                        wait = %humantime::format_duration(delay), "daytona call failed; retrying after the wait");
                    if delay >= Duration::from_secs(1) {
                        // A wait a person notices: said as progress.
                        let why = if status.is_some_and(|s| s.as_u16() == 429) {
                            "Daytona's rate limit (429)".to_string()
                        } else {
                            format!("Daytona answered {status_text}")
                        };
                        tracing::info!(
                            progress = true,
                            "{why}: waiting {} before trying again",
                            humantime::format_duration(Duration::from_secs(delay.as_secs()))
                        );
                    }
                    crate::metrics::provider_retry(
                        "daytona",
                        &status.map_or("connection".to_string(), |s| s.as_u16().to_string()),
                        delay,
                        status.is_some_and(|s| s.as_u16() == 429),
                    );
                    tokio::time::sleep(delay).await;
                }
                Err(detail) => {
                    let kind = status
                        .map(|s| kind_for(s, &message))
                        .unwrap_or(ProviderErrorKind::Unavailable);
                    return Err(HttpError {
                        status,
                        error: self.err(kind, format!("{message}{detail}")),
                    });
                }
            }
        }
    }

    fn message(&self, status: StatusCode, body: &[u8]) -> String {
        let parsed: Option<Value> = serde_json::from_slice(body).ok();
        let text = parsed
            .as_ref()
            .and_then(|v| {
                v.get("message")
                    .and_then(|m| match m {
                        Value::String(s) => Some(s.clone()),
                        Value::Array(a) => Some(
                            a.iter()
                                .filter_map(Value::as_str)
                                .collect::<Vec<_>>()
                                .join("; "),
                        ),
                        _ => None,
                    })
                    .or_else(|| v.get("error").and_then(Value::as_str).map(str::to_string))
            })
            .unwrap_or_else(|| String::from_utf8_lossy(body).chars().take(300).collect());
        let hint = match status.as_u16() {
            401 => "; check the Daytona API key (CRABBOX_DAYTONA_API_KEY or DAYTONA_API_KEY)",
            403 if is_quota(&text) => {
                "; the organization's quota is used up: stop or delete sandboxes (`crabbox list`), \
                 or raise the quota"
            }
            403 => {
                "; the key lacks a permission (crabbox needs write:sandboxes and delete:sandboxes)"
            }
            429 => "; Daytona is rate limiting",
            _ => "",
        };
        format!("Daytona answered {}: {text}{hint}", status.as_u16())
    }
}

fn connect_message(e: &reqwest::Error) -> String {
    let mut msg = format!("cannot reach Daytona: {e}");
    let mut src = std::error::Error::source(e);
    while let Some(s) = src {
        msg = format!("{msg}: {s}");
        src = s.source();
    }
    msg
}

/// `Retry-After: <secs>` or `Retry-After-<bucket>: <secs>` (the longest wins).
pub fn retry_after(headers: &reqwest::header::HeaderMap) -> Option<Duration> {
    headers
        .iter()
        .filter(|(k, _)| k.as_str().starts_with("retry-after"))
        .filter_map(|(_, v)| v.to_str().ok()?.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(Duration::from_secs_f64)
        .max()
}

/// Exponential backoff with full jitter.
pub(crate) fn backoff(policy: RetryPolicy, attempt: u32) -> Duration {
    let exp = policy
        .base
        .saturating_mul(1 << attempt.min(10))
        .min(policy.cap);
    exp.mul_f64(rand::random::<f64>().max(0.1))
}

/// The error for a daemon with no Daytona credentials: every way to give them.
pub fn no_credentials() -> ProviderError {
    ProviderError::new(
        ProviderErrorKind::Auth,
        "no Daytona credentials: set CRABBOX_DAYTONA_API_KEY or DAYTONA_API_KEY (or \
         CRABBOX_DAYTONA_JWT_TOKEN / DAYTONA_JWT_TOKEN with CRABBOX_DAYTONA_ORGANIZATION_ID / \
         DAYTONA_ORGANIZATION_ID), or daytona.apiKey in ~/.config/crabbox/config.yaml, or log in \
         with the Daytona CLI; then restart the daemon (`crabbox daemon stop`) so it reads them",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redaction() {
        let key = "dtn_0123456789abcdef";
        let text = format!(
            "Authorization: Bearer {key} failed for {key}; token eyJhbGciOi.eyJzdWIi.c2lnbmF0dXJl@host"
        );
        let r = redact(&text, &[key]);
        assert!(!r.contains(key) && !r.contains("eyJhbGciOi"), "{r}");
        assert!(
            r.contains("Bearer <redacted>") && r.contains("@host"),
            "{r}"
        );
        assert_eq!(redact("dtn_other_key leaked", &[]), "<redacted> leaked");
        assert_eq!(redact("plain words stay", &["k"]), "plain words stay");
    }

    #[test]
    fn retry_after_buckets() {
        let mut h = reqwest::header::HeaderMap::new();
        assert_eq!(retry_after(&h), None);
        h.insert("retry-after", "2".parse().expect("v"));
        h.insert("retry-after-sandbox-create", "5".parse().expect("v"));
        assert_eq!(retry_after(&h), Some(Duration::from_secs(5)));
    }

    #[test]
    fn backoff_is_bounded() {
        let p = RetryPolicy::default();
        for attempt in 1..20 {
            assert!(backoff(p, attempt) <= p.cap);
        }
    }
}
