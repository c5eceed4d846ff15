//! Test helper run through dsmexec: `testprog TOKEN MODE [ARGS]`. TOKEN is
//! a unique string the test uses to find leftover processes in /proc.
//!
//! Modes:
//! * `wait` — print `ready`, then exit 0 on the first SIGTERM/SIGINT, saying which.
//! * `ignore` — print `ready`, ignore SIGTERM forever (only SIGKILL ends it).
//! * `fail R CODE` — rank R exits with CODE; the others `wait`.
//! * `raise R SIG` — rank R kills itself with signal SIG; the others `wait`.
//! * `spew LINES` — print LINES numbered lines on stdout and stderr, exit at once.
//! * `hostname` — print `host NAME listen ADDR` (this rank's entry in DSM_PEERS) and exit.
//! * `orphan` — start a grandchild (`testprog TOKEN ignore`), print `ready`, then `wait`.

use std::io::Write;

use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::iterator::Signals;

fn rank() -> usize {
    std::env::var("DSM_RANK")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(0)
}

fn ready() {
    println!("ready pid {}", std::process::id());
    let _ = std::io::stdout().flush();
}

fn wait_for_signal(ignore: bool) -> ! {
    let mut signals = Signals::new([SIGTERM, SIGINT]).expect("signal handlers");
    ready();
    for sig in signals.forever() {
        let name = if sig == SIGTERM { "SIGTERM" } else { "SIGINT" };
        if ignore {
            println!("ignored {name}");
            continue;
        }
        println!("caught {name}");
        std::process::exit(0);
    }
    unreachable!("Signals::forever never ends")
}

fn arg(args: &[String], i: usize) -> i32 {
    args.get(i)
        .and_then(|a| a.parse().ok())
        .expect("numeric argument")
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let mode = args.get(2).map(String::as_str).unwrap_or("wait");
    match mode {
        "wait" => wait_for_signal(false),
        "ignore" => wait_for_signal(true),
        "fail" if rank() == arg(&args, 3) as usize => std::process::exit(arg(&args, 4)),
        "raise" if rank() == arg(&args, 3) as usize => {
            let sig = nix::sys::signal::Signal::try_from(arg(&args, 4)).expect("signal number");
            let _ = nix::sys::signal::raise(sig);
            std::process::exit(99)
        }
        "fail" | "raise" => wait_for_signal(false),
        "spew" => {
            let lines = arg(&args, 3);
            let r = rank();
            let mut out = std::io::stdout().lock();
            let mut err = std::io::stderr().lock();
            for i in 0..lines {
                writeln!(out, "rank {r} out {i} {}", "x".repeat(100)).unwrap();
                writeln!(err, "rank {r} err {i}").unwrap();
            }
            // Exit straight after writing: nothing may be lost.
        }
        "hostname" => {
            let host = nix::unistd::gethostname().expect("hostname");
            let peers = std::env::var("DSM_PEERS").unwrap_or_default();
            let listen = peers.split(',').nth(rank()).unwrap_or("?").to_string();
            println!("host {} listen {listen}", host.to_string_lossy());
        }
        "orphan" => {
            let me = std::env::current_exe().expect("own path");
            // Deliberately never waited for: the test checks that the
            // launcher cleans up what a rank leaves behind.
            let grandchild = std::process::Command::new(me)
                .args([&args[1], "ignore"])
                .stdout(std::process::Stdio::null())
                .spawn()
                .expect("grandchild");
            std::mem::forget(grandchild);
            wait_for_signal(false)
        }
        other => {
            eprintln!("testprog: unknown mode {other}");
            std::process::exit(64)
        }
    }
}
