//! `meshlb cleanup` in IPVS mode: only what the state files name.

use std::collections::BTreeSet;
use std::path::PathBuf;

use super::table::{endpoint, to_delete};
use super::view::parse_owned;
use super::DataplaneError;
use crate::kernel::ipvs::{Ipvs, ServiceId};
use crate::kernel::nft::Masquerade;

/// What `meshlb cleanup` removed of IPVS mode.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Cleaned {
    /// IPVS services deleted (those the state files name that still
    /// existed; nobody else's).
    pub services: usize,
    /// meshlb's nf_tables table (the SNAT of remote backends).
    pub snat_table: bool,
    /// The VIP device.
    pub vip_device: bool,
}

/// `meshlb cleanup` for IPVS mode: deletes the IPVS services this node's
/// daemons created (as their state files in `state_dir` record), then the
/// state files, meshlb's nf_tables table and the VIP device. `None` when
/// no daemon ran in IPVS mode here (no state file): IPVS and nf_tables are
/// then not touched at all. Forwarding of those services stops.
pub async fn cleanup(
    state_dir: &std::path::Path,
    vip_device: &str,
) -> Result<Option<Cleaned>, DataplaneError> {
    let files: Vec<PathBuf> = match std::fs::read_dir(state_dir) {
        Ok(d) => d
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "ipvs"))
            .collect(),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(DataplaneError::context(state_dir.display().to_string())(e)),
    };
    if files.is_empty() {
        return Ok(None);
    }
    let mut ipvs = Ipvs::open()
        .await
        .map_err(DataplaneError::context("ipvs"))?;
    let live: BTreeSet<ServiceId> = ipvs
        .services()
        .await
        .map_err(DataplaneError::context("ipvs services"))?
        .into_iter()
        .map(|s| s.id)
        .collect();
    let mut cleaned = Cleaned::default();
    for f in files {
        let text = std::fs::read_to_string(&f)
            .map_err(DataplaneError::context(f.display().to_string()))?;
        for id in to_delete(&parse_owned(&text), &live) {
            ipvs.del_service(&id)
                .await
                .map_err(DataplaneError::context(format!(
                    "ipvs delete service {}",
                    endpoint(&id)
                )))?;
            cleaned.services += 1;
        }
        std::fs::remove_file(&f).map_err(DataplaneError::context(f.display().to_string()))?;
        let view = f.with_extension("view");
        for leftover in [
            crate::kernel::pinlock::tmp_path(&f),
            crate::kernel::pinlock::tmp_path(&view),
            view,
        ] {
            let _ = std::fs::remove_file(leftover);
        }
    }
    cleaned.snat_table = Masquerade::new()
        .remove()
        .await
        .map_err(DataplaneError::context("nf_tables"))?;
    cleaned.vip_device = crate::kernel::netlink::remove_link(vip_device)
        .await
        .map_err(DataplaneError::context(vip_device))?;
    Ok(Some(cleaned))
}
