//! The etcd control plane: connection options (endpoints, prefix, TLS,
//! username/password) and the one `connect` every etcd user goes through,
//! so timeouts and error wording are the same for the daemon and the CLI.
//!
//! * [`layout`] — keys and records under the prefix, validation, and the
//!   cluster state they add up to.
//! * [`watch`] — the daemon's list+watch loop and the node lease.

pub mod layout;
pub mod watch;

use std::path::{Path, PathBuf};
use std::time::Duration;

use etcd_client::{Certificate, Client, ConnectOptions, GetOptions, Identity, TlsOptions};

use crate::model::config::EtcdConfig;

/// Timeout of one etcd request (and of connecting).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// The default endpoint of the CLI.
pub const DEFAULT_ENDPOINT: &str = "http://127.0.0.1:2379";

/// How to reach etcd: the config file's `[etcd]` section, which flags can
/// also fill or override.
pub use crate::model::config::EtcdConfig as EtcdOptions;

/// Errors reaching etcd.
#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd: {what} {path}: {source}")]
    File {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("etcd: {0}")]
    Usage(String),
    #[error("etcd {endpoints}: {message}")]
    Connect { endpoints: String, message: String },
    #[error("etcd {endpoints}: timed out after {secs} s")]
    Timeout { endpoints: String, secs: u64 },
    #[error("etcd: {what}: {message}")]
    Request { what: String, message: String },
}

impl EtcdOptions {
    /// From the `[etcd]` section of the config file.
    pub fn from_config(c: &EtcdConfig) -> EtcdOptions {
        EtcdOptions {
            prefix: c.prefix.trim_end_matches('/').to_owned(),
            ..c.clone()
        }
    }

    /// The defaults of the client commands: the local endpoint, the
    /// default prefix.
    pub fn defaults() -> EtcdOptions {
        EtcdOptions {
            endpoints: vec![DEFAULT_ENDPOINT.to_owned()],
            prefix: crate::source::config::DEFAULT_ETCD_PREFIX.to_owned(),
            ca: None,
            cert: None,
            key: None,
            username: None,
            password_file: None,
            insecure: false,
        }
    }

    /// From a comma-separated endpoint list.
    pub fn endpoints_from(list: &str) -> Vec<String> {
        list.split(',')
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned)
            .collect()
    }

    /// Checks what can be checked without a network: endpoints look like
    /// URLs, TLS files come as a cert+key pair, https when TLS is asked for.
    pub fn validate(&self) -> Result<(), EtcdError> {
        if self.endpoints.is_empty() {
            return Err(EtcdError::Usage("--etcd: no endpoint given".into()));
        }
        for e in &self.endpoints {
            if !(e.starts_with("http://") || e.starts_with("https://")) {
                return Err(EtcdError::Usage(format!(
                    "--etcd: endpoint {e:?} must start with http:// or https://"
                )));
            }
        }
        if self.cert.is_some() != self.key.is_some() {
            return Err(EtcdError::Usage(
                "--etcd-cert and --etcd-key: give both or neither".into(),
            ));
        }
        let tls = self.ca.is_some() || self.cert.is_some();
        if tls && self.endpoints.iter().any(|e| e.starts_with("http://")) {
            return Err(EtcdError::Usage(
                "--etcd: TLS options need https:// endpoints".into(),
            ));
        }
        let plain = self.endpoints.iter().find(|e| e.starts_with("http://"));
        if let (Some(user), Some(url), false) = (&self.username, plain, self.insecure) {
            return Err(EtcdError::Usage(format!(
                "--etcd-user / etcd.username {user:?}: the password would cross {url} in clear; use https:// endpoints, or allow it with --etcd-insecure (insecure = true under [etcd])"
            )));
        }
        if !self.prefix.starts_with('/') {
            return Err(EtcdError::Usage(format!(
                "--prefix: {:?} must start with /",
                self.prefix
            )));
        }
        Ok(())
    }

    fn endpoints_str(&self) -> String {
        self.endpoints.join(",")
    }
}

fn read(what: &'static str, path: &Path) -> Result<Vec<u8>, EtcdError> {
    std::fs::read(path).map_err(|source| EtcdError::File {
        what,
        path: path.to_owned(),
        source,
    })
}

/// The full `source()` chain of an error on one line: tonic's top-level
/// "transport error" alone says nothing.
pub fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        let m = c.to_string();
        if !s.contains(&m) {
            s.push_str(": ");
            s.push_str(&m);
        }
        cur = c.source();
    }
    s.replace('\n', " ")
}

/// Explains the usual TLS failures in words an operator acts on.
fn explain(message: String, opts: &EtcdOptions) -> String {
    let lower = message.to_lowercase();
    if lower.contains("unknownissuer")
        || lower.contains("unknown issuer")
        || lower.contains("certificate") && lower.contains("invalid peer")
    {
        let ca = opts
            .ca
            .as_deref()
            .map_or("the system roots".into(), |p| p.display().to_string());
        return format!(
            "TLS: the server's certificate is not signed by the CA in {ca} (wrong --etcd-ca?): {message}"
        );
    }
    if lower.contains("certificate required") || lower.contains("bad certificate") {
        return format!("TLS: the server refused our client certificate (check --etcd-cert/--etcd-key): {message}");
    }
    message
}

/// Connects and proves the connection with one read, so a wrong CA, a
/// refused certificate or an unreachable cluster is reported here, once,
/// in one line.
pub async fn connect(opts: &EtcdOptions) -> Result<Client, EtcdError> {
    opts.validate()?;
    let mut co = ConnectOptions::new()
        .with_connect_timeout(REQUEST_TIMEOUT)
        .with_timeout(REQUEST_TIMEOUT)
        // etcd answers pings more often than every 5 s (its default
        // --grpc-keepalive-min-time) with GOAWAY, which breaks the watch.
        .with_keep_alive(Duration::from_secs(10), Duration::from_secs(5))
        .with_keep_alive_while_idle(true)
        .with_require_leader(true);
    if opts.ca.is_some() || opts.cert.is_some() {
        let mut tls = TlsOptions::new();
        if let Some(ca) = &opts.ca {
            tls = tls.ca_certificate(Certificate::from_pem(read("CA file", ca)?));
        }
        if let (Some(c), Some(k)) = (&opts.cert, &opts.key) {
            tls = tls.identity(Identity::from_pem(
                read("client certificate", c)?,
                read("client key", k)?,
            ));
        }
        co = co.with_tls(tls);
    }
    if let Some(user) = &opts.username {
        let password = match &opts.password_file {
            Some(p) => String::from_utf8_lossy(&read("password file", p)?)
                .trim_end_matches(['\n', '\r'])
                .to_owned(),
            None => String::new(),
        };
        co = co.with_user(user.clone(), password);
    }
    let endpoints = opts.endpoints_str();
    let timeout = || EtcdError::Timeout {
        endpoints: endpoints.clone(),
        secs: REQUEST_TIMEOUT.as_secs(),
    };
    let conn_err = |e: etcd_client::Error| EtcdError::Connect {
        endpoints: endpoints.clone(),
        message: explain(error_chain(&e), opts),
    };
    let mut client =
        tokio::time::timeout(REQUEST_TIMEOUT, Client::connect(&opts.endpoints, Some(co)))
            .await
            .map_err(|_| timeout())?
            .map_err(conn_err)?;
    tokio::time::timeout(
        REQUEST_TIMEOUT,
        client.get(
            format!("{}/", opts.prefix),
            Some(GetOptions::new().with_prefix().with_count_only()),
        ),
    )
    .await
    .map_err(|_| timeout())?
    .map_err(conn_err)?;
    Ok(client)
}
