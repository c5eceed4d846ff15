//! dsmexec: start a dsm job, one process per machine-file slot (over SSH)
//! or `-n N` processes on this machine.

use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::error::ErrorKind;
use clap::Parser;
use dsm_launcher::exec::{self, JobSpec};
use dsm_launcher::machinefile::{self, Slot};
use dsm_launcher::EXIT_USAGE;

const AFTER_HELP: &str = "\
MACHINEFILE: one host per line, ranks in file order; `host slots=K` starts K
processes there; blank lines and # comments are skipped. localhost, 127.0.0.1
and this machine's name start local processes, other hosts are reached with
`SSH -o BatchMode=yes HOST dsmwrap ...` (dsmwrap must exist at the same path
there, or give --wrap). PROGRAM is looked up on each host (a path, or PATH).

Every line a process writes reaches dsmexec's stdout or stderr as
`[RANK HOST stdout|stderr] line`. Exit status: 0 when every rank exits 0;
otherwise the first failing rank's status (128+N for signal N), with one line
naming it, after the other ranks were stopped; 2 for bad input or a job that
could not start; 128+N when dsmexec itself got signal N (forwarded to every rank).
A rank whose peers hear nothing from it for DSM_PEER_TIMEOUT seconds (stopped,
wedged, swapping) is named as not responding and the job stopped.

Stuck? `kill -USR1 <dsmexec pid>`: every rank prints what each of its threads
waits for (page and home, lock, barrier and the ranks it misses) and since
when; the job goes on. Ranks also do so by themselves when a wait passes
DSM_HANG_REPORT_S seconds (default 300, `off` to disable).

Environment: DSM_SSH (like --ssh); variables named DSM_* (other than DSM_SSH),
RUST_LOG and RUST_BACKTRACE are exported to every rank.";

#[derive(Parser, Debug)]
#[command(
    name = "dsmexec",
    version,
    about = "Start a dsm distributed-shared-memory job: one process per slot, locally or over SSH",
    override_usage = "dsmexec [OPTIONS] MACHINEFILE PROGRAM [ARGS]...\n       dsmexec [OPTIONS] -n N PROGRAM [ARGS]...",
    after_help = AFTER_HELP
)]
struct Cli {
    /// Start N processes on this machine (no machine file, no SSH)
    #[arg(short = 'n', long = "np", value_name = "N")]
    np: Option<usize>,

    /// SSH command for remote hosts, e.g. 'ssh -p 2222 -i ~/.ssh/cluster'
    #[arg(long, env = "DSM_SSH", default_value = "ssh", value_name = "COMMAND")]
    ssh: String,

    /// Print the processes' lines as they are, without the rank prefix
    #[arg(long)]
    no_prefix: bool,

    /// Seconds the other ranks get to exit after a failure or a forwarded signal, before SIGKILL
    #[arg(long, default_value_t = 5.0, value_name = "SECONDS")]
    grace: f64,

    /// Seconds allowed for every host to start its process and connect back
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    startup_timeout: f64,

    /// Path of dsmwrap on every host [default: the dsmwrap beside this dsmexec]
    #[arg(long, value_name = "PATH")]
    wrap: Option<PathBuf>,

    /// Address dsmexec listens on for its processes [default: the one facing the hosts; 127.0.0.1 for local jobs]
    #[arg(long, value_name = "ADDR")]
    bind: Option<IpAddr>,

    /// Export a variable to every rank: NAME (its value here) or NAME=VALUE; repeatable
    #[arg(short = 'x', long = "export", value_name = "NAME[=VALUE]")]
    export: Vec<String>,

    /// Gather every rank's statistics into FILE at the end of the job: an HTML page with the counters, the rank-to-rank page traffic as a heat map and each rank's fault latency histogram (sets DSM_STATS=json for the ranks; their JSON lines are kept out of the output)
    #[arg(long, value_name = "FILE")]
    stats_report: Option<PathBuf>,

    /// Bind each rank (the thread that starts the DSM and those it creates later) to its service CPU, rank mod the host's CPUs, as `mpirun --bind-to core` does (sets DSM_BIND for the ranks). Not for ranks running several compute threads: they would share that one CPU
    #[arg(long, value_name = "core|none")]
    bind_to: Option<BindTo>,

    /// [MACHINEFILE] PROGRAM [ARGS]...
    #[arg(trailing_var_arg = true, required = true, value_name = "ARGS")]
    rest: Vec<String>,
}

/// `--bind-to`: the ranks' `DSM_BIND`.
#[derive(clap::ValueEnum, Clone, Copy, Debug)]
enum BindTo {
    /// One CPU per rank.
    Core,
    /// No binding.
    None,
}

/// With `--bind-to`, the ranks' `DSM_BIND`, whatever the environment said.
fn with_binding(mut env: Vec<(String, String)>, bind: Option<BindTo>) -> Vec<(String, String)> {
    if let Some(bind) = bind {
        env.retain(|(name, _)| name != "DSM_BIND");
        let value = match bind {
            BindTo::Core => "core",
            BindTo::None => "none",
        };
        env.push(("DSM_BIND".into(), value.into()));
    }
    env
}

