//! Stand-in for `ssh` in tests: `fakessh DIR [OPTIONS] HOST COMMAND` writes
//! COMMAND to `DIR/ssh-HOST.cmd`, waits (at most 120 s) until `DIR/go`
//! exists, then runs COMMAND with `sh -c` on this machine, as sshd would,
//! with SSH_CLIENT set to loopback. It lets a test hold a slot's start-up
//! (dsmexec's control port stays open) and read the remote command line
//! (the last slot's, when a host has several).

use std::os::unix::process::CommandExt;
use std::path::Path;
use std::time::{Duration, Instant};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: fakessh DIR [OPTIONS] HOST COMMAND");
        std::process::exit(255);
    }
    let dir = Path::new(&args[0]);
    let command = &args[args.len() - 1];
    let host = &args[args.len() - 2];
    // Per process: two slots of one host start at once.
    let tmp = dir.join(format!("ssh-{host}.{}.tmp", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, command)
        .and_then(|_| std::fs::rename(&tmp, dir.join(format!("ssh-{host}.cmd"))))
    {
        eprintln!("fakessh: {e}");
        std::process::exit(255);
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while !dir.join("go").exists() {
        if Instant::now() >= deadline {
            eprintln!("fakessh: {} never appeared", dir.join("go").display());
            std::process::exit(255);
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let e = std::process::Command::new("sh")
        .args(["-c", command])
        .env("SSH_CLIENT", "127.0.0.1 40000 22")
        .exec();
    eprintln!("fakessh: sh: {e}");
    std::process::exit(255);
}
