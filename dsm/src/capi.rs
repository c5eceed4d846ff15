//! The C API of `include/dsm.h`. One shared space per process, kept in a
//! global between `dsm_init` and `dsm_finalize`.
//!
//! Errors: by default (`DSM_ERRORS_ARE_FATAL`, the seed's behaviour) a
//! failing call prints a message naming the problem and ends the process;
//! after `dsm_set_error_mode(DSM_ERRORS_RETURN)` it returns an error code
//! (or NULL), and `dsm_last_error` gives the calling thread's message.

use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, RwLock};

use dsm_core::TransportError;

use crate::{Consistency, Dsm, DsmError, Placement, Segment, StatsSnapshot};

static DSM: RwLock<Option<Dsm>> = RwLock::new(None);
/// Tickets of the locks this process holds, by lock id (C releases by id).
static HELD: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);
/// Segments this process allocated, by address (for `dsm_seal`).
static SEGMENTS: Mutex<Option<HashMap<usize, Segment>>> = Mutex::new(None);
/// `DSM_ERRORS_RETURN` chosen.
static ERRORS_RETURN: AtomicBool = AtomicBool::new(false);

thread_local! {
    /// The calling thread's last error message, for `dsm_last_error`.
    static LAST_ERROR: RefCell<CString> = RefCell::new(CString::default());
}

// The codes of dsm.h.
const DSM_SUCCESS: c_int = 0;
const DSM_ERR_NOT_INITIALIZED: c_int = 1;
const DSM_ERR_INVALID_ARG: c_int = 2;
const DSM_ERR_NO_MEMORY: c_int = 3;
const DSM_ERR_PEER_LOST: c_int = 4;
const DSM_ERR_STOPPED: c_int = 5;
const DSM_ERR_INTERNAL: c_int = 6;

const DSM_ERRORS_ARE_FATAL: c_int = 0;
const DSM_ERRORS_RETURN: c_int = 1;

const DSM_DISTRIBUTED: c_int = 0;
const DSM_LOCALIZED: c_int = 1;
const DSM_REPLICATED: c_int = 2;
const DSM_PRIVATE: c_int = 3;
/// Flags or-ed into a placement: the segment's consistency, whatever the
/// job's protocol.
const DSM_SEQUENTIAL: c_int = 0x100;
const DSM_RELEASE: c_int = 0x200;

/// A failed call: its code and message.
struct Failure {
    code: c_int,
    message: String,
}

impl Failure {
    fn new(code: c_int, message: impl Into<String>) -> Failure {
        Failure {
            code,
            message: message.into(),
        }
    }

    fn not_initialized() -> Failure {
        Failure::new(DSM_ERR_NOT_INITIALIZED, "dsm_init has not been called")
    }

    fn invalid(message: impl Into<String>) -> Failure {
        Failure::new(DSM_ERR_INVALID_ARG, message)
    }
}

impl From<DsmError> for Failure {
    fn from(e: DsmError) -> Failure {
        let code = match &e {
            DsmError::NoRoom { .. } | DsmError::OutOfMemory { .. } | DsmError::TooLarge { .. } => {
                DSM_ERR_NO_MEMORY
            }
            DsmError::Transport(TransportError::PeerLost { .. }) => DSM_ERR_PEER_LOST,
            DsmError::Stopped => DSM_ERR_STOPPED,
            DsmError::Segment(_) | DsmError::Config(_) => DSM_ERR_INVALID_ARG,
            _ => DSM_ERR_INTERNAL,
        };
        Failure::new(code, e.to_string())
    }
}

/// Reports a failure of `what` the way the error mode says: ends the
/// process (fatal mode), or records the message and returns the code.
fn failed(what: &str, failure: Failure) -> c_int {
    let message = format!("{what}: {}", failure.message);
    if !ERRORS_RETURN.load(Ordering::SeqCst) {
        // The message says why: no "exiting without finalize" after it.
        dsm_core::hang::process_ending();
        eprintln!("{message}");
        std::process::exit(1)
    }
    let text = CString::new(message.replace('\0', " ")).unwrap_or_default();
    LAST_ERROR.with(|last| *last.borrow_mut() = text);
    failure.code
}

/// A call returning a status code.
fn status(what: &str, result: Result<(), Failure>) -> c_int {
    match result {
        Ok(()) => DSM_SUCCESS,
        Err(failure) => failed(what, failure),
    }
}

/// A call returning an address (NULL on failure).
fn address(what: &str, result: Result<*mut c_void, Failure>) -> *mut c_void {
    result.unwrap_or_else(|failure| {
        failed(what, failure);
        std::ptr::null_mut()
    })
}

