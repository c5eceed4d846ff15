//! Mutual challenge-response authentication with the per-job secret.
//!
//! Every connection a job accepts (launcher control port, DSM ports) starts
//! with this exchange; the secret itself never crosses the wire:
//!
//! ```text
//! connector -> acceptor  HELLO      nonce_c | ident
//! acceptor  -> connector CHALLENGE  nonce_a | HMAC(secret, "accept" | nonce_c | nonce_a | ident)
//! connector -> acceptor  PROOF      HMAC(secret, "connect" | nonce_a | nonce_c | ident)
//! acceptor  -> connector ACCEPTED
//! ```
//!
//! Fresh nonces on both sides make a recorded handshake useless for replay,
//! and the distinct labels stop one side's answer from being reflected.

use std::fmt;
use std::io::{Read, Write};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

use crate::wire::{self, WireError};

const KIND_HELLO: u8 = 0xA1;
const KIND_CHALLENGE: u8 = 0xA2;
const KIND_PROOF: u8 = 0xA3;
const KIND_ACCEPTED: u8 = 0xA4;
const NONCE_LEN: usize = 32;
const MAC_LEN: usize = 32;
/// Bound on handshake frames: nothing legitimate comes near it.
const MAX_HANDSHAKE_FRAME: u32 = 1024;
/// Longest identity (bytes) a connector may present.
pub const MAX_IDENT_LEN: usize = 512;

/// The per-job random secret shared by the launcher and every rank.
#[derive(Clone, PartialEq, Eq)]
pub struct JobSecret([u8; 32]);

impl JobSecret {
    /// Length of the hex form: two digits per byte.
    pub const HEX_LEN: usize = 64;

    /// A fresh secret from the operating system's random source.
    pub fn generate() -> Result<Self, getrandom::Error> {
        let mut bytes = [0u8; 32];
        getrandom::fill(&mut bytes)?;
        Ok(JobSecret(bytes))
    }

    /// The secret with these bytes.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        JobSecret(bytes)
    }

    /// The 64-digit lowercase hex form, as [`JobSecret::from_hex`] reads it.
    pub fn to_hex(&self) -> String {
        hex_encode(&self.0)
    }

    /// Parses the 64-digit hex form (surrounding whitespace ignored).
    pub fn from_hex(text: &str) -> Option<Self> {
        let text = text.trim();
        if text.len() != Self::HEX_LEN {
            return None;
        }
        let mut bytes = [0u8; 32];
        for (i, byte) in bytes.iter_mut().enumerate() {
            *byte = u8::from_str_radix(text.get(2 * i..2 * i + 2)?, 16).ok()?;
        }
        Some(JobSecret(bytes))
    }

    fn mac(&self, label: &[u8], first: &[u8], second: &[u8], ident: &[u8]) -> Hmac<Sha256> {
        let mut mac = <Hmac<Sha256> as KeyInit>::new_from_slice(&self.0)
            .expect("HMAC accepts keys of any length");
        for part in [label, first, second, ident] {
            mac.update(&(part.len() as u32).to_le_bytes());
            mac.update(part);
        }
        mac
    }
}

impl fmt::Debug for JobSecret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("JobSecret(<redacted>)")
    }
}

