//! The IPv4 header checksum the benchmarks' crafted frames carry (shared
//! by `microbench.rs` and `pktgen.rs`).

/// Writes the checksum of the 20-byte IPv4 header `ip` (its checksum
/// field zero) into that field.
pub fn set_header_checksum(ip: &mut [u8]) {
    let mut s: u32 = ip
        .chunks(2)
        .map(|c| u32::from(u16::from_be_bytes([c[0], c[1]])))
        .sum();
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    ip[10..12].copy_from_slice(&(!(s as u16)).to_be_bytes());
}