fn with_dsm<T>(f: impl FnOnce(&Dsm) -> Result<T, Failure>) -> Result<T, Failure> {
    let guard = DSM.read().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(dsm) => f(dsm),
        None => Err(Failure::not_initialized()),
    }
}

/// Chooses what a failing call does (`DSM_ERRORS_ARE_FATAL` or
/// `DSM_ERRORS_RETURN`); returns the previous mode, or -1 for an unknown
/// mode (left unchanged).
#[no_mangle]
pub extern "C" fn dsm_set_error_mode(mode: c_int) -> c_int {
    let previous = if ERRORS_RETURN.load(Ordering::SeqCst) {
        DSM_ERRORS_RETURN
    } else {
        DSM_ERRORS_ARE_FATAL
    };
    match mode {
        DSM_ERRORS_ARE_FATAL => ERRORS_RETURN.store(false, Ordering::SeqCst),
        DSM_ERRORS_RETURN => ERRORS_RETURN.store(true, Ordering::SeqCst),
        _ => return -1,
    }
    previous
}

/// A description of an error code, as a static string.
#[no_mangle]
pub extern "C" fn dsm_strerror(code: c_int) -> *const c_char {
    let text: &'static CStr = match code {
        DSM_SUCCESS => c"success",
        DSM_ERR_NOT_INITIALIZED => c"dsm_init has not been called (or dsm_finalize was)",
        DSM_ERR_INVALID_ARG => c"invalid argument",
        DSM_ERR_NO_MEMORY => c"not enough memory (shared heap, node memory or cache)",
        DSM_ERR_PEER_LOST => c"a rank of the job was lost",
        DSM_ERR_STOPPED => c"the DSM engine has stopped",
        DSM_ERR_INTERNAL => c"internal error",
        _ => c"unknown error code",
    };
    text.as_ptr()
}

/// The calling thread's last error message ("" if none), valid until its
/// next failing call.
#[no_mangle]
pub extern "C" fn dsm_last_error() -> *const c_char {
    LAST_ERROR.with(|last| last.borrow().as_ptr())
}

/// Joins the job; returns the base of the shared space.
#[no_mangle]
pub extern "C" fn dsm_init(_argc: c_int, _argv: *mut *mut c_char) -> *mut c_void {
    let mut guard = DSM.write().unwrap_or_else(|p| p.into_inner());
    if let Some(dsm) = guard.as_ref() {
        return dsm.base() as *mut c_void;
    }
    let joined = crate::init_from_env().map_err(Failure::from).map(|dsm| {
        let base = dsm.base() as *mut c_void;
        *guard = Some(dsm);
        base
    });
    drop(guard);
    address("dsm_init", joined)
}

#[no_mangle]
pub extern "C" fn dsm_finalize() -> c_int {
    let dsm = DSM.write().unwrap_or_else(|p| p.into_inner()).take();
    let result = match dsm {
        Some(dsm) => dsm.finalize().map(drop).map_err(Failure::from),
        None => Err(Failure::not_initialized()),
    };
    status("dsm_finalize", result)
}

