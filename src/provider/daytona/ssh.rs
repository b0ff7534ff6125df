//! SSH access: minting (and reusing) access tokens, and reading Daytona's `sshCommand`.

use std::time::Duration;

use reqwest::Method;
use serde_json::Value;

use super::client::Idempotent;
use super::{DaytonaProvider, SSH_REFRESH_MARGIN, e};
use crate::provider::{ProviderError, ProviderErrorKind, SshAccessInfo};

impl DaytonaProvider {
    /// Mints SSH access (reusing a token with more than 10 minutes left).
    pub(super) async fn mint_ssh_access(
        &self,
        sandbox: &str,
        minutes: u32,
    ) -> Result<SshAccessInfo, ProviderError> {
        if let Some(cached) = self.ssh.get(sandbox) {
            let left = cached.expires_at_ms.saturating_sub(crate::clock::now_ms());
            if Duration::from_millis(left) > SSH_REFRESH_MARGIN {
                return Ok(cached.clone());
            }
        }
        let minutes = if minutes == 0 {
            self.settings.ssh_access_minutes
        } else {
            minutes
        };
        let v = self
            .api(
                Method::POST,
                &format!("/sandbox/{sandbox}/ssh-access?expiresInMinutes={minutes}"),
                None,
                Idempotent::Yes,
            )
            .await
            .map_err(|h| ProviderError::new(ProviderErrorKind::Ssh, h.error.message))?;
        let token = v
            .get("token")
            .and_then(Value::as_str)
            .filter(|t| !t.is_empty())
            .ok_or_else(|| {
                e(
                    ProviderErrorKind::Ssh,
                    "Daytona's ssh-access answer has no token",
                )
            })?
            .to_string();
        let (host, port, user) = match v
            .get("sshCommand")
            .and_then(Value::as_str)
            .filter(|c| !c.is_empty())
        {
            Some(cmd) => parse_ssh_command(cmd)
                .map_err(|m| e(ProviderErrorKind::Ssh, self.client.redact(&m)))?,
            None => (self.settings.ssh_gateway_host.clone(), 22, token.clone()),
        };
        let expires_at_ms = v
            .get("expiresAt")
            .and_then(Value::as_str)
            .and_then(|t| {
                humantime::parse_rfc3339_weak(
                    t.trim_end_matches('Z').split('.').next().unwrap_or(t),
                )
                .ok()
            })
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_millis() as u64)
            .unwrap_or_else(|| crate::clock::now_ms() + u64::from(minutes) * 60_000);
        let access = SshAccessInfo {
            host,
            port,
            user,
            expires_at_ms,
        };
        self.ssh.insert(sandbox.to_string(), access.clone());
        Ok(access)
    }
}

/// Parses Daytona's `sshCommand`: `ssh [-p N | -pN] user@host`. Any other option is refused
/// (it would be run on the user's machine).
pub fn parse_ssh_command(cmd: &str) -> Result<(String, u16, String), String> {
    let words: Vec<&str> = cmd.split_whitespace().collect();
    if words.first() != Some(&"ssh") {
        return Err(format!("unexpected sshCommand from Daytona: {cmd}"));
    }
    let mut port = 22u16;
    let mut target = None;
    let mut i = 1;
    while i < words.len() {
        let w = words[i];
        if w == "-p" {
            let n = words.get(i + 1).ok_or("sshCommand has -p without a port")?;
            port = n
                .parse()
                .map_err(|_| format!("bad port {n:?} in sshCommand"))?;
            i += 2;
            continue;
        }
        if let Some(n) = w.strip_prefix("-p") {
            port = n
                .parse()
                .map_err(|_| format!("bad port {n:?} in sshCommand"))?;
        } else if w.starts_with('-') {
            return Err(format!(
                "refusing sshCommand option {w:?}: only -p is accepted"
            ));
        } else if target.is_none() {
            target = Some(w);
        } else {
            return Err("sshCommand has more than one target".into());
        }
        i += 1;
    }
    let (user, host) = target
        .and_then(|t| t.rsplit_once('@'))
        .ok_or("sshCommand has no user@host")?;
    if user.is_empty() || host.is_empty() {
        return Err("sshCommand has an empty user or host".into());
    }
    Ok((host.to_string(), port, user.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ssh_commands() {
        assert_eq!(
            parse_ssh_command("ssh tok@ssh.app.daytona.io"),
            Ok(("ssh.app.daytona.io".into(), 22, "tok".into()))
        );
        assert_eq!(
            parse_ssh_command("ssh -p 2222 tok@h"),
            Ok(("h".into(), 2222, "tok".into()))
        );
        assert_eq!(
            parse_ssh_command("ssh -p2222 tok@h"),
            Ok(("h".into(), 2222, "tok".into()))
        );
        for bad in [
            "ssh -o ProxyCommand=evil tok@h",
            "scp tok@h",
            "ssh -p x tok@h",
            "ssh h",
            "ssh a@h b@h",
            "ssh -p",
        ] {
            assert!(parse_ssh_command(bad).is_err(), "{bad}");
        }
    }
}
