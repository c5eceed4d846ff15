//! Meeting through rank 0: rank 0 publishes the rendezvous file and serves
//! the registrations, the others read the file and register (see the crate
//! documentation).

use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};

use dsm_core::auth::{self, JobSecret};
use dsm_core::bootstrap::{Bootstrap, PeerInfo};
use dsm_core::wire;

use crate::settings::{Settings, ENV_BIND};
use crate::{io_err, RendezvousError, SchedulerJob};

const FILE_MAGIC: &str = "dsm-rendezvous 1";
const MAX_FILE: u64 = 64 << 10;
const KIND_REGISTER: u8 = 0xB1;
const KIND_TABLE: u8 = 0xB2;
const KIND_ERROR: u8 = 0xB3;
const MAX_REGISTER: u32 = 4096;
const MAX_PENDING: usize = 64;
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TRY: Duration = Duration::from_secs(3);
const POLL: Duration = Duration::from_millis(50);
const IDENT_PREFIX: &str = "dsm-rendezvous rank ";
/// A file is stale this long after its rendezvous ended.
const EXPIRY_MARGIN: Duration = Duration::from_secs(10);

/// The rendezvous file's content.
#[derive(Debug, Clone, PartialEq)]
struct Published {
    key: String,
    size: usize,
    host: String,
    secret: JobSecret,
    addrs: Vec<SocketAddr>,
    /// Unix time after which the rendezvous is over for sure (rank 0's
    /// deadline): a file still there later was left by a killed rank 0.
    expires: u64,
}

impl Published {
    fn render(&self) -> String {
        let mut text = format!(
            "{FILE_MAGIC}\nkey {}\nsize {}\nhost {}\nexpires {}\nsecret {}\n",
            self.key,
            self.size,
            self.host,
            self.expires,
            self.secret.to_hex()
        );
        for addr in &self.addrs {
            text.push_str(&format!("addr {addr}\n"));
        }
        text
    }

    fn parse(text: &str) -> Result<Published, String> {
        let mut lines = text.lines();
        if lines.next() != Some(FILE_MAGIC) {
            return Err(format!("does not start with {FILE_MAGIC:?}"));
        }
        let (mut key, mut size, mut host, mut secret, mut expires) = (None, None, None, None, None);
        let mut addrs = Vec::new();
        for line in lines {
            let (name, value) = line.split_once(' ').unwrap_or((line, ""));
            match name {
                "key" => key = Some(value.to_string()),
                "size" => size = Some(value.parse().map_err(|_| format!("bad size {value:?}"))?),
                "host" => host = Some(value.to_string()),
                "expires" => {
                    expires = Some(value.parse().map_err(|_| format!("bad expiry {value:?}"))?)
                }
                "secret" => {
                    secret = Some(JobSecret::from_hex(value).ok_or("bad secret")?);
                }
                "addr" => addrs.push(
                    value
                        .parse()
                        .map_err(|_| format!("bad address {value:?}"))?,
                ),
                "" => {}
                other => return Err(format!("unknown line {other:?}")),
            }
        }
        if addrs.is_empty() {
            return Err("no address".into());
        }
        Ok(Published {
            key: key.ok_or("no key")?,
            size: size.ok_or("no size")?,
            host: host.ok_or("no host")?,
            secret: secret.ok_or("no secret")?,
            addrs,
            expires: expires.ok_or("no expiry")?,
        })
    }
}

/// Checks that `dir` belongs to this user and nobody else can enter it.
fn check_private(dir: &Path) -> Result<(), RendezvousError> {
    let meta = fs::metadata(dir).map_err(|e| RendezvousError::Directory {
        dir: dir.to_path_buf(),
        why: e.to_string(),
    })?;
    let me = nix::unistd::geteuid().as_raw();
    let why = if !meta.is_dir() {
        Some("not a directory".to_string())
    } else if meta.uid() != me {
        Some(format!(
            "owned by uid {}, not by you (uid {me})",
            meta.uid()
        ))
    } else if meta.mode() & 0o077 != 0 {
        Some(format!(
            "mode {:04o} lets other users in; it holds job secrets: chmod 700 it",
            meta.mode() & 0o7777
        ))
    } else {
        None
    };
    match why {
        Some(why) => Err(RendezvousError::Directory {
            dir: dir.to_path_buf(),
            why,
        }),
        None => Ok(()),
    }
}

