//! Flag merging for `meshlb run` and the client commands: command-line
//! flags over the config file over defaults, checked before anything is
//! touched. Usage errors name the flag.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::cli::{DataplaneArg, EtcdArgs, RunArgs, XdpModeArg};
use crate::daemon::{listed, load_config, DaemonError, Settings};
use crate::model::config::{Config, DataplaneChoice, EtcdConfig, XdpMode};
use crate::source::config::{self, DEFAULT_BPFFS};
use crate::source::etcd::EtcdOptions;

/// Validates flags and config into settings, before anything is touched.
pub fn settle(args: &RunArgs) -> Result<(Settings, Config), DaemonError> {
    if args.config.is_none() && args.etcd.etcd.is_none() && args.docker.is_some() {
        return Err(DaemonError::Usage(
            "--docker: needs --etcd (or [etcd] in the config): containers are registered as tasks in etcd".into(),
        ));
    }
    let cfg = load_config(args.config.as_ref(), args.etcd.etcd.is_some())?;
    let etcd = etcd_options(&args.etcd, cfg.etcd.as_ref());
    if let Some(o) = &etcd {
        o.validate()
            .map_err(|e| DaemonError::Usage(e.to_string()))?;
    }
    let docker = match &args.docker {
        Some(s) if s.trim().is_empty() => {
            return Err(DaemonError::Usage("--docker: empty socket path".into()))
        }
        Some(s) => Some(PathBuf::from(s)),
        None => cfg.docker.as_ref().map(|d| d.socket.clone()),
    };
    if docker.is_some() && etcd.is_none() {
        return Err(DaemonError::Usage(
            "--docker: needs --etcd (or [etcd] in the config): containers are registered as tasks in etcd".into(),
        ));
    }
    let dataplane = match args.dataplane {
        Some(DataplaneArg::Auto) => DataplaneChoice::Auto,
        Some(DataplaneArg::Xdp) => DataplaneChoice::Xdp,
        Some(DataplaneArg::Ipvs) => DataplaneChoice::Ipvs,
        None => cfg.dataplane,
    };
    let xdp_mode = match args.xdp_mode {
        Some(XdpModeArg::Auto) => XdpMode::Auto,
        Some(XdpModeArg::Native) => XdpMode::Native,
        Some(XdpModeArg::Generic) => XdpMode::Generic,
        None => cfg.xdp_mode,
    };
    let ifaces_from_cli = !args.ifaces.is_empty() || !args.task_ifaces.is_empty();
    let (ifaces, task_ifaces) = if ifaces_from_cli {
        listed(&args.ifaces, &args.task_ifaces)
    } else {
        listed(&cfg.interfaces, &cfg.task_interfaces)
    };
    let announce_ifaces = if args.announce_ifaces.is_empty() {
        cfg.announce_interfaces.clone()
    } else {
        args.announce_ifaces.clone()
    };
    for i in &announce_ifaces {
        if !config::valid_ifname(i) {
            return Err(DaemonError::Usage(format!(
                "--announce-iface {i:?}: not a valid interface name"
            )));
        }
    }
    for i in &ifaces {
        if !config::valid_ifname(i) {
            return Err(DaemonError::Usage(format!(
                "iface {i:?}: not a valid interface name"
            )));
        }
    }
    let metrics = match args.metrics.as_deref() {
        Some("none" | "off") => None,
        Some(a) => Some(
            a.parse::<SocketAddr>()
                .map_err(|_| DaemonError::Usage(format!("--metrics: invalid address {a:?}")))?,
        ),
        None => Some(cfg.metrics.listen),
    };
    let bpffs = args
        .bpffs
        .clone()
        .or_else(|| (cfg.bpffs != std::path::Path::new(DEFAULT_BPFFS)).then(|| cfg.bpffs.clone()))
        .unwrap_or_else(|| PathBuf::from(DEFAULT_BPFFS));
    let node = args
        .node
        .clone()
        .or_else(|| cfg.node.clone())
        .unwrap_or_else(hostname);
    let advertise_addr = match &args.advertise_addr {
        Some(a) => Some(
            config::advertise_addr(a)
                .map_err(|m| DaemonError::Usage(format!("--advertise-addr: {m}")))?,
        ),
        None => cfg.advertise_addr,
    };
    let drain_timeout = match args.drain_timeout {
        Some(t) if t < 0 => {
            return Err(DaemonError::Usage(format!(
                "--drain-timeout: must be 0 or more seconds, got {t}"
            )))
        }
        Some(t) => Some(Duration::from_secs(t as u64)),
        None => None,
    };
    let dns = if args.dns.is_empty() {
        cfg.dns.listen.clone()
    } else {
        args.dns
            .iter()
            .map(|a| {
                a.parse().map_err(|_| {
                    DaemonError::Usage(format!(
                        "--dns: invalid socket address {a:?}, expected IP:PORT"
                    ))
                })
            })
            .collect::<Result<Vec<_>, _>>()?
    };
    Ok((
        Settings {
            config_path: args.config.clone(),
            node,
            advertise_addr,
            ifaces,
            task_ifaces,
            announce_ifaces,
            ifaces_from_cli,
            xdp_mode,
            bpffs,
            metrics,
            etcd,
            docker,
            drain_timeout,
            dataplane,
            socket_lb: args.socket_lb.unwrap_or(cfg.socket_lb),
            dns,
            dns_zone: cfg.dns.zone.clone(),
        },
        cfg,
    ))
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map_or_else(|_| "localhost".into(), |s| s.trim().to_owned())
}

/// From command-line flags; `None` when `--etcd` is absent.
/// `base` (the config file's `[etcd]`) fills what the flags leave out.
pub fn etcd_options(args: &EtcdArgs, base: Option<&EtcdConfig>) -> Option<EtcdOptions> {
    let mut o = match (base, &args.etcd) {
        (_, Some(list)) => EtcdOptions {
            endpoints: EtcdOptions::endpoints_from(list),
            ..base.map_or_else(EtcdOptions::defaults, EtcdOptions::from_config)
        },
        (Some(b), None) => EtcdOptions::from_config(b),
        (None, None) => return None,
    };
    if let Some(p) = &args.prefix {
        o.prefix = p.trim_end_matches('/').to_owned();
    }
    o.ca = args.etcd_ca.clone().or(o.ca);
    o.cert = args.etcd_cert.clone().or(o.cert);
    o.key = args.etcd_key.clone().or(o.key);
    o.username = args.etcd_user.clone().or(o.username);
    o.password_file = args.etcd_password_file.clone().or(o.password_file);
    o.insecure |= args.etcd_insecure;
    Some(o)
}

/// Client commands: the flags, with the default endpoint when absent.
pub fn etcd_client_options(args: &EtcdArgs) -> EtcdOptions {
    etcd_options(args, None).unwrap_or_else(|| {
        let mut o = EtcdOptions::defaults();
        if let Some(p) = &args.prefix {
            o.prefix = p.trim_end_matches('/').to_owned();
        }
        o.ca = args.etcd_ca.clone();
        o.cert = args.etcd_cert.clone();
        o.key = args.etcd_key.clone();
        o.username = args.etcd_user.clone();
        o.password_file = args.etcd_password_file.clone();
        o.insecure = args.etcd_insecure;
        o
    })
}
