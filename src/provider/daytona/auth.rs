//! Finding Daytona credentials, in SPEC's order: `CRABBOX_DAYTONA_API_KEY`,
//! `DAYTONA_API_KEY`; `CRABBOX_DAYTONA_JWT_TOKEN` / `DAYTONA_JWT_TOKEN` with
//! `CRABBOX_DAYTONA_ORGANIZATION_ID` / `DAYTONA_ORGANIZATION_ID` (required with a JWT);
//! the config file; the Daytona CLI profile. They live in the daemon only.

use secrecy::{ExposeSecret, SecretString};
use std::path::{Path, PathBuf};

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

/// Where the credentials came from (for logs and `doctor`; never the secret itself).
pub fn describe(r: &Resolved) -> &'static str {
    match r {
        Resolved::Found(Credentials::ApiKey(_)) => "an API key",
        Resolved::Found(Credentials::Jwt { .. }) => "a JWT with an organization",
        Resolved::Missing => "none",
        Resolved::Invalid(_) => "unusable",
    }
}

/// Resolves credentials from the process environment, then `config`, then the Daytona
/// CLI profile. Answers the API URL the credentials belong to when the profile names one.
pub fn resolve(config: &DaytonaConfig) -> (Resolved, Option<String>) {
    resolve_with(config, &|k| std::env::var(k).ok())
}

/// [`resolve`] with the environment given as a lookup (for tests).
pub fn resolve_with(
    config: &DaytonaConfig,
    lookup: &dyn Fn(&str) -> Option<String>,
) -> (Resolved, Option<String>) {
    let env = |keys: &[&str]| {
        keys.iter()
            .find_map(|k| lookup(k).filter(|v| !v.trim().is_empty()))
            .map(|v| v.trim().to_string())
    };
    if let Some(key) = env(&["CRABBOX_DAYTONA_API_KEY", "DAYTONA_API_KEY"]) {
        return (Resolved::Found(Credentials::ApiKey(key.into())), None);
    }
    if let Some(token) = env(&["CRABBOX_DAYTONA_JWT_TOKEN", "DAYTONA_JWT_TOKEN"]) {
        let org = env(&["CRABBOX_DAYTONA_ORGANIZATION_ID", "DAYTONA_ORGANIZATION_ID"]);
        return (jwt(token.into(), org), None);
    }
    if let Some(key) = config
        .api_key
        .clone()
        .filter(|k| !k.expose_secret().is_empty())
    {
        return (Resolved::Found(Credentials::ApiKey(key)), None);
    }
    if let Some(token) = config
        .jwt_token
        .clone()
        .filter(|k| !k.expose_secret().is_empty())
    {
        return (jwt(token, config.organization_id.clone()), None);
    }
    let path = if let Some(d) = env(&["DAYTONA_CONFIG_DIR"]) {
        Some(PathBuf::from(d).join("config.json"))
    } else {
        env(&["XDG_CONFIG_HOME"])
            .map(PathBuf::from)
            .or_else(|| env(&["HOME"]).map(|h| PathBuf::from(h).join(".config")))
            .map(|base| base.join("daytona/config.json"))
    };
    match path.and_then(|p| std::fs::read_to_string(&p).ok().map(|t| (p, t))) {
        Some((p, text)) => profile(&p, &text),
        None => (Resolved::Missing, None),
    }
}

fn jwt(token: SecretString, org: Option<String>) -> Resolved {
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

/// The active profile of the Daytona CLI's `config.json`.
fn profile(path: &Path, text: &str) -> (Resolved, Option<String>) {
    let Ok(file) = serde_json::from_str::<ProfileFile>(text) else {
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
        return (Resolved::Found(Credentials::ApiKey(key.into())), url);
    }
    if let Some(t) = p.api.token {
        return (jwt(t.access_token.into(), p.active_organization_id), url);
    }
    (Resolved::Missing, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn run(env: &[(&str, &str)], config: DaytonaConfig) -> (Resolved, Option<String>) {
        let map: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        resolve_with(&config, &|k| map.get(k).cloned())
    }

    fn key(r: &Resolved) -> Option<&str> {
        match r {
            Resolved::Found(Credentials::ApiKey(k)) => Some(k.expose_secret()),
            _ => None,
        }
    }

    #[test]
    fn precedence() {
        let cfg = DaytonaConfig {
            api_key: Some(SecretString::from("from-config")),
            ..Default::default()
        };
        let both = [
            ("CRABBOX_DAYTONA_API_KEY", "crabbox"),
            ("DAYTONA_API_KEY", "daytona"),
        ];
        assert_eq!(key(&run(&both, cfg.clone()).0), Some("crabbox"));
        assert_eq!(key(&run(&both[1..], cfg.clone()).0), Some("daytona"));
        assert_eq!(key(&run(&[], cfg).0), Some("from-config"));
        let r = run(
            &[
                ("DAYTONA_JWT_TOKEN", "jwt"),
                ("DAYTONA_ORGANIZATION_ID", "org"),
            ],
            DaytonaConfig {
                api_key: Some(SecretString::from("cfg")),
                ..Default::default()
            },
        );
        assert!(
            matches!(r.0, Resolved::Found(Credentials::Jwt { ref organization_id, .. }) if organization_id == "org"),
            "a JWT in the environment beats config"
        );
    }

    #[test]
    fn a_jwt_without_organisation_is_a_clear_error() {
        let (r, _) = run(
            &[("DAYTONA_JWT_TOKEN", "secret-jwt")],
            DaytonaConfig::default(),
        );
        let Resolved::Invalid(e) = r else {
            panic!("expected an error")
        };
        assert!(
            e.message.contains("DAYTONA_ORGANIZATION_ID"),
            "{}",
            e.message
        );
        assert!(!e.message.contains("secret-jwt"));
    }

    #[test]
    fn the_cli_profile_is_the_last_resort() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cfg_dir = dir.path().to_str().expect("utf8").to_string();
        std::fs::write(
            dir.path().join("config.json"),
            r#"{"activeProfile":"p2","profiles":[
                {"id":"p1","name":"a","api":{"url":"https://one/api","key":"dtn_one","token":null}},
                {"id":"p2","name":"b","api":{"url":"https://two/api","key":null,
                 "token":{"accessToken":"tok","refreshToken":"r","expiresAt":"x"}},
                 "activeOrganizationId":"org2"}]}"#,
        )
        .expect("write");
        let (r, url) = run(
            &[("DAYTONA_CONFIG_DIR", &cfg_dir)],
            DaytonaConfig::default(),
        );
        assert!(
            matches!(r, Resolved::Found(Credentials::Jwt { ref organization_id, .. }) if organization_id == "org2")
        );
        assert_eq!(url.as_deref(), Some("https://two/api"));
        let none = run(
            &[("DAYTONA_CONFIG_DIR", "/nonexistent")],
            DaytonaConfig::default(),
        );
        assert!(matches!(none.0, Resolved::Missing));
    }
}
