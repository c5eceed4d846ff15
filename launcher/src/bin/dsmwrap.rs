//! dsmwrap: started by dsmexec on each host (directly or over SSH); not
//! meant to be run by hand. Reads the job secret on stdin.

use std::path::PathBuf;

use clap::Parser;
use dsm_launcher::wrap::{self, WrapArgs};

#[derive(Parser, Debug)]
#[command(
    name = "dsmwrap",
    version,
    about = "Per-host helper of dsmexec: connects back to it, then runs and supervises one rank (reads the job secret on stdin)"
)]
struct Cli {
    /// dsmexec's control address: IP:PORT, or ssh-client:PORT to use the address in SSH_CLIENT
    #[arg(long)]
    connect: String,
    /// This process's slot (its rank) in the job
    #[arg(long)]
    slot: usize,
    /// Directory to run the program in (kept as is when it does not exist here)
    #[arg(long)]
    cwd: Option<PathBuf>,
    /// PROGRAM [ARGS]...
    #[arg(trailing_var_arg = true, required = true, allow_hyphen_values = true)]
    command: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    dsm_core::logging::init();
    let mut command = cli.command.into_iter();
    let program = command.next().unwrap_or_default();
    let args = WrapArgs {
        connect: cli.connect,
        slot: cli.slot,
        cwd: cli.cwd,
        program,
        args: command.collect(),
    };
    match wrap::run(args) {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            eprintln!("dsmwrap: {e:#}");
            std::process::exit(dsm_launcher::EXIT_USAGE);
        }
    }
}
