//! The flow hash that picks a Maglev slot. The XDP program and `meshlb
//! explain` call this very function, so userspace answers exactly what the
//! kernel does. Fixed-size, loop-free arithmetic keeps the verifier happy;
//! the byte order of the words is explicit so every architecture and every
//! node computes the same value.

use crate::FlowKey;

const C1: u32 = 0xcc9e_2d51;
const C2: u32 = 0x1b87_3593;
const SEED: u32 = 0x6d65_7368; // "mesh"

#[inline(always)]
fn mix(h: u32, k: u32) -> u32 {
    let k = k.wrapping_mul(C1).rotate_left(15).wrapping_mul(C2);
    (h ^ k)
        .rotate_left(13)
        .wrapping_mul(5)
        .wrapping_add(0xe654_6b64)
}

#[inline(always)]
fn word(b: &[u8; 16], i: usize) -> u32 {
    u32::from_le_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]])
}

/// MurmurHash3's finalizer: every input bit affects every output bit
/// (also the SNAT walk's mixer, `SnatAddr::walk`).
#[inline(always)]
pub(crate) fn finish(mut h: u32) -> u32 {
    h ^= h >> 16;
    h = h.wrapping_mul(0x85eb_ca6b);
    h ^= h >> 13;
    h = h.wrapping_mul(0xc2b2_ae35);
    h ^ (h >> 16)
}

/// Hash of a client flow (client -> frontend): murmur3-style mixing of
/// addresses, ports and protocol.
#[inline(always)]
pub fn flow_hash(k: &FlowKey) -> u32 {
    let mut h = SEED;
    h = mix(h, word(&k.src, 0));
    h = mix(h, word(&k.src, 4));
    h = mix(h, word(&k.src, 8));
    h = mix(h, word(&k.src, 12));
    h = mix(h, word(&k.dst, 0));
    h = mix(h, word(&k.dst, 4));
    h = mix(h, word(&k.dst, 8));
    h = mix(h, word(&k.dst, 12));
    h = mix(
        h,
        u32::from(u16::from_be(k.sport)) << 16 | u32::from(u16::from_be(k.dport)),
    );
    h = mix(h, u32::from(k.proto) << 8 | u32::from(k.family));
    finish(h ^ 0x28)
}

/// The Maglev slot of a flow on a ring of `ring_size` slots (0 for an
/// empty ring).
#[inline(always)]
pub fn flow_slot(k: &FlowKey, ring_size: u32) -> u32 {
    flow_hash(k).checked_rem(ring_size).unwrap_or(0)
}

/// The Maglev slot of a node-local socket (the socket-level balancer):
/// its socket cookie and the frontend port it asked for, hashed like a
/// flow. One socket keeps its slot (a connected socket's every datagram,
/// an unconnected one's to the same frontend); consecutive cookies spread.
#[inline(always)]
pub fn socket_slot(cookie: u64, port: u16, ring_size: u32) -> u32 {
    let mut h = SEED;
    h = mix(h, cookie as u32);
    h = mix(h, (cookie >> 32) as u32);
    h = mix(h, u32::from(port));
    finish(h ^ 0x0c).checked_rem(ring_size).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{FAMILY_V4, PROTO_TCP};

    fn key(sport: u16) -> FlowKey {
        let mut k = FlowKey {
            sport: sport.to_be(),
            dport: 80u16.to_be(),
            proto: PROTO_TCP,
            family: FAMILY_V4,
            ..Default::default()
        };
        k.src[..4].copy_from_slice(&[10, 0, 0, 2]);
        k.dst[..4].copy_from_slice(&[10, 96, 0, 10]);
        k
    }

    #[test]
    fn hash_is_pinned() {
        // A change of this value changes which backend every existing
        // deployment picks: it must be deliberate (and versioned).
        assert_eq!(flow_hash(&key(40000)), 0x9514_1091);
    }

    #[test]
    fn source_ports_spread_over_slots() {
        let mut buckets = [0u32; 4];
        for p in 0..4000u16 {
            buckets[(flow_slot(&key(30000 + p), crate::RING_SIZES[0]) % 4) as usize] += 1;
        }
        for b in buckets {
            assert!((800..1200).contains(&b), "uneven spread: {buckets:?}");
        }
    }

    #[test]
    fn consecutive_socket_cookies_spread_over_slots() {
        let mut buckets = [0u32; 4];
        for c in 0..4000u64 {
            buckets[(socket_slot(4096 + c, 80u16.to_be(), crate::RING_SIZES[0]) % 4) as usize] += 1;
        }
        for b in buckets {
            assert!((800..1200).contains(&b), "uneven spread: {buckets:?}");
        }
        assert_eq!(
            socket_slot(7, 80, 1021),
            socket_slot(7, 80, 1021),
            "one socket, one slot"
        );
    }
}
