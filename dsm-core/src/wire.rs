//! Length-prefixed frames with a versioned header, shared by the launcher's
//! control channel and the TCP transport.
//!
//! Header (8 bytes): magic `b"DS"`, protocol version, frame kind, payload
//! length (u32, little endian). The decoder rejects anything that does not
//! start with the magic and version, and any length above the caller's bound,
//! before allocating, so garbage on a port costs at most one header read.

use std::io::{self, IoSlice, Read, Write};

/// First two bytes of every frame.
pub const MAGIC: [u8; 2] = *b"DS";
/// Protocol version this build writes and accepts (header byte 2).
pub const VERSION: u8 = 1;
/// Length of a frame header, bytes.
pub const HEADER_LEN: usize = 8;

/// Why a frame could not be read.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("connection closed")]
    /// The stream ended cleanly before a frame began.
    Closed,
    #[error("connection closed in the middle of a frame")]
    /// The stream ended inside a frame.
    Truncated,
    #[error("not a dsm frame (bad magic {0:02x?})")]
    /// The header does not start with [`MAGIC`] (the bytes found).
    BadMagic([u8; 2]),
    #[error("unsupported dsm protocol version {0} (this build speaks {VERSION})")]
    /// The header carries another protocol version (the one found).
    BadVersion(u8),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    /// The payload length exceeds the caller's bound.
    TooLong {
        /// Announced payload length, bytes.
        len: u32,
        /// The bound, bytes.
        max: u32,
    },
    #[error("unexpected frame kind {got} (expected {expected})")]
    /// A frame of another kind than the one required ([`read_frame_of`]).
    UnexpectedKind {
        /// Kind received.
        got: u8,
        /// Kind required.
        expected: u8,
    },
    #[error(transparent)]
    /// Any other I/O error, timeouts included (see [`WireError::is_timeout`]).
    Io(#[from] io::Error),
}

impl WireError {
    /// True when the error is a read timeout rather than bad data.
    pub fn is_timeout(&self) -> bool {
        matches!(self, WireError::Io(e) if matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut))
    }
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Frame kind, chosen by the layer using the frames.
    pub kind: u8,
    /// Payload length, bytes.
    pub len: u32,
}

impl FrameHeader {
    /// The header's 8 bytes, with this build's [`MAGIC`] and [`VERSION`].
    pub fn encode(&self) -> [u8; HEADER_LEN] {
        let l = self.len.to_le_bytes();
        [
            MAGIC[0], MAGIC[1], VERSION, self.kind, l[0], l[1], l[2], l[3],
        ]
    }

    /// Parses a header, rejecting a bad magic or version and a payload
    /// longer than `max_len` bytes.
    pub fn decode(buf: &[u8; HEADER_LEN], max_len: u32) -> Result<Self, WireError> {
        if buf[0..2] != MAGIC {
            return Err(WireError::BadMagic([buf[0], buf[1]]));
        }
        if buf[2] != VERSION {
            return Err(WireError::BadVersion(buf[2]));
        }
        let len = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
        if len > max_len {
            return Err(WireError::TooLong { len, max: max_len });
        }
        Ok(FrameHeader { kind: buf[3], len })
    }
}

/// Header for a frame whose payload is the concatenation of `parts`.
pub fn header_for(kind: u8, parts: &[&[u8]]) -> io::Result<FrameHeader> {
    let total: usize = parts.iter().map(|p| p.len()).sum();
    let len = u32::try_from(total)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "frame payload exceeds 4 GiB"))?;
    Ok(FrameHeader { kind, len })
}

