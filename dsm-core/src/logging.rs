//! Log output for dsm processes: to stderr (which the launcher forwards with
//! the rank prefix), filtered by `DSM_LOG` (e.g. `DSM_LOG=debug`), warnings
//! and errors by default.

use std::io::IsTerminal;

/// Installs the default subscriber unless the program installed its own.
pub fn init() {
    let filter = tracing_subscriber::EnvFilter::try_from_env("DSM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .with_target(false)
        .without_time()
        .try_init();
}
