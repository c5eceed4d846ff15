//! The dsm launcher: `dsmexec` starts one `dsmwrap` per slot (locally, or
//! over SSH), and each `dsmwrap` connects back, authenticates with the job
//! secret, receives its rank and the peer table, and runs the program.
//! See `docs/ARCHITECTURE.md` for the whole start-up sequence.

pub mod control;
pub mod exec;
pub mod machinefile;
pub mod output;
pub mod report;
pub mod wrap;

/// Exit code for bad input and start-up failures (as for usage errors).
pub const EXIT_USAGE: i32 = 2;
