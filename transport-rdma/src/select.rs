//! Choosing the transport: `DSM_TRANSPORT=rdma|tcp|auto`.
//!
//! `auto` (the default) takes RDMA when an active RDMA port exists and TCP
//! otherwise; `rdma` without a device fails with one line that names the
//! problem and the way out (`DSM_TRANSPORT=tcp`).

use std::str::FromStr;

use crate::verbs::{self, PortSummary};

/// Environment variable choosing the transport: `rdma`, `tcp` or `auto`.
pub const ENV_TRANSPORT: &str = "DSM_TRANSPORT";
/// Device to use (default: the first with an active port), e.g. `rxe0`, `mlx5_0`.
pub const ENV_DEVICE: &str = "DSM_RDMA_DEVICE";

/// What the user asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum TransportChoice {
    /// RDMA, failing without a usable device (also spelt `verbs` or `ib`).
    Rdma,
    /// TCP, whatever the machine has.
    Tcp,
    /// RDMA when an active port exists, else TCP (also an empty value).
    #[default]
    Auto,
}

/// What will be used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Selected {
    /// RDMA over this active port.
    Rdma(PortSummary),
    /// TCP.
    Tcp,
}

/// Why no transport could be selected.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SelectError {
    /// `DSM_TRANSPORT` holds something other than rdma, tcp or auto.
    #[error("{ENV_TRANSPORT}={0:?} is invalid: expected rdma, tcp or auto")]
    BadValue(String),
    /// RDMA was required but no active port exists; holds the reason.
    #[error(
        "{ENV_TRANSPORT}=rdma but no usable RDMA device ({0}); set {ENV_TRANSPORT}=tcp to use TCP"
    )]
    NoDevice(String),
}

impl FromStr for TransportChoice {
    type Err = SelectError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s.trim().to_ascii_lowercase().as_str() {
            "rdma" | "verbs" | "ib" => Ok(TransportChoice::Rdma),
            "tcp" => Ok(TransportChoice::Tcp),
            "auto" | "" => Ok(TransportChoice::Auto),
            _ => Err(SelectError::BadValue(s.to_string())),
        }
    }
}

impl TransportChoice {
    /// `DSM_TRANSPORT`, `Auto` when unset.
    pub fn from_env() -> Result<Self, SelectError> {
        match std::env::var(ENV_TRANSPORT) {
            Ok(v) => v.parse(),
            Err(std::env::VarError::NotPresent) => Ok(TransportChoice::Auto),
            Err(std::env::VarError::NotUnicode(v)) => {
                Err(SelectError::BadValue(v.to_string_lossy().into_owned()))
            }
        }
    }
}

/// The first active RDMA port (of `DSM_RDMA_DEVICE` when set), or why there
/// is none.
pub fn active_port() -> Result<PortSummary, String> {
    let device = std::env::var(ENV_DEVICE).ok().filter(|d| !d.is_empty());
    verbs::first_active_port(device.as_deref()).map_err(|e| match e {
        verbs::VerbsError::NoDevice(why) => why,
        other => other.to_string(),
    })
}

/// Whether an active RDMA device exists. Never panics, also without kernel
/// support.
pub fn rdma_available() -> bool {
    active_port().is_ok()
}

/// Resolves a choice against the machine.
pub fn select(choice: TransportChoice) -> Result<Selected, SelectError> {
    select_with(choice, active_port)
}

/// `DSM_TRANSPORT` resolved against the machine.
pub fn select_from_env() -> Result<Selected, SelectError> {
    select(TransportChoice::from_env()?)
}

fn select_with(
    choice: TransportChoice,
    probe: impl FnOnce() -> Result<PortSummary, String>,
) -> Result<Selected, SelectError> {
    match choice {
        TransportChoice::Tcp => Ok(Selected::Tcp),
        TransportChoice::Rdma => probe().map(Selected::Rdma).map_err(SelectError::NoDevice),
        TransportChoice::Auto => Ok(probe().map(Selected::Rdma).unwrap_or(Selected::Tcp)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port() -> PortSummary {
        PortSummary {
            device: "rxe0".into(),
            port: 1,
            active: true,
            link_layer_ethernet: true,
        }
    }

    #[test]
    fn parses_choices() {
        assert_eq!("rdma".parse(), Ok(TransportChoice::Rdma));
        assert_eq!(" TCP ".parse(), Ok(TransportChoice::Tcp));
        assert_eq!("auto".parse(), Ok(TransportChoice::Auto));
        assert_eq!("".parse(), Ok(TransportChoice::Auto));
        let err = "udp".parse::<TransportChoice>().unwrap_err();
        assert_eq!(err, SelectError::BadValue("udp".into()));
        assert!(err.to_string().contains("DSM_TRANSPORT=\"udp\""), "{err}");
    }

    #[test]
    fn resolves_against_a_probe() {
        let none = || Err::<PortSummary, _>("no RDMA device found".to_string());
        assert_eq!(select_with(TransportChoice::Tcp, none), Ok(Selected::Tcp));
        assert_eq!(select_with(TransportChoice::Auto, none), Ok(Selected::Tcp));
        let err = select_with(TransportChoice::Rdma, none).unwrap_err();
        let line = err.to_string();
        assert!(!line.contains('\n'), "{line}");
        assert!(line.contains("no RDMA device found"), "{line}");
        assert!(line.contains("DSM_TRANSPORT=tcp"), "{line}");
        assert_eq!(
            select_with(TransportChoice::Auto, || Ok(port())),
            Ok(Selected::Rdma(port()))
        );
        assert_eq!(
            select_with(TransportChoice::Rdma, || Ok(port())),
            Ok(Selected::Rdma(port()))
        );
    }

    /// On this machine: never panics; without a device `rdma` is the one-line
    /// error and `auto` is TCP.
    #[test]
    fn real_machine_probe_is_clean() {
        match active_port() {
            Ok(p) => {
                assert!(p.active);
                assert!(matches!(
                    select(TransportChoice::Auto),
                    Ok(Selected::Rdma(_))
                ));
            }
            Err(why) => {
                assert!(
                    std::env::var("RXE_IN_VM").is_err(),
                    "no device in the VM: {why}"
                );
                assert_eq!(select(TransportChoice::Auto), Ok(Selected::Tcp));
                let line = select(TransportChoice::Rdma).unwrap_err().to_string();
                assert!(line.contains("DSM_TRANSPORT=tcp") && !line.contains('\n'));
                eprintln!("no RDMA here, as expected outside the VM: {line}");
            }
        }
    }
}
