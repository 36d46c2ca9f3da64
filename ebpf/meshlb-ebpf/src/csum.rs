//! Incremental internet-checksum updates (RFC 1624: HC' = ~(~HC + ~m + m')).
//! XDP has no l3/l4 `csum_replace` helpers. All words are read big-endian,
//! so the arithmetic is the same on every architecture.

/// A running one's-complement sum of a checksum update.
pub struct CsumDelta(u32);

impl CsumDelta {
    /// Starts from the checksum currently in the packet.
    #[inline(always)]
    pub fn new(check: [u8; 2]) -> Self {
        CsumDelta(u32::from(!(u16::from_be_bytes(check))) & 0xffff)
    }

    /// Records that the 16-bit word `old` became `new`.
    #[inline(always)]
    pub fn word(&mut self, old: u16, new: u16) {
        self.0 += u32::from(!old) & 0xffff;
        self.0 += u32::from(new);
        self.0 = (self.0 & 0xffff) + (self.0 >> 16);
    }

    /// Records that the 4-byte IPv4 address `old` became `new`.
    #[inline(always)]
    pub fn bytes4(&mut self, old: &[u8; 16], new: &[u8; 16]) {
        self.word(
            u16::from_be_bytes([old[0], old[1]]),
            u16::from_be_bytes([new[0], new[1]]),
        );
        self.word(
            u16::from_be_bytes([old[2], old[3]]),
            u16::from_be_bytes([new[2], new[3]]),
        );
    }

    /// Records that the 16-byte IPv6 address `old` became `new`.
    #[inline(always)]
    pub fn bytes16(&mut self, old: &[u8; 16], new: &[u8; 16]) {
        let mut i = 0;
        while i < 16 {
            self.word(
                u16::from_be_bytes([old[i], old[i + 1]]),
                u16::from_be_bytes([new[i], new[i + 1]]),
            );
            i += 2;
        }
    }

    /// The new checksum to store.
    #[inline(always)]
    pub fn finish(self) -> [u8; 2] {
        let s = (self.0 & 0xffff) + (self.0 >> 16);
        (!(s as u16)).to_be_bytes()
    }
}