fn usage_error(message: impl AsRef<str>) -> ! {
    eprintln!("dsmexec: {} (see dsmexec --help)", message.as_ref());
    std::process::exit(EXIT_USAGE);
}

fn seconds(name: &str, value: f64) -> Duration {
    Duration::try_from_secs_f64(value).unwrap_or_else(|_| {
        usage_error(format!(
            "--{name} {value}: expected a non-negative number of seconds"
        ))
    })
}

/// With `--stats-report`, the ranks print their statistics as JSON on
/// stderr (where dsmexec collects them), whatever DSM_STATS said.
fn with_stats_report(mut env: Vec<(String, String)>, report: bool) -> Vec<(String, String)> {
    if report {
        env.retain(|(name, _)| name != "DSM_STATS" && name != "DSM_STATS_FILE");
        env.push(("DSM_STATS".into(), "json".into()));
        // Empty is unset: a DSM_STATS_FILE local ranks inherit is overridden.
        env.push(("DSM_STATS_FILE".into(), String::new()));
    }
    env
}

fn exported_env(export: &[String]) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = std::env::vars()
        .filter(|(k, _)| {
            (k.starts_with("DSM_") && k != "DSM_SSH") || k == "RUST_LOG" || k == "RUST_BACKTRACE"
        })
        .collect();
    for item in export {
        let (name, value) = match item.split_once('=') {
            Some((n, v)) => (n.to_string(), v.to_string()),
            None => match std::env::var(item) {
                Ok(v) => (item.clone(), v),
                Err(_) => usage_error(format!(
                    "-x {item}: no such variable in dsmexec's environment"
                )),
            },
        };
        if name.is_empty() {
            usage_error(format!("-x {item}: empty variable name"));
        }
        env.retain(|(k, _)| *k != name);
        env.push((name, value));
    }
    env
}

fn main() {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) if matches!(e.kind(), ErrorKind::DisplayHelp | ErrorKind::DisplayVersion) => e.exit(),
        Err(e) if e.kind() == ErrorKind::MissingRequiredArgument => {
            usage_error("missing PROGRAM: dsmexec [OPTIONS] MACHINEFILE PROGRAM [ARGS]... or dsmexec [OPTIONS] -n N PROGRAM [ARGS]...")
        }
        Err(e) => {
            let text = e.to_string();
            let first = text.lines().next().unwrap_or("bad arguments");
            usage_error(first.trim_start_matches("error: "));
        }
    };

    let mut rest = cli.rest.into_iter();
    let (slots, local_name) = match cli.np {
        Some(0) => usage_error("-n 0: a job needs at least one process"),
        Some(n) => {
            let name = nix::unistd::gethostname()
                .map(|h| {
                    h.to_string_lossy()
                        .split('.')
                        .next()
                        .unwrap_or("localhost")
                        .to_string()
                })
                .unwrap_or_else(|_| "localhost".into());
            let slots = (0..n)
                .map(|_| Slot {
                    host: "localhost".into(),
                })
                .collect();
            (slots, Some(name))
        }
        None => {
            let file = rest
                .next()
                .unwrap_or_else(|| usage_error("missing MACHINEFILE (or use -n N)"));
            let slots = machinefile::read(std::path::Path::new(&file))
                .unwrap_or_else(|e| usage_error(e.to_string()));
            (slots, None)
        }
    };
    let program = rest
        .next()
        .unwrap_or_else(|| usage_error("missing PROGRAM"));
    let args: Vec<String> = rest.collect();

    let ssh = shlex::split(&cli.ssh)
        .filter(|words| !words.is_empty())
        .unwrap_or_else(|| {
            usage_error(format!("--ssh {:?}: cannot split into a command", cli.ssh))
        });
    let wrap = match cli.wrap {
        Some(path) => path,
        None => std::env::current_exe()
            .ok()
            .and_then(|exe| exe.parent().map(|dir| dir.join("dsmwrap")))
            .filter(|p| p.exists())
            .unwrap_or_else(|| {
                usage_error("cannot find dsmwrap beside dsmexec; give its path with --wrap")
            }),
    };
    let cwd =
        std::env::current_dir().unwrap_or_else(|e| usage_error(format!("current directory: {e}")));

    let spec = JobSpec {
        slots,
        program,
        args,
        ssh,
        wrap,
        cwd,
        prefix: !cli.no_prefix,
        grace: seconds("grace", cli.grace),
        startup_timeout: seconds("startup-timeout", cli.startup_timeout),
        env: with_binding(
            with_stats_report(exported_env(&cli.export), cli.stats_report.is_some()),
            cli.bind_to,
        ),
        bind: cli.bind,
        local_name,
        stats_report: cli.stats_report,
    };
    dsm_core::logging::init();
    std::process::exit(exec::run(spec));
}
