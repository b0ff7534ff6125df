//! Finding Daytona credentials, in SPEC's order: `CRABBOX_DAYTONA_API_KEY`,
//! `DAYTONA_API_KEY`; `CRABBOX_DAYTONA_JWT_TOKEN` / `DAYTONA_JWT_TOKEN` with
//! `CRABBOX_DAYTONA_ORGANIZATION_ID` / `DAYTONA_ORGANIZATION_ID` (required with a JWT);
//! the config file; the Daytona CLI profile. They live in the daemon only.

use std::path::PathBuf;

use serde::Deserialize;

use super::client::Credentials;
use crate::config::DaytonaConfig;
use crate::provider::{ProviderError, ProviderErrorKind};

/// What the search found.
#[derive(Debug)]
pub enum Resolved {
    Found(Credentials),
    Missing,
    /// Something was found but cannot be used (a JWT without organisation).
    Invalid(ProviderError),
}

/// Where the credentials came from (for `doctor`; never the secret itself).
pub fn describe(r: &Resolved) -> &'static str {
    match r {
        Resolved::Found(Credentials::ApiKey(_)) => "an API key",
        Resolved::Found(Credentials::Jwt { .. }) => "a JWT with an organization",
        Resolved::Missing => "none",
        Resolved::Invalid(_) => "unusable",
    }
}

fn env(keys: &[&str]) -> Option<String> {
    keys.iter()
        .find_map(|k| std::env::var(k).ok().filter(|v| !v.trim().is_empty()))
        .map(|v| v.trim().to_string())
}

/// Resolves credentials from the environment, then `config`, then the CLI profile.
/// Answers the API URL the credentials belong to when the profile names one.
pub fn resolve(config: &DaytonaConfig) -> (Resolved, Option<String>) {
    if let Some(key) = env(&["CRABBOX_DAYTONA_API_KEY", "DAYTONA_API_KEY"]) {
        return (Resolved::Found(Credentials::ApiKey(key)), None);
    }
    if let Some(token) = env(&["CRABBOX_DAYTONA_JWT_TOKEN", "DAYTONA_JWT_TOKEN"]) {
        return (
            jwt(
                token,
                env(&["CRABBOX_DAYTONA_ORGANIZATION_ID", "DAYTONA_ORGANIZATION_ID"]),
            ),
            None,
        );
    }
    if let Some(key) = config.api_key.clone().filter(|k| !k.is_empty()) {
        return (Resolved::Found(Credentials::ApiKey(key)), None);
    }
    if let Some(token) = config.jwt_token.clone().filter(|k| !k.is_empty()) {
        return (jwt(token, config.organization_id.clone()), None);
    }
    profile()
}

fn jwt(token: String, org: Option<String>) -> Resolved {
    match org.filter(|o| !o.is_empty()) {
        Some(organization_id) => Resolved::Found(Credentials::Jwt {
            token,
            organization_id,
        }),
        None => Resolved::Invalid(ProviderError::new(
            ProviderErrorKind::Auth,
            "a Daytona JWT needs its organization: set CRABBOX_DAYTONA_ORGANIZATION_ID or \
             DAYTONA_ORGANIZATION_ID (or daytona.organizationId in config), then restart the \
             daemon",
        )),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileFile {
    active_profile: Option<String>,
    #[serde(default)]
    profiles: Vec<Profile>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Profile {
    id: String,
    api: ProfileApi,
    active_organization_id: Option<String>,
}

#[derive(Deserialize)]
struct ProfileApi {
    url: Option<String>,
    key: Option<String>,
    token: Option<ProfileToken>,
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct ProfileToken {
    access_token: String,
}

/// The Daytona CLI's config file.
fn profile_path() -> Option<PathBuf> {
    if let Some(d) = env(&["DAYTONA_CONFIG_DIR"]) {
        return Some(PathBuf::from(d).join("config.json"));
    }
    let base = env(&["XDG_CONFIG_HOME"])
        .map(PathBuf::from)
        .or_else(|| env(&["HOME"]).map(|h| PathBuf::from(h).join(".config")))?;
    Some(base.join("daytona/config.json"))
}

fn profile() -> (Resolved, Option<String>) {
    let Some(path) = profile_path() else {
        return (Resolved::Missing, None);
    };
    let Ok(text) = std::fs::read_to_string(&path) else {
        return (Resolved::Missing, None);
    };
    let Ok(file) = serde_json::from_str::<ProfileFile>(&text) else {
        tracing::warn!(path = %path.display(), "the Daytona CLI config is not readable; ignoring it");
        return (Resolved::Missing, None);
    };
    let Some(active) = file.active_profile else {
        return (Resolved::Missing, None);
    };
    let Some(p) = file.profiles.into_iter().find(|p| p.id == active) else {
        return (Resolved::Missing, None);
    };
    let url = p.api.url.clone();
    if let Some(key) = p.api.key.filter(|k| !k.is_empty()) {
        return (Resolved::Found(Credentials::ApiKey(key)), url);
    }
    if let Some(t) = p.api.token {
        return (jwt(t.access_token, p.active_organization_id), url);
    }
    (Resolved::Missing, None)
}