/// `bytes` as lowercase hex, two digits per byte.
pub fn hex_encode(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Why a handshake failed.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("peer failed authentication: it does not know the job secret")]
    /// The peer's MAC did not verify: it does not hold the job secret.
    BadProof,
    #[error("malformed handshake: {0}")]
    /// A handshake frame had the wrong length (or the identity was too long).
    Malformed(&'static str),
    #[error("handshake: {0}")]
    /// Reading or writing a handshake frame failed.
    Wire(#[from] WireError),
    #[error("cannot draw a random nonce: {0}")]
    /// The operating system's random source failed.
    Random(getrandom::Error),
}

fn nonce() -> Result<[u8; NONCE_LEN], AuthError> {
    let mut n = [0u8; NONCE_LEN];
    getrandom::fill(&mut n).map_err(AuthError::Random)?;
    Ok(n)
}

/// Connector side. `ident` says who is connecting (checked by the acceptor).
pub fn connect<S: Read + Write>(
    stream: &mut S,
    secret: &JobSecret,
    ident: &[u8],
) -> Result<(), AuthError> {
    if ident.len() > MAX_IDENT_LEN {
        return Err(AuthError::Malformed("identity too long"));
    }
    let nonce_c = nonce()?;
    wire::write_frame_parts(stream, KIND_HELLO, &[&nonce_c, ident]).map_err(WireError::Io)?;
    stream.flush().map_err(WireError::Io)?;

    let challenge = wire::read_frame_of(stream, KIND_CHALLENGE, MAX_HANDSHAKE_FRAME)?;
    if challenge.len() != NONCE_LEN + MAC_LEN {
        return Err(AuthError::Malformed("challenge has the wrong length"));
    }
    let (nonce_a, mac_a) = challenge.split_at(NONCE_LEN);
    secret
        .mac(b"dsm-accept", &nonce_c, nonce_a, ident)
        .verify_slice(mac_a)
        .map_err(|_| AuthError::BadProof)?;

    let proof = secret
        .mac(b"dsm-connect", nonce_a, &nonce_c, ident)
        .finalize()
        .into_bytes();
    wire::write_frame(stream, KIND_PROOF, &proof).map_err(WireError::Io)?;
    stream.flush().map_err(WireError::Io)?;
    wire::read_frame_of(stream, KIND_ACCEPTED, MAX_HANDSHAKE_FRAME)?;
    Ok(())
}

/// Acceptor side. Returns the connector's identity once it proved it knows
/// the secret; the caller decides whether that identity is welcome.
pub fn accept<S: Read + Write>(stream: &mut S, secret: &JobSecret) -> Result<Vec<u8>, AuthError> {
    let hello = wire::read_frame_of(stream, KIND_HELLO, MAX_HANDSHAKE_FRAME)?;
    if hello.len() < NONCE_LEN || hello.len() > NONCE_LEN + MAX_IDENT_LEN {
        return Err(AuthError::Malformed("hello has the wrong length"));
    }
    let (nonce_c, ident) = hello.split_at(NONCE_LEN);
    let nonce_a = nonce()?;
    let mac_a = secret
        .mac(b"dsm-accept", nonce_c, &nonce_a, ident)
        .finalize()
        .into_bytes();
    wire::write_frame_parts(stream, KIND_CHALLENGE, &[&nonce_a, &mac_a]).map_err(WireError::Io)?;
    stream.flush().map_err(WireError::Io)?;

    let proof = wire::read_frame_of(stream, KIND_PROOF, MAX_HANDSHAKE_FRAME)?;
    secret
        .mac(b"dsm-connect", &nonce_a, nonce_c, ident)
        .verify_slice(&proof)
        .map_err(|_| AuthError::BadProof)?;
    wire::write_frame(stream, KIND_ACCEPTED, &[]).map_err(WireError::Io)?;
    stream.flush().map_err(WireError::Io)?;
    Ok(ident.to_vec())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;
    use std::thread;

    fn run(
        client_secret: JobSecret,
        server_secret: JobSecret,
    ) -> (Result<(), AuthError>, Result<Vec<u8>, AuthError>) {
        let (mut a, mut b) = UnixStream::pair().unwrap();
        let server = thread::spawn(move || accept(&mut b, &server_secret));
        let client = connect(&mut a, &client_secret, b"rank 3");
        drop(a);
        (client, server.join().unwrap())
    }

    #[test]
    fn same_secret_authenticates_both_ways() {
        let s = JobSecret::generate().unwrap();
        let (c, a) = run(s.clone(), s);
        c.unwrap();
        assert_eq!(a.unwrap(), b"rank 3");
    }

    #[test]
    fn wrong_secret_is_refused_on_both_sides() {
        let (c, a) = run(
            JobSecret::generate().unwrap(),
            JobSecret::generate().unwrap(),
        );
        assert!(matches!(c, Err(AuthError::BadProof)));
        // The connector hangs up after the failed check: the acceptor sees it gone.
        assert!(a.is_err());
    }

    #[test]
    fn hex_round_trip_and_rejects() {
        let s = JobSecret::generate().unwrap();
        assert_eq!(JobSecret::from_hex(&s.to_hex()), Some(s.clone()));
        assert_eq!(JobSecret::from_hex("zz"), None);
        assert_eq!(JobSecret::from_hex(&"g".repeat(64)), None);
        assert!(!format!("{s:?}").contains(&s.to_hex()));
    }
}
