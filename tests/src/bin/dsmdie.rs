//! Test helper for a task that dies in a running job (started by dsmexec,
//! srun or mpirun): `dsmdie RANK after` joins the job and passes a barrier,
//! then rank RANK prints `rank RANK dying` and kills itself with SIGKILL
//! while the others wait in a second barrier (which can never complete:
//! they must notice the loss and end with the engine's status 70).
//! `dsmdie RANK before` makes rank RANK
//! exit with status 3 before joining, so the others never see it arrive.
//! `dsmdie RANK stop` is `after` with SIGSTOP instead of SIGKILL: rank
//! RANK prints `rank RANK stopping` and stays, silent, until killed.

use std::io::Write;

fn main() {
    let mut args = std::env::args().skip(1);
    let victim: usize = args.next().and_then(|a| a.parse().ok()).unwrap_or(1);
    let when = args.next().unwrap_or_else(|| "after".to_string());
    if when == "before" {
        let rank = ["DSM_RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK"]
            .iter()
            .find_map(|v| std::env::var(v).ok())
            .and_then(|r| r.parse::<usize>().ok());
        if rank == Some(victim) {
            eprintln!("dsmdie: rank {victim} exits before joining");
            std::process::exit(3);
        }
    }
    let dsm = match dsm::init_from_env() {
        Ok(d) => d,
        Err(e) => {
            eprintln!("dsmdie: {e}");
            std::process::exit(1)
        }
    };
    if let Err(e) = dsm.barrier() {
        eprintln!("dsmdie: first barrier: {e}");
        std::process::exit(1)
    }
    if dsm.rank() == victim && when == "stop" {
        println!("rank {victim} stopping");
        let _ = std::io::stdout().flush();
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGSTOP);
    } else if dsm.rank() == victim {
        println!("rank {victim} dying");
        let _ = std::io::stdout().flush();
        let _ = nix::sys::signal::raise(nix::sys::signal::Signal::SIGKILL);
    }
    println!("rank {} waiting", dsm.rank());
    let _ = std::io::stdout().flush();
    match dsm.barrier() {
        Ok(()) => println!("rank {}: second barrier passed", dsm.rank()),
        Err(e) => {
            // The engine that stopped prints the cause and ends the process
            // (status 70); give it the time to, rather than racing it.
            std::thread::sleep(std::time::Duration::from_secs(5));
            eprintln!("dsmdie: rank {}: {e}", dsm.rank());
            std::process::exit(1)
        }
    }
}