#[no_mangle]
pub extern "C" fn dsm_rank() -> c_int {
    match with_dsm(|d| Ok(d.rank() as c_int)) {
        Ok(rank) => rank,
        Err(failure) => {
            failed("dsm_rank", failure);
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn dsm_size() -> c_int {
    match with_dsm(|d| Ok(d.size() as c_int)) {
        Ok(size) => size,
        Err(failure) => {
            failed("dsm_size", failure);
            -1
        }
    }
}

#[no_mangle]
pub extern "C" fn dsm_barrier() -> c_int {
    status("dsm_barrier", with_dsm(|d| Ok(d.barrier()?)))
}

/// Allocates with `placement`; remembers the segment for `dsm_seal`.
fn allocate(size: usize, placement: Placement) -> Result<*mut c_void, Failure> {
    with_dsm(|d| Ok(remember(d.alloc(size, placement)?)))
}

/// [`allocate`] with dsm.h's `placement` argument, which may carry a
/// consistency flag.
fn allocate_with(size: usize, placement: c_int, rank: c_int) -> Result<*mut c_void, Failure> {
    let (placement, consistency) = placement_arg(placement, rank)?;
    with_dsm(|d| {
        let consistency = consistency.unwrap_or_else(|| d.consistency());
        Ok(remember(d.alloc_with(size, placement, consistency)?))
    })
}

/// Keeps a segment this rank allocated, by address (for `dsm_seal` and
/// `dsm_sync`); returns its address.
fn remember(segment: Segment) -> *mut c_void {
    SEGMENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(segment.addr() as usize, segment);
    segment.addr() as *mut c_void
}

/// Drops the segment at `addr` from those remembered (freed).
fn forget(addr: *mut c_void) {
    if let Some(segments) = SEGMENTS.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        segments.remove(&(addr as usize));
    }
}

/// The segment this rank allocated at `addr`.
fn remembered(addr: *mut c_void) -> Result<Segment, Failure> {
    SEGMENTS
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .get(&(addr as usize))
        .copied()
        .ok_or_else(|| {
            Failure::invalid(format!(
                "{addr:?} is not the address of a segment this rank allocated"
            ))
        })
}

fn rank_arg(rank: c_int) -> Result<usize, Failure> {
    usize::try_from(rank).map_err(|_| Failure::invalid(format!("rank {rank} is negative")))
}

/// Allocates `size` bytes of shared memory, pages spread over the ranks
/// (distributed placement). Any rank may call it alone; the address is
/// valid on every rank.
#[no_mangle]
pub extern "C" fn dsm_malloc(size: usize) -> *mut c_void {
    address("dsm_malloc", allocate(size, Placement::Distributed))
}

/// Allocates `size` bytes of shared memory whose pages live at `rank`
/// (localized placement, ALMOS-MKH's remote_malloc).
#[no_mangle]
pub extern "C" fn dsm_remote_malloc(size: usize, rank: c_int) -> *mut c_void {
    let result = rank_arg(rank).and_then(|rank| allocate(size, Placement::Localized(rank)));
    address("dsm_remote_malloc", result)
}

/// Allocates `size` bytes with a placement (`DSM_DISTRIBUTED`,
/// `DSM_LOCALIZED` at `rank`, `DSM_REPLICATED`, `DSM_PRIVATE`), or-ed with
/// `DSM_SEQUENTIAL` or `DSM_RELEASE` to choose its consistency.
#[no_mangle]
pub extern "C" fn dsm_alloc(size: usize, placement: c_int, rank: c_int) -> *mut c_void {
    address("dsm_alloc", allocate_with(size, placement, rank))
}

/// The placement of dsm.h's `placement` and `rank` arguments, and the
/// consistency its flag chose (`None`: the job's).
fn placement_arg(
    placement: c_int,
    rank: c_int,
) -> Result<(Placement, Option<Consistency>), Failure> {
    let consistency = match placement & (DSM_SEQUENTIAL | DSM_RELEASE) {
        0 => None,
        DSM_SEQUENTIAL => Some(Consistency::Sequential),
        DSM_RELEASE => Some(Consistency::Release),
        _ => {
            return Err(Failure::invalid(
                "a placement with both DSM_SEQUENTIAL and DSM_RELEASE: choose one",
            ))
        }
    };
    let placement = match placement & !(DSM_SEQUENTIAL | DSM_RELEASE) {
        DSM_DISTRIBUTED => Placement::Distributed,
        DSM_LOCALIZED => Placement::Localized(rank_arg(rank)?),
        DSM_REPLICATED => Placement::Replicated,
        DSM_PRIVATE => Placement::Private,
        other => {
            return Err(Failure::invalid(format!(
                "unknown placement {other} (DSM_DISTRIBUTED, DSM_LOCALIZED, DSM_REPLICATED or DSM_PRIVATE, optionally | DSM_SEQUENTIAL or | DSM_RELEASE)"
            )))
        }
    };
    Ok((placement, consistency))
}

/// Allocates one segment collectively: every rank calls it with the same
/// arguments and gets the same address.
#[no_mangle]
pub extern "C" fn dsm_coalloc(size: usize, placement: c_int, rank: c_int) -> *mut c_void {
    let result = placement_arg(placement, rank).and_then(|(placement, consistency)| {
        with_dsm(|d| {
            let consistency = consistency.unwrap_or_else(|| d.consistency());
            Ok(remember(d.coalloc_with(size, placement, consistency)?))
        })
    });
    address("dsm_coalloc", result)
}

/// A C string argument as a path.
fn path_arg(path: *const c_char) -> Result<std::path::PathBuf, Failure> {
    if path.is_null() {
        return Err(Failure::invalid("the path is NULL"));
    }
    // SAFETY: dsm.h asks for a NUL-terminated string, checked non-null; it
    // is only read here, before the call returns.
    let text = unsafe { CStr::from_ptr(path) };
    let text = text
        .to_str()
        .map_err(|_| Failure::invalid("the path is not UTF-8"))?;
    Ok(std::path::PathBuf::from(text))
}

/// A segment of this rank's own whose initial contents are the file at
/// `path` (at least `size` bytes), homed at this rank.
#[no_mangle]
pub extern "C" fn dsm_alloc_file(path: *const c_char, size: usize) -> *mut c_void {
    let result = path_arg(path).and_then(|path| allocate(size, Placement::File(path)));
    address("dsm_alloc_file", result)
}

/// Writes a file segment this rank allocated (at `addr`) back to `path`.
#[no_mangle]
pub extern "C" fn dsm_sync(addr: *mut c_void, path: *const c_char) -> c_int {
    let result = path_arg(path).and_then(|path| {
        let segment = remembered(addr)?;
        with_dsm(|d| Ok(d.sync(&segment, &path)?))
    });
    status("dsm_sync", result)
}

/// Frees the segment at `addr`, collectively (every rank calls it).
#[no_mangle]
pub extern "C" fn dsm_free(addr: *mut c_void) -> c_int {
    let result = with_dsm(|d| {
        let segment = match remembered(addr) {
            Ok(segment) => segment,
            Err(_) => d.segment_at(addr as *const u8)?,
        };
        d.free(segment)?;
        forget(addr);
        Ok(())
    });
    status("dsm_free", result)
}

/// Seals a replicated segment this rank allocated (at `addr`).
#[no_mangle]
pub extern "C" fn dsm_seal(addr: *mut c_void) -> c_int {
    let result = remembered(addr).and_then(|segment| with_dsm(|d| Ok(d.seal(&segment)?)));
    status("dsm_seal", result)
}

/// Takes distributed lock `id` (FIFO; blocks without spinning).
#[no_mangle]
pub extern "C" fn dsm_lock(id: c_int) -> c_int {
    let id = id as u64;
    let taken = with_dsm(|d| Ok(d.lock(id)?.into_ticket())).map(|ticket| {
        HELD.lock()
            .unwrap_or_else(|p| p.into_inner())
            .get_or_insert_with(HashMap::new)
            .insert(id, ticket);
    });
    status("dsm_lock", taken)
}

/// Releases distributed lock `id`, held by this process.
#[no_mangle]
pub extern "C" fn dsm_unlock(id: c_int) -> c_int {
    let id = id as u64;
    let ticket = HELD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .remove(&id);
    let result = match ticket {
        Some(ticket) => with_dsm(|d| Ok(d.unlock_ticket(id, ticket)?)),
        None => Err(Failure::invalid(format!(
            "lock {id} is not held by this process"
        ))),
    };
    status("dsm_unlock", result)
}

/// `dsm_stats_t` of dsm.h: this rank's counters.
#[repr(C)]
pub struct DsmStats {
    pub rank: u64,
    pub read_faults: u64,
    pub write_faults: u64,
    pub pages_sent: u64,
    pub pages_received: u64,
    pub bytes_sent: u64,
    pub bytes_received: u64,
    pub pages_prefetched: u64,
    pub evictions_clean: u64,
    pub evictions_written_back: u64,
    pub peak_cached_bytes: u64,
    pub fault_latency_samples: u64,
    pub fault_latency_p50_ns: u64,
    pub fault_latency_p99_ns: u64,
    pub fault_latency_max_ns: u64,
}

impl From<&StatsSnapshot> for DsmStats {
    fn from(s: &StatsSnapshot) -> DsmStats {
        let ns = |d: std::time::Duration| d.as_nanos().min(u64::MAX as u128) as u64;
        DsmStats {
            rank: s.rank as u64,
            read_faults: s.read_faults,
            write_faults: s.write_faults,
            pages_sent: s.pages_sent,
            pages_received: s.pages_received,
            bytes_sent: s.bytes_sent,
            bytes_received: s.bytes_received,
            pages_prefetched: s.pages_prefetched,
            evictions_clean: s.evictions_clean,
            evictions_written_back: s.evictions_written_back,
            peak_cached_bytes: s.peak_cached_bytes,
            fault_latency_samples: s.fault_latency_samples,
            fault_latency_p50_ns: ns(s.fault_latency_p50),
            fault_latency_p99_ns: ns(s.fault_latency_p99),
            fault_latency_max_ns: ns(s.fault_latency_max),
        }
    }
}

/// Fills `*out` with this rank's statistics.
#[no_mangle]
pub extern "C" fn dsm_stats(out: *mut DsmStats) -> c_int {
    let result = with_dsm(|d| {
        let snapshot = d.stats();
        let out = std::ptr::NonNull::new(out).ok_or_else(|| Failure::invalid("out is NULL"))?;
        // SAFETY: dsm.h asks for a pointer to a writable dsm_stats_t, whose
        // layout DsmStats repeats (repr(C)); it was checked non-null.
        unsafe { out.as_ptr().write(DsmStats::from(&snapshot)) };
        Ok(())
    });
    status("dsm_stats", result)
}