/// Removes the rendezvous file when rank 0 is done with it (or fails).
struct FileGuard(PathBuf);

impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}

fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Removes what killed rank 0s left behind: files whose rendezvous is over
/// (with a margin for clocks that differ between nodes) and old temporaries.
fn sweep(dir: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let now = unix_now();
    for entry in entries.flatten() {
        let path = entry.path();
        let name = entry.file_name();
        let name = name.to_string_lossy();
        let stale = if name.ends_with(".rv") {
            fs::read(&path)
                .ok()
                .and_then(|bytes| Published::parse(&String::from_utf8_lossy(&bytes)).ok())
                .is_some_and(|p| p.expires + EXPIRY_MARGIN.as_secs() < now)
        } else if name.ends_with(".tmp") {
            entry
                .metadata()
                .ok()
                .and_then(|m| m.modified().ok())
                .and_then(|t| t.elapsed().ok())
                .is_some_and(|age| age > Duration::from_secs(3600))
        } else {
            false
        };
        if stale {
            tracing::debug!("rendezvous: removing the stale {}", path.display());
            let _ = fs::remove_file(&path);
        }
    }
}

fn publish(dir: &Path, path: &Path, content: &str) -> Result<FileGuard, RendezvousError> {
    DirBuilder::new()
        .recursive(true)
        .mode(0o700)
        .create(dir)
        .map_err(|e| RendezvousError::Directory {
            dir: dir.to_path_buf(),
            why: format!("cannot create it: {e}"),
        })?;
    check_private(dir)?;
    sweep(dir);
    let file_err = |why: String| RendezvousError::File {
        path: path.to_path_buf(),
        why,
    };
    let tmp = dir.join(format!(
        ".{}.{}.tmp",
        path.file_name().and_then(|n| n.to_str()).unwrap_or("rv"),
        std::process::id()
    ));
    let _ = fs::remove_file(&tmp);
    let mut file = OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(&tmp)
        .map_err(|e| file_err(format!("creating {}: {e}", tmp.display())))?;
    let written = file
        .write_all(content.as_bytes())
        .and_then(|_| file.sync_all());
    drop(file);
    if let Err(e) = written.and_then(|_| fs::rename(&tmp, path)) {
        let _ = fs::remove_file(&tmp);
        return Err(file_err(format!("writing: {e}")));
    }
    Ok(FileGuard(path.to_path_buf()))
}

/// Reads the file if it is there and complete; `Ok(None)` if not (yet).
fn read_published(dir: &Path, path: &Path) -> Result<Option<Published>, RendezvousError> {
    let mut file = match File::open(path) {
        Ok(f) => f,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => {
            return Err(RendezvousError::File {
                path: path.to_path_buf(),
                why: e.to_string(),
            })
        }
    };
    check_private(dir)?;
    let mut text = String::new();
    Read::by_ref(&mut file)
        .take(MAX_FILE)
        .read_to_string(&mut text)
        .map_err(|e| RendezvousError::File {
            path: path.to_path_buf(),
            why: e.to_string(),
        })?;
    // A file being replaced can be seen half-written on some network file
    // systems: treat what does not parse as "not yet".
    Ok(Published::parse(&text).ok())
}