/// Writes one frame; the caller flushes when it wants the bytes on the wire.
/// The parts go in vectored writes: a `BufWriter` copies a small frame into
/// its buffer, and hands one larger than its buffer (a batch of pages)
/// straight to `writev`, with no copy.
pub fn write_frame_parts(w: &mut impl Write, kind: u8, parts: &[&[u8]]) -> io::Result<()> {
    let header = header_for(kind, parts)?.encode();
    let mut slices: Vec<IoSlice<'_>> = std::iter::once(&header[..])
        .chain(parts.iter().copied())
        .map(IoSlice::new)
        .collect();
    let mut rest = &mut slices[..];
    IoSlice::advance_slices(&mut rest, 0);
    while !rest.is_empty() {
        match w.write_vectored(rest) {
            Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => IoSlice::advance_slices(&mut rest, n),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Writes one frame whose payload is `payload`; see [`write_frame_parts`].
pub fn write_frame(w: &mut impl Write, kind: u8, payload: &[u8]) -> io::Result<()> {
    write_frame_parts(w, kind, &[payload])
}

/// Reads one header. A clean end of stream before the first byte is `Closed`.
pub fn read_header(r: &mut impl Read, max_len: u32) -> Result<FrameHeader, WireError> {
    let mut buf = [0u8; HEADER_LEN];
    let mut filled = 0;
    while filled < HEADER_LEN {
        match r.read(&mut buf[filled..]) {
            Ok(0) if filled == 0 => return Err(WireError::Closed),
            Ok(0) => return Err(WireError::Truncated),
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e.into()),
        }
    }
    FrameHeader::decode(&buf, max_len)
}

/// Reads exactly `len` payload bytes into a new buffer, straight from the
/// stream into its spare capacity (not zeroed first); a short stream is
/// `Truncated`. `len` was checked against the connection's bound.
pub fn read_payload(r: &mut impl Read, len: usize) -> Result<Vec<u8>, WireError> {
    read_payload_into(r, len, Vec::with_capacity(len))
}

/// [`read_payload`] into `buffer` (emptied first; its capacity is reused).
pub fn read_payload_into(
    r: &mut impl Read,
    len: usize,
    payload: Vec<u8>,
) -> Result<Vec<u8>, WireError> {
    read_rest_into(r, &[], len, payload)
}

/// A `len`-byte payload whose first bytes, `head`, were already read:
/// `head` and the rest from `r`, into `buffer` (emptied first).
pub fn read_rest_into(
    r: &mut impl Read,
    head: &[u8],
    len: usize,
    mut payload: Vec<u8>,
) -> Result<Vec<u8>, WireError> {
    debug_assert!(head.len() <= len);
    payload.clear();
    payload.extend_from_slice(head);
    let rest = len - head.len();
    match r.take(rest as u64).read_to_end(&mut payload) {
        Ok(n) if n == rest => Ok(payload),
        Ok(_) => Err(WireError::Truncated),
        Err(e) => Err(WireError::Io(e)),
    }
}

/// Fills `out` from `r`; a short stream is `Truncated`.
pub fn read_exact_into(r: &mut impl Read, out: &mut [u8]) -> Result<(), WireError> {
    r.read_exact(out).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Truncated,
        _ => WireError::Io(e),
    })
}

/// Reads one whole frame: its kind and payload.
pub fn read_frame(r: &mut impl Read, max_len: u32) -> Result<(u8, Vec<u8>), WireError> {
    let header = read_header(r, max_len)?;
    let payload = read_payload(r, header.len as usize)?;
    Ok((header.kind, payload))
}

/// Reads one frame and insists on its kind.
pub fn read_frame_of(r: &mut impl Read, kind: u8, max_len: u32) -> Result<Vec<u8>, WireError> {
    let (got, payload) = read_frame(r, max_len)?;
    if got != kind {
        return Err(WireError::UnexpectedKind {
            got,
            expected: kind,
        });
    }
    Ok(payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let mut buf = Vec::new();
        write_frame_parts(&mut buf, 7, &[b"hello ", b"world"]).unwrap();
        write_frame(&mut buf, 9, b"").unwrap();
        let mut r = &buf[..];
        assert_eq!(
            read_frame(&mut r, 100).unwrap(),
            (7, b"hello world".to_vec())
        );
        assert_eq!(read_frame(&mut r, 100).unwrap(), (9, Vec::new()));
        assert!(matches!(read_frame(&mut r, 100), Err(WireError::Closed)));
    }

    /// A writer that takes at most 3 bytes of its first non-empty slice per
    /// call, as a socket under pressure may.
    struct Trickle(Vec<u8>);
    impl Write for Trickle {
        fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
            let n = buf.len().min(3);
            self.0.extend_from_slice(&buf[..n]);
            Ok(n)
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn short_vectored_writes_still_write_whole_frames() {
        let mut w = Trickle(Vec::new());
        let parts: [&[u8]; 4] = [b"", b"page header ", &[7u8; 100], b"!"];
        write_frame_parts(&mut w, 5, &parts).unwrap();
        let mut r = &w.0[..];
        let (kind, payload) = read_frame(&mut r, 1000).unwrap();
        assert_eq!((kind, payload), (5, parts.concat()));
        assert!(r.is_empty());
    }

    #[test]
    fn rejects_garbage_before_allocating() {
        let mut r = &b"GET / HTTP/1.1\r\n"[..];
        assert!(matches!(
            read_frame(&mut r, 100),
            Err(WireError::BadMagic(_))
        ));
        let huge = FrameHeader {
            kind: 1,
            len: u32::MAX,
        }
        .encode();
        assert!(matches!(
            read_frame(&mut &huge[..], 1 << 20),
            Err(WireError::TooLong { .. })
        ));
        let mut old = FrameHeader { kind: 1, len: 0 }.encode();
        old[2] = 0;
        assert!(matches!(
            read_frame(&mut &old[..], 10),
            Err(WireError::BadVersion(0))
        ));
    }

    #[test]
    fn truncated_frames_are_reported() {
        let mut buf = Vec::new();
        write_frame(&mut buf, 1, b"0123456789").unwrap();
        for cut in 1..buf.len() {
            let err = read_frame(&mut &buf[..cut], 100).unwrap_err();
            assert!(matches!(err, WireError::Truncated), "cut at {cut}: {err}");
        }
    }
}
