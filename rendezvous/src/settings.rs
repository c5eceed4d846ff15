//! Where and how long the ranks meet: the `DSM_RENDEZVOUS_*` variables.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::RendezvousError;

/// Directory of the rendezvous files: private to the user, on a file
/// system every node sees (default `$HOME/.dsm/rendezvous`).
pub const ENV_DIR: &str = "DSM_RENDEZVOUS_DIR";
/// Seconds the whole rendezvous may take (default [`DEFAULT_TIMEOUT`]).
pub const ENV_TIMEOUT: &str = "DSM_RENDEZVOUS_TIMEOUT";
/// Comma-separated IPs rank 0 publishes instead of the ones it finds.
pub const ENV_ADDR: &str = "DSM_RENDEZVOUS_ADDR";
/// `any`: rank 0 binds its rendezvous and DSM listeners on every interface
/// (for addresses that are not local, e.g. behind NAT); default `published`.
pub const ENV_BIND: &str = "DSM_RENDEZVOUS_BIND";
/// Default for [`ENV_TIMEOUT`].
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(120);

/// Where and how long to meet.
#[derive(Debug, Clone)]
pub struct Settings {
    /// Directory of the rendezvous files ([`ENV_DIR`]).
    pub dir: PathBuf,
    /// Bound on the whole rendezvous ([`ENV_TIMEOUT`]).
    pub timeout: Duration,
    /// Addresses rank 0 publishes; empty: found from the host name and interfaces.
    pub addrs: Vec<IpAddr>,
    /// Rank 0 listens on every interface instead of the published addresses.
    pub bind_any: bool,
}

impl Settings {
    /// Reads [`ENV_DIR`], [`ENV_TIMEOUT`], [`ENV_ADDR`] and [`ENV_BIND`];
    /// fails on a malformed value, or when neither `DSM_RENDEZVOUS_DIR` nor
    /// `HOME` is set.
    pub fn from_env() -> Result<Settings, RendezvousError> {
        let bad = |name, value: &str, why: &str| RendezvousError::BadVariable {
            name,
            value: value.to_string(),
            why: why.to_string(),
        };
        let dir = match std::env::var_os(ENV_DIR) {
            Some(dir) if !dir.is_empty() => PathBuf::from(dir),
            _ => match std::env::var_os("HOME") {
                Some(home) if !home.is_empty() => {
                    PathBuf::from(home).join(".dsm").join("rendezvous")
                }
                _ => {
                    return Err(RendezvousError::Directory {
                        dir: PathBuf::from("$HOME/.dsm/rendezvous"),
                        why: format!("HOME is not set; set {ENV_DIR} to a private directory on a shared file system"),
                    })
                }
            },
        };
        let timeout = match std::env::var(ENV_TIMEOUT) {
            Ok(text) => {
                let secs: f64 = text
                    .trim()
                    .parse()
                    .map_err(|_| bad(ENV_TIMEOUT, &text, "expected seconds"))?;
                if !(secs > 0.0 && secs <= 86_400.0) {
                    return Err(bad(ENV_TIMEOUT, &text, "must be in (0, 86400]"));
                }
                Duration::from_secs_f64(secs)
            }
            Err(_) => DEFAULT_TIMEOUT,
        };
        let addrs = match std::env::var(ENV_ADDR) {
            Ok(text) if !text.trim().is_empty() => text
                .split(',')
                .map(|a| a.trim().parse())
                .collect::<Result<Vec<IpAddr>, _>>()
                .map_err(|_| bad(ENV_ADDR, &text, "expected comma-separated IP addresses"))?,
            _ => Vec::new(),
        };
        let bind_any = match std::env::var(ENV_BIND) {
            Ok(text) => match text.trim() {
                "any" => true,
                "" | "published" => false,
                _ => return Err(bad(ENV_BIND, &text, "expected `any` or `published`")),
            },
            Err(_) => false,
        };
        Ok(Settings {
            dir,
            timeout,
            addrs,
            bind_any,
        })
    }
}
