//! The one reader of the pinned service and backend tables: the present
//! slots, decoded once (name, protocol, port, address, state), for the
//! sync's read-back (`observe_maps`) and for `status` (and so `/metrics`).
//! The arrays are read whole, a few syscalls each, not slot by slot.

use std::net::IpAddr;

use meshlb_common::{
    Backend, ServiceInfo, ServiceName, BE_F_DOWN, BE_F_DRAINING, BE_F_PRESENT, MAX_BACKENDS,
    MAX_SERVICES, SVC_F_PRESENT,
};

use crate::kernel::pinned::{addr_from, Maps, PinnedError};
use crate::model::{BackendState, Proto, ServiceKey};

/// A present service slot.
#[derive(Clone, Debug)]
pub struct ServiceSlot {
    pub id: u32,
    pub info: ServiceInfo,
    pub name: ServiceName,
    /// The session affinity timeout (0: none).
    pub affinity_secs: u32,
}

impl ServiceSlot {
    /// The protocol of the published port (`None`: not one meshlb writes).
    pub fn proto(&self) -> Option<Proto> {
        Proto::from_number(self.name.proto)
    }

    /// The service's name as written (invalid UTF-8 replaced).
    pub fn name_lossy(&self) -> String {
        String::from_utf8_lossy(self.name.bytes()).into_owned()
    }

    /// The reconciler's key of the slot (`None`: a name that is not UTF-8
    /// or an unknown protocol, which meshlb never writes).
    pub fn key(&self) -> Option<ServiceKey> {
        let name = std::str::from_utf8(self.name.bytes()).ok()?;
        Some(ServiceKey {
            name: name.to_owned(),
            proto: self.proto()?,
            port: self.name.port,
        })
    }
}

/// The present service slots, in id order.
pub fn services(maps: &Maps) -> Result<Vec<ServiceSlot>, PinnedError> {
    let infos = maps.all_services()?;
    let names = maps.all_service_names()?;
    let affinity = maps.all_service_affinity()?;
    Ok((0u32..)
        .zip(&infos)
        .take(MAX_SERVICES as usize)
        .filter(|(_, info)| info.flags & SVC_F_PRESENT != 0)
        .filter_map(|(id, info)| {
            Some(ServiceSlot {
                id,
                info: *info,
                name: *names.get(id as usize)?,
                affinity_secs: affinity.get(id as usize).copied().unwrap_or(0),
            })
        })
        .collect())
}

/// A present backend slot.
#[derive(Clone, Debug)]
pub struct BackendSlot {
    pub id: u32,
    pub backend: Backend,
    /// `None`: an address family meshlb never writes.
    pub addr: Option<IpAddr>,
    pub state: BackendState,
}

/// The present backend slots, in id order.
pub fn backends(maps: &Maps) -> Result<Vec<BackendSlot>, PinnedError> {
    Ok((0u32..)
        .zip(maps.all_backends()?)
        .take(MAX_BACKENDS as usize)
        .filter(|(_, b)| b.flags & BE_F_PRESENT != 0)
        .map(|(id, b)| BackendSlot {
            id,
            addr: addr_from(&b.addr, b.family),
            state: state_of(b.flags),
            backend: b,
        })
        .collect())
}

/// A backend's state from its flags.
pub fn state_of(flags: u8) -> BackendState {
    if flags & BE_F_DOWN != 0 {
        BackendState::Down
    } else if flags & BE_F_DRAINING != 0 {
        BackendState::Draining
    } else {
        BackendState::Up
    }
}
