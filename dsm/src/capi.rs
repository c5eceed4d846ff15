//! The C API of `include/dsm.h`. One shared space per process, kept in a
//! global between `dsm_init` and `dsm_finalize`.

use std::collections::HashMap;
use std::ffi::{c_char, c_int, c_void};
use std::sync::{Mutex, RwLock};

use crate::{Dsm, Placement};

static DSM: RwLock<Option<Dsm>> = RwLock::new(None);
/// Tickets of the locks this process holds, by lock id (C releases by id).
static HELD: Mutex<Option<HashMap<u64, u64>>> = Mutex::new(None);

fn fail(what: &str, err: impl std::fmt::Display) -> ! {
    eprintln!("{what}: {err}");
    std::process::exit(1)
}

fn with_dsm<T>(what: &str, f: impl FnOnce(&Dsm) -> T) -> T {
    let guard = DSM.read().unwrap_or_else(|p| p.into_inner());
    match guard.as_ref() {
        Some(dsm) => f(dsm),
        None => fail(what, "dsm_init has not been called"),
    }
}

/// Joins the job; returns the base of the shared space. Exits the process
/// with a message naming the problem when that is impossible.
#[no_mangle]
pub extern "C" fn dsm_init(_argc: c_int, _argv: *mut *mut c_char) -> *mut c_void {
    let mut guard = DSM.write().unwrap_or_else(|p| p.into_inner());
    if let Some(dsm) = guard.as_ref() {
        return dsm.base() as *mut c_void;
    }
    match crate::init_from_env() {
        Ok(dsm) => {
            let base = dsm.base() as *mut c_void;
            *guard = Some(dsm);
            base
        }
        Err(e) => fail("dsm_init", e),
    }
}

#[no_mangle]
pub extern "C" fn dsm_finalize() {
    let dsm = DSM.write().unwrap_or_else(|p| p.into_inner()).take();
    match dsm {
        Some(dsm) => {
            if let Err(e) = dsm.finalize() {
                fail("dsm_finalize", e)
            }
        }
        None => fail("dsm_finalize", "dsm_init has not been called"),
    }
}

#[no_mangle]
pub extern "C" fn dsm_rank() -> c_int {
    with_dsm("dsm_rank", |d| d.rank() as c_int)
}

#[no_mangle]
pub extern "C" fn dsm_size() -> c_int {
    with_dsm("dsm_size", |d| d.size() as c_int)
}

#[no_mangle]
pub extern "C" fn dsm_barrier() {
    with_dsm("dsm_barrier", |d| {
        if let Err(e) = d.barrier() {
            fail("dsm_barrier", e)
        }
    })
}

fn allocate(what: &str, size: usize, placement: Placement) -> *mut c_void {
    with_dsm(what, |d| match d.alloc(size, placement) {
        Ok(segment) => segment.addr() as *mut c_void,
        Err(e) => fail(what, e),
    })
}

/// Allocates `size` bytes of shared memory, pages spread over the ranks
/// (distributed placement). Any rank may call it alone; the address is
/// valid on every rank.
#[no_mangle]
pub extern "C" fn dsm_malloc(size: usize) -> *mut c_void {
    allocate("dsm_malloc", size, Placement::Distributed)
}

/// Allocates `size` bytes of shared memory whose pages live at `rank`
/// (localized placement, ALMOS-MKH's remote_malloc).
#[no_mangle]
pub extern "C" fn dsm_remote_malloc(size: usize, rank: c_int) -> *mut c_void {
    let Ok(rank) = usize::try_from(rank) else {
        fail("dsm_remote_malloc", format!("rank {rank} is negative"))
    };
    allocate("dsm_remote_malloc", size, Placement::Localized(rank))
}

/// Takes distributed lock `id` (FIFO; blocks without spinning).
#[no_mangle]
pub extern "C" fn dsm_lock(id: c_int) {
    let id = id as u64;
    let ticket = with_dsm("dsm_lock", |d| match d.lock(id) {
        Ok(guard) => guard.into_ticket(),
        Err(e) => fail("dsm_lock", e),
    });
    HELD.lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .insert(id, ticket);
}

/// Releases distributed lock `id`, held by this process.
#[no_mangle]
pub extern "C" fn dsm_unlock(id: c_int) {
    let id = id as u64;
    let ticket = HELD
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .get_or_insert_with(HashMap::new)
        .remove(&id);
    let Some(ticket) = ticket else {
        fail(
            "dsm_unlock",
            format!("lock {id} is not held by this process"),
        )
    };
    with_dsm("dsm_unlock", |d| {
        if let Err(e) = d.unlock_ticket(id, ticket) {
            fail("dsm_unlock", e)
        }
    })
}
