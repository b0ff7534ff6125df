//! daytona-sim's SSH gateway: the access token is the user name, with auth `none`, as on
//! Daytona's gateway. It gives an exec or a shell in the token's sandbox (jailed like every
//! sandbox command), on a PTY when the client asks for one (window size changes followed),
//! else over pipes (stdout and stderr apart). Expired and revoked tokens are refused.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use russh::server::{Auth, Msg, Server, Session};
use russh::{Channel, ChannelId};
use tokio::sync::mpsc;

use super::Sim;
use crate::sandbox::process::{self, ExecOutput, Input, ProcessSpec, PtySize};

/// The gateway's host key: an Ed25519 key from a seed kept in the state dir, so that it
/// stays the same across restarts of the sim.
fn host_key(state_dir: &std::path::Path) -> std::io::Result<russh::keys::PrivateKey> {
    let path = state_dir.join("ssh_host_ed25519_seed");
    let seed: [u8; 32] = match std::fs::read(&path) {
        Ok(bytes) if bytes.len() == 32 => {
            let mut s = [0u8; 32];
            s.copy_from_slice(&bytes);
            s
        }
        _ => {
            let s: [u8; 32] = rand::random();
            std::fs::write(&path, s)?;
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600))?;
            s
        }
    };
    let pair = russh::keys::ssh_key::private::Ed25519Keypair::from_seed(&seed);
    Ok(russh::keys::PrivateKey::from(pair))
}

/// Serves the gateway on `listener` until the sim shuts down.
pub fn start(
    sim: Arc<Sim>,
    listener: tokio::net::TcpListener,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let config = Arc::new(russh::server::Config {
        inactivity_timeout: Some(Duration::from_secs(3600)),
        // Tokens are long random secrets; a short constant rejection time is enough.
        auth_rejection_time: Duration::from_millis(100),
        auth_rejection_time_initial: Some(Duration::ZERO),
        keys: vec![host_key(&sim.config.state_dir)?],
        ..Default::default()
    });
    let mut gateway = Gateway { sim: sim.clone() };
    Ok(tokio::spawn(async move {
        let running = gateway.run_on_socket(config, &listener);
        let handle = running.handle();
        tokio::select! {
            r = running => {
                if let Err(e) = r {
                    tracing::error!(error = %e, "ssh gateway stopped");
                }
            }
            () = sim.shutdown.cancelled() => handle.shutdown("daytona-sim shutting down".into()),
        }
    }))
}

struct Gateway {
    sim: Arc<Sim>,
}

impl Server for Gateway {
    type Handler = Conn;

    fn new_client(&mut self, _peer: Option<std::net::SocketAddr>) -> Conn {
        Conn {
            sim: self.sim.clone(),
            sandbox: None,
            env: HashMap::new(),
            input: HashMap::new(),
            pty: HashMap::new(),
        }
    }
}

/// One SSH connection.
struct Conn {
    sim: Arc<Sim>,
    /// The sandbox the token opened, once authenticated.
    sandbox: Option<String>,
    /// Variables the client sent per channel (`SendEnv`).
    env: HashMap<ChannelId, BTreeMap<String, String>>,
    /// Where a channel's input (and, on a terminal, window sizes) goes while its command
    /// runs.
    input: HashMap<ChannelId, mpsc::Sender<Input>>,
    /// The terminal a channel asked for: (TERM, columns, rows).
    pty: HashMap<ChannelId, (String, u16, u16)>,
}

/// A terminal size from the client's (0, as sent by `ssh -tt` without a terminal, means
/// the customary 80x24).
fn size(cols: u32, rows: u32) -> (u16, u16) {
    let pick = |v: u32, d: u16| if v == 0 { d } else { v.min(1000) as u16 };
    (pick(cols, 80), pick(rows, 24))
}