/// The addresses rank 0 publishes, best first.
fn candidate_addrs(settings: &Settings) -> Vec<IpAddr> {
    if !settings.addrs.is_empty() {
        return settings.addrs.clone();
    }
    let mut local: Vec<IpAddr> = Vec::new();
    if let Ok(ifaces) = nix::ifaddrs::getifaddrs() {
        for iface in ifaces {
            use nix::net::if_::InterfaceFlags;
            if !iface.flags.contains(InterfaceFlags::IFF_UP)
                || iface.flags.contains(InterfaceFlags::IFF_LOOPBACK)
            {
                continue;
            }
            if let Some(sin) = iface.address.as_ref().and_then(|a| a.as_sockaddr_in()) {
                let ip = IpAddr::V4(sin.ip());
                if !local.contains(&ip) {
                    local.push(ip);
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(name) = nix::unistd::gethostname() {
        if let Ok(resolved) = (name.to_string_lossy().as_ref(), 0).to_socket_addrs() {
            for addr in resolved {
                if local.contains(&addr.ip()) && !out.contains(&addr.ip()) {
                    out.push(addr.ip());
                }
            }
        }
    }
    for ip in local {
        if !out.contains(&ip) {
            out.push(ip);
        }
    }
    out.push(IpAddr::V4(Ipv4Addr::LOCALHOST));
    out
}

fn ident(rank: usize) -> Vec<u8> {
    format!("{IDENT_PREFIX}{rank}").into_bytes()
}

/// Joins the job: rank 0 serves the rendezvous, the others register with it.
pub fn join(job: &SchedulerJob, settings: &Settings) -> Result<Bootstrap, RendezvousError> {
    if job.size == 1 {
        // Nobody to meet: a private secret and a loopback listener.
        let secret = JobSecret::generate().map_err(|e| RendezvousError::Io {
            what: "generating the job secret".into(),
            source: io::Error::other(e.to_string()),
        })?;
        let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
            .map_err(io_err("binding the DSM listener"))?;
        let addr = listener
            .local_addr()
            .map_err(io_err("reading the listener's address"))?;
        return Ok(Bootstrap {
            rank: 0,
            size: 1,
            peers: vec![PeerInfo {
                host: job.host.clone(),
                addr,
            }],
            listener,
            secret,
            job_id: job.job_id.clone(),
        });
    }
    let path = settings.dir.join(format!("{}.rv", job.key));
    if job.rank == 0 {
        serve(job, settings, &path)
    } else {
        register(job, settings, &path)
    }
}

struct Registration {
    rank: usize,
    size: usize,
    host: String,
    port: u16,
    stream: TcpStream,
}

fn parse_register(payload: &[u8]) -> Option<(usize, usize, String, u16)> {
    let text = std::str::from_utf8(payload).ok()?;
    let mut lines = text.lines();
    let rank = lines.next()?.parse().ok()?;
    let size = lines.next()?.parse().ok()?;
    let host = lines.next()?.to_string();
    let port = lines.next()?.parse().ok()?;
    Some((rank, size, host, port))
}

/// Authenticates one connection and reads its registration.
fn handshake(
    mut stream: TcpStream,
    secret: &JobSecret,
    deadline: Instant,
) -> Result<Registration, String> {
    let limit = HANDSHAKE_TIMEOUT.min(deadline.saturating_duration_since(Instant::now()));
    let limit = limit.max(Duration::from_millis(100));
    stream
        .set_nonblocking(false)
        .and_then(|_| stream.set_read_timeout(Some(limit)))
        .and_then(|_| stream.set_write_timeout(Some(limit)))
        .map_err(|e| e.to_string())?;
    auth::accept(&mut stream, secret).map_err(|e| e.to_string())?;
    let payload =
        wire::read_frame_of(&mut stream, KIND_REGISTER, MAX_REGISTER).map_err(|e| e.to_string())?;
    let (rank, size, host, port) =
        parse_register(&payload).ok_or_else(|| "malformed registration".to_string())?;
    Ok(Registration {
        rank,
        size,
        host,
        port,
        stream,
    })
}

fn serve(
    job: &SchedulerJob,
    settings: &Settings,
    path: &Path,
) -> Result<Bootstrap, RendezvousError> {
    let started = Instant::now();
    let deadline = started + settings.timeout;
    let secret = JobSecret::generate().map_err(|e| RendezvousError::Io {
        what: "generating the job secret".into(),
        source: io::Error::other(e.to_string()),
    })?;
    let ips = candidate_addrs(settings);
    // One listener per published address (none on the wildcard address
    // unless asked): the rendezvous port is reachable only where it is published.
    let mut meetings: Vec<TcpListener> = Vec::new();
    let mut published_addrs: Vec<SocketAddr> = Vec::new();
    if settings.bind_any {
        let meeting = TcpListener::bind((Ipv4Addr::UNSPECIFIED, 0))
            .map_err(io_err("binding the rendezvous listener"))?;
        let port = meeting
            .local_addr()
            .map_err(io_err("reading the rendezvous listener's address"))?
            .port();
        published_addrs.extend(ips.iter().map(|ip| SocketAddr::new(*ip, port)));
        meetings.push(meeting);
    } else {
        for ip in &ips {
            let meeting = TcpListener::bind((*ip, 0)).map_err(io_err(format!(
                "binding the rendezvous listener on {ip} (an address that is not local to rank 0's host needs {ENV_BIND}=any)"
            )))?;
            published_addrs.push(
                meeting
                    .local_addr()
                    .map_err(io_err("reading the rendezvous listener's address"))?,
            );
            meetings.push(meeting);
        }
    }
    let published = Published {
        key: job.key.clone(),
        size: job.size,
        host: job.host.clone(),
        secret: secret.clone(),
        addrs: published_addrs,
        expires: unix_now() + settings.timeout.as_secs() + 1,
    };
    let guard = publish(&settings.dir, path, &published.render())?;
    for meeting in &meetings {
        meeting
            .set_nonblocking(true)
            .map_err(io_err("configuring the rendezvous listener"))?;
    }

    let (tx, rx): (Sender<Registration>, Receiver<Registration>) = crossbeam_channel::unbounded();
    let pending = Arc::new(AtomicUsize::new(0));
    let mut ranks: Vec<Option<Registration>> = (0..job.size).map(|_| None).collect();
    let mut registered = 1;
    let failure = loop {
        if registered == job.size {
            break None;
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = (1..job.size)
                .filter(|r| ranks[*r].is_none())
                .map(|r| r.to_string())
                .collect();
            let missing = match missing.len() {
                1 => format!("rank {}", missing[0]),
                _ => format!("ranks {}", missing.join(", ")),
            };
            break Some(RendezvousError::Incomplete {
                missing,
                size: job.size,
                path: path.to_path_buf(),
                dir: settings.dir.clone(),
                waited: started.elapsed(),
            });
        }
        for meeting in &meetings {
            accept_pending(meeting, &tx, &pending, &secret, deadline);
        }
        match rx.recv_timeout(POLL) {
            Ok(reg) => {
                if reg.size != job.size {
                    break Some(RendezvousError::SizeMismatch {
                        rank: reg.rank,
                        host: reg.host.clone(),
                        theirs: reg.size,
                        ours: job.size,
                    });
                }
                if reg.rank == 0 || reg.rank >= job.size {
                    tracing::warn!(
                        "rendezvous: ignoring a registration for rank {} from {}",
                        reg.rank,
                        reg.host
                    );
                    continue;
                }
                if ranks[reg.rank].is_none() {
                    registered += 1;
                } else {
                    tracing::warn!(
                        "rendezvous: rank {} registered again (from {}); keeping the newest",
                        reg.rank,
                        reg.host
                    );
                }
                let rank = reg.rank;
                ranks[rank] = Some(reg);
            }
            Err(RecvTimeoutError::Timeout) | Err(RecvTimeoutError::Disconnected) => {}
        }
    };
    // Every rank has read the file (or never will): the secret leaves the disk.
    drop(guard);
    drop(meetings);

    let bound = match failure {
        Some(err) => Err(err),
        None => bind_dsm_listener(&ranks, settings.bind_any),
    };
    let listener = match bound {
        Ok(listener) => listener,
        Err(err) => {
            let message = err.to_string();
            for reg in ranks.iter_mut().flatten() {
                let _ = wire::write_frame(&mut reg.stream, KIND_ERROR, message.as_bytes());
            }
            return Err(err);
        }
    };
    let dsm_port = listener
        .local_addr()
        .map_err(io_err("reading the DSM listener's address"))?
        .port();

    // Each rank's table, rank 0's entry holding the address that rank reached us on.
    let mut peers: Vec<PeerInfo> = Vec::with_capacity(job.size);
    let own_ip = match listener.local_addr() {
        Ok(a) if !a.ip().is_unspecified() => a.ip(),
        _ => ips
            .first()
            .copied()
            .unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST)),
    };
    peers.push(PeerInfo {
        host: job.host.clone(),
        addr: SocketAddr::new(own_ip, dsm_port),
    });
    for reg in ranks.iter().skip(1).flatten() {
        let ip = reg
            .stream
            .peer_addr()
            .map_err(io_err(format!("address of rank {}", reg.rank)))?
            .ip();
        peers.push(PeerInfo {
            host: reg.host.clone(),
            addr: SocketAddr::new(ip, reg.port),
        });
    }
    for reg in ranks.iter_mut().skip(1).flatten() {
        let mut table = String::new();
        let mine = reg.stream.local_addr().map(|a| a.ip()).unwrap_or(own_ip);
        for (rank, peer) in peers.iter().enumerate() {
            let addr = if rank == 0 {
                SocketAddr::new(mine, dsm_port)
            } else {
                peer.addr
            };
            table.push_str(&format!("{} {addr}\n", peer.host));
        }
        if let Err(e) = wire::write_frame(&mut reg.stream, KIND_TABLE, table.as_bytes()) {
            // The DSM connection to that rank will fail and name it too.
            tracing::warn!(
                "rendezvous: sending the peer table to rank {} on {}: {e}",
                reg.rank,
                reg.host
            );
        }
    }
    Ok(Bootstrap {
        rank: 0,
        size: job.size,
        peers,
        listener,
        secret,
        job_id: job.job_id.clone(),
    })
}

/// Accepts every connection waiting on `meeting` and authenticates each in
/// its own thread (at most `MAX_PENDING` at once; more are closed at once).
fn accept_pending(
    meeting: &TcpListener,
    tx: &Sender<Registration>,
    pending: &Arc<AtomicUsize>,
    secret: &JobSecret,
    deadline: Instant,
) {
    loop {
        match meeting.accept() {
            Ok((stream, from)) => {
                if pending.fetch_add(1, Ordering::SeqCst) >= MAX_PENDING {
                    pending.fetch_sub(1, Ordering::SeqCst);
                    tracing::warn!(
                        "rendezvous: refused a connection from {from}: too many pending handshakes"
                    );
                    continue;
                }
                let (tx, in_flight, secret) = (tx.clone(), Arc::clone(pending), secret.clone());
                let spawned =
                    thread::Builder::new()
                        .name("dsm-rendezvous".into())
                        .spawn(move || {
                            match handshake(stream, &secret, deadline) {
                                Ok(reg) => {
                                    let _ = tx.send(reg);
                                }
                                Err(e) => {
                                    tracing::warn!(
                                        "rendezvous: rejected a connection from {from}: {e}"
                                    )
                                }
                            }
                            in_flight.fetch_sub(1, Ordering::SeqCst);
                        });
                if spawned.is_err() {
                    pending.fetch_sub(1, Ordering::SeqCst);
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                tracing::warn!("rendezvous: accept: {e}");
                return;
            }
        }
    }
}

/// Rank 0's DSM listener: on the one address every other rank reached it
/// on; on every interface only when they used different ones (a
/// multi-homed host) or `bind_any` asks for it.
fn bind_dsm_listener(
    ranks: &[Option<Registration>],
    bind_any: bool,
) -> Result<TcpListener, RendezvousError> {
    let mut reached: Vec<IpAddr> = Vec::new();
    for reg in ranks.iter().flatten() {
        if let Ok(local) = reg.stream.local_addr() {
            if !reached.contains(&local.ip()) {
                reached.push(local.ip());
            }
        }
    }
    let ip = match reached.as_slice() {
        [one] if !bind_any => *one,
        _ => {
            if reached.len() > 1 {
                tracing::info!(
                    "rendezvous: ranks reached rank 0 on several addresses ({reached:?}): its DSM listener binds every interface"
                );
            }
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        }
    };
    TcpListener::bind((ip, 0)).map_err(io_err(format!("binding the DSM listener on {ip}")))
}

fn register(
    job: &SchedulerJob,
    settings: &Settings,
    path: &Path,
) -> Result<Bootstrap, RendezvousError> {
    let started = Instant::now();
    let deadline = started + settings.timeout;
    let mut last_error = String::from("rank 0 never answered");
    let mut seen: Option<Published> = None;
    let (published, mut stream) = 'found: loop {
        if let Some(p) = read_published(&settings.dir, path)? {
            if p.key != job.key || p.size != job.size {
                return Err(RendezvousError::File {
                    path: path.to_path_buf(),
                    why: format!(
                        "published for job {} of size {}; this is job {} of size {}",
                        p.key, p.size, job.key, job.size
                    ),
                });
            }
            for addr in &p.addrs {
                let left = deadline.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    break;
                }
                match try_connect(*addr, &p.secret, job.rank, CONNECT_TRY.min(left)) {
                    Ok(stream) => break 'found (p, stream),
                    Err(e) => last_error = format!("{addr}: {e}"),
                }
            }
            seen = Some(p);
        }
        if Instant::now() >= deadline {
            return Err(match seen {
                None => RendezvousError::NoFile {
                    rank: job.rank,
                    path: path.to_path_buf(),
                    dir: settings.dir.clone(),
                    waited: started.elapsed(),
                },
                Some(p) => RendezvousError::Unreachable {
                    rank: job.rank,
                    host: p.host.clone(),
                    addrs: p
                        .addrs
                        .iter()
                        .map(|a| a.to_string())
                        .collect::<Vec<_>>()
                        .join(", "),
                    path: path.to_path_buf(),
                    waited: started.elapsed(),
                    last: last_error,
                },
            });
        }
        // Rank 0 may not have started yet, or the file is a stale one
        // from an earlier run of the same step: look again.
        thread::sleep(POLL.min(deadline.saturating_duration_since(Instant::now())));
    };
    let rank0 = |why: String| RendezvousError::FromRankZero {
        rank: job.rank,
        host: published.host.clone(),
        why,
    };
    // Our DSM listener faces rank 0: the kernel chose this address to reach it.
    let local = stream
        .local_addr()
        .map_err(io_err("reading the rendezvous connection's address"))?;
    let listener = TcpListener::bind((local.ip(), 0)).map_err(io_err(format!(
        "binding the DSM listener on {}",
        local.ip()
    )))?;
    let port = listener
        .local_addr()
        .map_err(io_err("reading the DSM listener's address"))?
        .port();
    let registration = format!("{}\n{}\n{}\n{port}\n", job.rank, job.size, job.host);
    wire::write_frame(&mut stream, KIND_REGISTER, registration.as_bytes())
        .map_err(|e| rank0(format!("sending the registration: {e}")))?;
    // Rank 0 answers once every rank has registered, or at its own deadline.
    stream
        .set_read_timeout(Some(settings.timeout + Duration::from_secs(5)))
        .map_err(io_err("configuring the rendezvous connection"))?;
    let max = u32::try_from(64 + job.size * 600).unwrap_or(u32::MAX);
    let (kind, payload) = wire::read_frame(&mut stream, max).map_err(|e| {
        rank0(if e.is_timeout() {
            format!(
                "no peer table within {} s of registering",
                settings.timeout.as_secs() + 5
            )
        } else {
            format!("waiting for the peer table: {e}")
        })
    })?;
    let text = String::from_utf8_lossy(&payload);
    if kind == KIND_ERROR {
        return Err(rank0(text.into_owned()));
    }
    if kind != KIND_TABLE {
        return Err(rank0(format!("unexpected frame kind {kind:#x}")));
    }
    let peers = parse_table(&text, job.size).ok_or_else(|| rank0("malformed peer table".into()))?;
    Ok(Bootstrap {
        rank: job.rank,
        size: job.size,
        peers,
        listener,
        secret: published.secret,
        job_id: job.job_id.clone(),
    })
}

fn try_connect(
    addr: SocketAddr,
    secret: &JobSecret,
    rank: usize,
    limit: Duration,
) -> Result<TcpStream, String> {
    let mut stream = TcpStream::connect_timeout(&addr, limit).map_err(|e| e.to_string())?;
    stream
        .set_read_timeout(Some(HANDSHAKE_TIMEOUT))
        .and_then(|_| stream.set_write_timeout(Some(HANDSHAKE_TIMEOUT)))
        .map_err(|e| e.to_string())?;
    auth::connect(&mut stream, secret, &ident(rank)).map_err(|e| e.to_string())?;
    Ok(stream)
}

fn parse_table(text: &str, size: usize) -> Option<Vec<PeerInfo>> {
    let peers: Vec<PeerInfo> = text
        .lines()
        .map(|line| {
            let (host, addr) = line.rsplit_once(' ')?;
            Some(PeerInfo {
                host: host.to_string(),
                addr: addr.parse().ok()?,
            })
        })
        .collect::<Option<_>>()?;
    (peers.len() == size).then_some(peers)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Scheduler;

    fn temp_dir(label: &str) -> PathBuf {
        use std::sync::atomic::AtomicU32;
        static N: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "dsm-rv-{label}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = fs::remove_dir_all(&dir);
        dir
    }

    fn settings(dir: &Path, secs: f64) -> Settings {
        Settings {
            dir: dir.to_path_buf(),
            timeout: Duration::from_secs_f64(secs),
            addrs: vec![IpAddr::V4(Ipv4Addr::LOCALHOST)],
            bind_any: false,
        }
    }

    fn job(rank: usize, size: usize, key: &str) -> SchedulerJob {
        SchedulerJob {
            scheduler: Scheduler::Slurm,
            rank,
            size,
            key: key.to_string(),
            job_id: "test".to_string(),
            host: format!("host{rank}"),
        }
    }

    #[test]
    fn file_format_round_trips() {
        let p = Published {
            key: "slurm--1.0".into(),
            size: 4,
            host: "node-1".into(),
            secret: JobSecret::from_bytes([7; 32]),
            addrs: vec![
                "10.0.0.1:5000".parse().unwrap(),
                "127.0.0.1:5000".parse().unwrap(),
            ],
            expires: 1_800_000_000,
        };
        assert_eq!(Published::parse(&p.render()).unwrap(), p);
        assert!(Published::parse("garbage").is_err());
        assert!(Published::parse(&p.render()[..40]).is_err());
    }

    #[test]
    fn whole_job_meets_and_file_is_private_then_gone() {
        let dir = temp_dir("meet");
        let size = 4;
        let mut handles = Vec::new();
        // Others first: they must wait for rank 0's file.
        for rank in (0..size).rev() {
            let s = settings(&dir, 20.0);
            handles.push(thread::spawn(move || join(&job(rank, size, "k1"), &s)));
            thread::sleep(Duration::from_millis(30));
        }
        let boots: Vec<Bootstrap> = handles
            .into_iter()
            .map(|h| h.join().unwrap().unwrap())
            .collect();
        let mode = fs::metadata(&dir).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o700);
        assert!(!dir.join("k1.rv").exists(), "the file must be removed");
        for b in &boots {
            assert_eq!(b.size, size);
            assert_eq!(b.secret, boots[0].secret);
            for (r, p) in b.peers.iter().enumerate() {
                assert_eq!(p.host, format!("host{r}"));
                let own = boots.iter().find(|o| o.rank == r).unwrap();
                assert_eq!(p.addr.port(), own.listener.local_addr().unwrap().port());
            }
        }
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rank_zero_names_missing_ranks_and_tells_the_others() {
        let dir = temp_dir("missing");
        // Rank 1 must register within rank 0's window even on a loaded
        // machine; it waits far longer than rank 0, which tells it the end.
        let s = settings(&dir, 5.0);
        let one = {
            let s = settings(&dir, 30.0);
            thread::spawn(move || join(&job(1, 3, "k2"), &s))
        };
        let err = join(&job(0, 3, "k2"), &s).unwrap_err();
        assert!(
            err.to_string().contains("rank 2 of 3 did not register"),
            "{err}"
        );
        let err1 = one.join().unwrap().unwrap_err();
        assert!(
            err1.to_string()
                .contains("rank 0 on host host0 ended the rendezvous")
                && err1.to_string().contains("rank 2 of 3"),
            "{err1}"
        );
        assert!(!dir.join("k2.rv").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn others_name_the_missing_file() {
        let dir = temp_dir("nofile");
        let started = Instant::now();
        let err = join(&job(2, 3, "k3"), &settings(&dir, 0.5)).unwrap_err();
        assert!(started.elapsed() < Duration::from_secs(3));
        let text = err.to_string();
        assert!(
            text.contains("k3.rv") && text.contains("did not appear"),
            "{text}"
        );
    }

    #[test]
    fn refuses_a_directory_others_can_enter() {
        let dir = temp_dir("open");
        fs::create_dir_all(&dir).unwrap();
        fs::set_permissions(&dir, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
        let err = join(&job(0, 2, "k4"), &settings(&dir, 0.5)).unwrap_err();
        assert!(err.to_string().contains("chmod 700"), "{err}");
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn sizes_that_disagree_are_named() {
        let dir = temp_dir("size");
        // As above: rank 1 has time to find rank 0's file under load.
        let s = settings(&dir, 5.0);
        let one = {
            let s = settings(&dir, 30.0);
            thread::spawn(move || join(&job(1, 2, "k5"), &s))
        };
        let err = join(&job(0, 3, "k5"), &s).unwrap_err();
        let err1 = one.join().unwrap().unwrap_err();
        assert!(err1.to_string().contains("of size 3"), "{err1}");
        assert!(err.to_string().contains("ranks 1, 2 of 3"), "{err}");
        let _ = fs::remove_dir_all(&dir);
    }

    #[test]
    fn publishing_sweeps_what_killed_rank_zeros_left() {
        let dir = temp_dir("sweep");
        DirBuilder::new().mode(0o700).create(&dir).unwrap();
        let old = |key: &str, expires| Published {
            key: key.into(),
            size: 2,
            host: "h".into(),
            secret: JobSecret::from_bytes([1; 32]),
            addrs: vec!["127.0.0.1:1".parse().unwrap()],
            expires,
        };
        let now = unix_now();
        fs::write(dir.join("dead.rv"), old("dead", now - 60).render()).unwrap();
        fs::write(dir.join("live.rv"), old("live", now + 60).render()).unwrap();
        fs::write(dir.join("notes.txt"), "not ours").unwrap();
        let guard = publish(&dir, &dir.join("new.rv"), "x").unwrap();
        assert!(!dir.join("dead.rv").exists());
        assert!(dir.join("live.rv").exists() && dir.join("notes.txt").exists());
        let mode = fs::metadata(dir.join("new.rv")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o600);
        drop(guard);
        assert!(!dir.join("new.rv").exists());
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_single_rank_needs_no_rendezvous() {
        let dir = temp_dir("single");
        let b = join(&job(0, 1, "k6"), &settings(&dir, 0.5)).unwrap();
        assert_eq!(b.peers.len(), 1);
        assert!(!dir.exists());
    }
}
