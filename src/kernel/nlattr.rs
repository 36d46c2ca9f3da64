//! The one netlink message and attribute codec (pure: bytes in, bytes
//! out), shared by the IPVS (generic netlink) and nf_tables (nfnetlink)
//! clients: attributes 4-byte aligned in host byte order, nested ones
//! flagged, and every message of a reply with the sequence it answers.
//! Layouts follow `linux/netlink.h`.

pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLM_F_REQUEST: u16 = 0x1;
/// A part of a multipart reply (the tests build such replies).
#[cfg(test)]
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
pub const NLM_F_DUMP: u16 = 0x300;
pub const NLA_F_NESTED: u16 = 0x8000;
/// Bits of `nla_type` that are flags, not the type.
pub const NLA_TYPE_MASK: u16 = !(0x8000 | 0x4000);

/// A malformed message or attribute from the kernel.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum WireError {
    #[error("netlink message truncated at byte {0}")]
    Truncated(usize),
    #[error("netlink attribute {kind}: expected {want} bytes, got {got}")]
    AttrSize { kind: u16, want: usize, got: usize },
    #[error("netlink message lacks attribute {0}")]
    Missing(&'static str),
    #[error("address family {0} is neither AF_INET nor AF_INET6")]
    Family(u16),
}

/// `struct nlmsghdr`.
pub const NLMSG_HDR: usize = 16;
/// The family header after it (`genlmsghdr`; `nfgenmsg` is as long).
pub const GENL_HDR: usize = 4;

fn align4(n: usize) -> usize {
    (n + 3) & !3
}

/// Appends attribute `kind` with `value`, padded to 4 bytes.
pub fn put_attr(buf: &mut Vec<u8>, kind: u16, value: &[u8]) {
    buf.extend(((4 + value.len()) as u16).to_ne_bytes());
    buf.extend(kind.to_ne_bytes());
    buf.extend(value);
    buf.resize(align4(buf.len()), 0);
}

/// Appends a nested attribute whose payload `f` writes.
pub fn put_nested(buf: &mut Vec<u8>, kind: u16, f: impl FnOnce(&mut Vec<u8>)) {
    let start = buf.len();
    buf.extend([0, 0]);
    buf.extend((kind | NLA_F_NESTED).to_ne_bytes());
    f(buf);
    let len = (buf.len() - start) as u16;
    buf[start..start + 2].copy_from_slice(&len.to_ne_bytes());
}

/// The attributes in `buf` as (type without flags, payload).
pub fn attrs(buf: &[u8]) -> Result<Vec<(u16, &[u8])>, WireError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + 4 <= buf.len() {
        let len = u16::from_ne_bytes([buf[off], buf[off + 1]]) as usize;
        let kind = u16::from_ne_bytes([buf[off + 2], buf[off + 3]]) & NLA_TYPE_MASK;
        if len < 4 || off + len > buf.len() {
            return Err(WireError::Truncated(off));
        }
        out.push((kind, &buf[off + 4..off + len]));
        off += align4(len);
    }
    Ok(out)
}

pub(crate) fn find<'a>(a: &[(u16, &'a [u8])], kind: u16) -> Option<&'a [u8]> {
    a.iter().find(|(k, _)| *k == kind).map(|(_, v)| *v)
}

pub(crate) fn fixed<const N: usize>(kind: u16, v: &[u8]) -> Result<[u8; N], WireError> {
    v.get(..N)
        .and_then(|s| s.try_into().ok())
        .ok_or(WireError::AttrSize {
            kind,
            want: N,
            got: v.len(),
        })
}

pub(crate) fn u16_ne(a: &[(u16, &[u8])], kind: u16) -> Result<Option<u16>, WireError> {
    find(a, kind)
        .map(|v| fixed::<2>(kind, v).map(u16::from_ne_bytes))
        .transpose()
}

pub(crate) fn u32_ne(a: &[(u16, &[u8])], kind: u16) -> Result<Option<u32>, WireError> {
    find(a, kind)
        .map(|v| fixed::<4>(kind, v).map(u32::from_ne_bytes))
        .transpose()
}

/// One parsed netlink message of a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum Reply {
    /// End of a dump.
    Done,
    /// An acknowledgement (error 0).
    Ack,
    /// A failed request: the (positive) errno.
    Error(i32),
    /// A data message: generic netlink command and its attributes.
    Data { cmd: u8, attrs: Vec<u8> },
}

/// Every message in a receive buffer, with the sequence number each
/// answers.
pub fn replies(buf: &[u8]) -> Result<Vec<(u32, Reply)>, WireError> {
    let mut out = Vec::new();
    let mut off = 0;
    while off + NLMSG_HDR <= buf.len() {
        let h = &buf[off..];
        let len = u32::from_ne_bytes([h[0], h[1], h[2], h[3]]) as usize;
        let kind = u16::from_ne_bytes([h[4], h[5]]);
        let seq = u32::from_ne_bytes([h[8], h[9], h[10], h[11]]);
        if len < NLMSG_HDR || off + len > buf.len() {
            return Err(WireError::Truncated(off));
        }
        let body = &buf[off + NLMSG_HDR..off + len];
        let r = match kind {
            NLMSG_DONE => Reply::Done,
            NLMSG_ERROR => {
                let e = fixed::<4>(NLMSG_ERROR, body)?;
                match i32::from_ne_bytes(e) {
                    0 => Reply::Ack,
                    n => Reply::Error(-n),
                }
            }
            _ => {
                if body.len() < GENL_HDR {
                    return Err(WireError::Truncated(off + NLMSG_HDR));
                }
                Reply::Data {
                    cmd: body[0],
                    attrs: body[GENL_HDR..].to_vec(),
                }
            }
        };
        out.push((seq, r));
        off += align4(len);
    }
    Ok(out)
}