impl Conn {
    /// Starts `command` (or a shell) in the sandbox and pumps it to the channel.
    fn spawn(
        &mut self,
        channel: ChannelId,
        command: Option<String>,
        session: &mut Session,
    ) -> Result<(), russh::Error> {
        let Some(sandbox) = self.sandbox.clone() else {
            return session.channel_failure(channel);
        };
        let found = self.sim.sandboxes.lock().ok().and_then(|m| {
            m.get(&sandbox).filter(|s| s.state == "started").map(|s| {
                (
                    s.fs(&self.sim),
                    s.user.clone(),
                    s.env.clone(),
                    s.procs.clone(),
                )
            })
        });
        let Some((fs, user, mut env, procs)) = found else {
            return session.channel_failure(channel);
        };
        env.insert("HOME".into(), format!("/home/{user}"));
        env.insert("USER".into(), user.clone());
        env.extend(self.env.remove(&channel).unwrap_or_default());
        let tty = self.pty.get(&channel).cloned().map(|(term, cols, rows)| {
            env.insert("TERM".into(), term);
            PtySize { rows, cols }
        });
        let shell = if tty.is_some() {
            "exec /bin/sh -i"
        } else {
            "exec /bin/sh"
        };
        let spec = ProcessSpec {
            command: command.unwrap_or_else(|| shell.into()),
            cwd: PathBuf::from(format!("/home/{user}")),
            env,
            timeout: None,
            jail: Some(crate::sandbox::jail::Jail::Sim(fs)),
            tty,
            direct: Default::default(),
            cgroup_procs: Vec::new(),
            agent: None,
        };
        let (in_tx, in_rx) = mpsc::channel(32);
        self.input.insert(channel, in_tx);
        session.channel_success(channel)?;
        let handle = session.handle();
        let cancel = procs.child_token();
        tokio::spawn(async move {
            let (tx, mut rx) = mpsc::channel(64);
            let run =
                tokio::spawn(async move { process::run(&spec, Some(in_rx), tx, cancel).await });
            while let Some(out) = rx.recv().await {
                let sent = match out {
                    ExecOutput::Stdout(b) => handle.data(channel, b).await.is_ok(),
                    ExecOutput::Stderr(b) => handle.extended_data(channel, 1, b).await.is_ok(),
                };
                if !sent {
                    break;
                }
            }
            let code = match run.await {
                Ok(Ok(exit)) => exit.code,
                Ok(Err(err)) => {
                    tracing::warn!(error = %err, "could not start a command");
                    255
                }
                Err(_) => 255,
            };
            let _ = handle.exit_status_request(channel, code as u32).await;
            let _ = handle.eof(channel).await;
            let _ = handle.close(channel).await;
        });
        Ok(())
    }
}

impl russh::server::Handler for Conn {
    type Error = russh::Error;

    async fn auth_none(&mut self, user: &str) -> Result<Auth, Self::Error> {
        match super::control::check_token(&self.sim, user) {
            Some(sandbox) => {
                self.sandbox = Some(sandbox);
                Ok(Auth::Accept)
            }
            None => Ok(Auth::reject()),
        }
    }

    async fn channel_open_session(
        &mut self,
        _channel: Channel<Msg>,
        reply: russh::server::ChannelOpenHandle,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        reply.accept().await;
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    async fn pty_request(
        &mut self,
        channel: ChannelId,
        term: &str,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _modes: &[(russh::Pty, u32)],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (c, r) = size(cols, rows);
        let term = if term.is_empty() { "xterm" } else { term };
        self.pty.insert(channel, (term.to_string(), c, r));
        session.channel_success(channel)
    }

    async fn window_change_request(
        &mut self,
        channel: ChannelId,
        cols: u32,
        rows: u32,
        _pw: u32,
        _ph: u32,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        let (c, r) = size(cols, rows);
        if let Some(tx) = self.input.get(&channel) {
            let _ = tx.send(Input::Resize(PtySize { rows: r, cols: c })).await;
        }
        Ok(())
    }

    async fn env_request(
        &mut self,
        channel: ChannelId,
        name: &str,
        value: &str,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.env
            .entry(channel)
            .or_default()
            .insert(name.to_string(), value.to_string());
        session.channel_success(channel)
    }

    async fn exec_request(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        let command = String::from_utf8_lossy(data).into_owned();
        self.spawn(channel, Some(command), session)
    }

    async fn shell_request(
        &mut self,
        channel: ChannelId,
        session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.spawn(channel, None, session)
    }

    async fn data(
        &mut self,
        channel: ChannelId,
        data: &[u8],
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        if let Some(tx) = self.input.get(&channel) {
            let _ = tx.send(Input::Data(data.to_vec())).await;
        }
        Ok(())
    }

    async fn channel_eof(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        // Dropping the sender closes the command's stdin; a terminal gets ^D instead.
        if self.pty.contains_key(&channel) {
            if let Some(tx) = self.input.get(&channel) {
                let _ = tx.send(Input::Data(vec![4])).await;
            }
        } else {
            self.input.remove(&channel);
        }
        Ok(())
    }

    async fn channel_close(
        &mut self,
        channel: ChannelId,
        _session: &mut Session,
    ) -> Result<(), Self::Error> {
        self.input.remove(&channel);
        self.env.remove(&channel);
        self.pty.remove(&channel);
        Ok(())
    }
}
