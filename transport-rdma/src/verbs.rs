//! Small safe wrappers over the `rdma-sys` verbs: device list, context,
//! protection domain, memory region, completion queue (with its completion
//! channel) and RC queue pair.
//!
//! Ownership mirrors the verbs object tree: a queue pair holds its protection
//! domain and completion queues, a memory region its protection domain, and
//! those hold the device context, all through `Arc`, so a parent is destroyed
//! only after its last child. A queue pair keeps an `Arc` of every memory
//! region named by an outstanding work request until the request's completion
//! is reported (or the queue pair is destroyed), so registered memory can never
//! be deregistered or freed while the device may still access it.

use std::alloc::{self, Layout};
use std::collections::HashMap;
use std::ffi::CStr;
use std::io;
use std::os::raw::c_int;
use std::ptr::{self, NonNull};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use rdma_sys as sys;

/// `IBV_LINK_LAYER_*` (an anonymous enum in `verbs.h`, not in the bindings).
const LINK_LAYER_ETHERNET: u8 = 2;
/// Page alignment for buffers this crate allocates and registers.
const BUFFER_ALIGN: usize = 4096;

/// What a verbs wrapper failed at.
#[derive(Debug, thiserror::Error)]
pub enum VerbsError {
    /// No usable RDMA device (no kernel support, no device, none active).
    #[error("no RDMA device: {0}")]
    NoDevice(String),
    /// No device of this name exists.
    #[error("RDMA device {0:?} not found")]
    DeviceNotFound(String),
    /// A verbs (or libc) call failed.
    #[error("{call} failed: {source}")]
    Call {
        /// The call, e.g. `ibv_reg_mr`.
        call: &'static str,
        /// Its errno.
        #[source]
        source: io::Error,
    },
    /// A bad argument (a range outside its region, a `wr_id` already in
    /// flight) or a buffer that could not be allocated.
    #[error("{0}")]
    Invalid(String),
    /// A work request completed with an error status.
    #[error("work request failed: {status} ({text}), vendor error {vendor_err:#x}")]
    Completion {
        /// `ibv_wc_status` value.
        status: u32,
        /// `ibv_wc_status_str` of the status.
        text: String,
        /// The provider's own error code.
        vendor_err: u32,
    },
}

fn last_err(call: &'static str) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::last_os_error(),
    }
}

/// For verbs that return an errno value instead of setting `errno`.
fn rc_err(call: &'static str, rc: c_int) -> VerbsError {
    VerbsError::Call {
        call,
        source: io::Error::from_raw_os_error(rc.abs()),
    }
}

/// One port of one device, as `ibv_devinfo` would summarise it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSummary {
    /// Device name, e.g. `rxe0`, `mlx5_0`.
    pub device: String,
    /// Port number (from 1).
    pub port: u8,
    /// Whether the port state is `IBV_PORT_ACTIVE`.
    pub active: bool,
    /// Whether the link layer is Ethernet (RoCE) rather than InfiniBand.
    pub link_layer_ethernet: bool,
}

/// The names of the RDMA devices of this machine.
///
/// `ibv_get_device_list` returns NULL (errno ENOSYS) when the kernel has no
/// RDMA support: that, and an empty list, are [`VerbsError::NoDevice`].
pub fn device_names() -> Result<Vec<String>, VerbsError> {
    let list = DeviceList::get()?;
    Ok(list.iter().map(device_name).collect())
}

/// Every port of every device, with its state. Errors only when there is no
/// device at all; a device that cannot be opened is skipped.
pub fn ports() -> Result<Vec<PortSummary>, VerbsError> {
    let list = DeviceList::get()?;
    let mut out = Vec::new();
    for dev in list.iter() {
        let name = device_name(dev);
        let Ok(ctx) = Context::open_raw(dev, name.clone()) else {
            continue;
        };
        let Ok(count) = ctx.port_count() else {
            continue;
        };
        for port in 1..=count {
            if let Ok(attr) = ctx.query_port(port) {
                out.push(PortSummary {
                    device: name.clone(),
                    port,
                    active: attr.state == sys::ibv_port_state::IBV_PORT_ACTIVE,
                    link_layer_ethernet: attr.link_layer == LINK_LAYER_ETHERNET,
                });
            }
        }
    }
    Ok(out)
}

/// The first active port (of `device` when given).
pub fn first_active_port(device: Option<&str>) -> Result<PortSummary, VerbsError> {
    let all = ports()?;
    if let Some(name) = device {
        if !all.iter().any(|p| p.device == name) {
            return Err(VerbsError::DeviceNotFound(name.to_string()));
        }
    }
    all.into_iter()
        .find(|p| p.active && device.is_none_or(|d| p.device == d))
        .ok_or_else(|| {
            VerbsError::NoDevice(match device {
                Some(d) => format!("device {d} has no active port"),
                None => "RDMA devices exist but none has an active port".to_string(),
            })
        })
}

fn device_name(dev: *mut sys::ibv_device) -> String {
    // SAFETY: `dev` comes from a live device list; ibv_get_device_name returns
    // a pointer to the NUL-terminated name stored in the device (or NULL).
    let name = unsafe { sys::ibv_get_device_name(dev) };
    if name.is_null() {
        return "?".to_string();
    }
    // SAFETY: non-NULL, NUL-terminated, valid while the list is alive (it is:
    // `dev` was borrowed from it by the caller).
    unsafe { CStr::from_ptr(name) }
        .to_string_lossy()
        .into_owned()
}

/// The array returned by `ibv_get_device_list`, freed on drop.
struct DeviceList {
    list: NonNull<*mut sys::ibv_device>,
    len: usize,
}

impl DeviceList {
    fn get() -> Result<Self, VerbsError> {
        let mut n: c_int = 0;
        // SAFETY: `n` is a valid out-pointer; the call has no other input.
        let list = unsafe { sys::ibv_get_device_list(&mut n) };
        let Some(list) = NonNull::new(list) else {
            let e = io::Error::last_os_error();
            return Err(VerbsError::NoDevice(
                if e.raw_os_error() == Some(libc::ENOSYS) {
                    "the kernel has no RDMA support (ibv_get_device_list: ENOSYS)".to_string()
                } else {
                    format!("ibv_get_device_list failed: {e}")
                },
            ));
        };
        let list = DeviceList {
            list,
            len: usize::try_from(n).unwrap_or(0),
        };
        if list.len == 0 {
            return Err(VerbsError::NoDevice(
                "no RDMA device found (ibv_get_device_list returned none)".to_string(),
            ));
        }
        Ok(list)
    }

    fn iter(&self) -> impl Iterator<Item = *mut sys::ibv_device> + '_ {
        // SAFETY: the array holds `len` device pointers (then NULL) and lives
        // as long as `self`.
        (0..self.len).map(move |i| unsafe { *self.list.as_ptr().add(i) })
    }
}

impl Drop for DeviceList {
    fn drop(&mut self) {
        // SAFETY: the list came from ibv_get_device_list and is freed once.
        // Contexts opened from its devices stay valid after this (verbs API).
        unsafe { sys::ibv_free_device_list(self.list.as_ptr()) }
    }
}

/// An open device (`ibv_context`).
pub struct Context {
    ctx: NonNull<sys::ibv_context>,
    name: String,
}

// SAFETY: libibverbs contexts are thread-safe; the pointer is only passed to
// verbs calls, never dereferenced for writing by this crate.
unsafe impl Send for Context {}
// SAFETY: as above.
unsafe impl Sync for Context {}

impl Context {
    /// Opens `name`, or the first device with an active port.
    pub fn open(name: Option<&str>) -> Result<Arc<Self>, VerbsError> {
        let wanted = match name {
            Some(n) => n.to_string(),
            None => first_active_port(None)?.device,
        };
        let list = DeviceList::get()?;
        let dev = list
            .iter()
            .find(|d| device_name(*d) == wanted)
            .ok_or_else(|| VerbsError::DeviceNotFound(wanted.clone()))?;
        Ok(Arc::new(Self::open_raw(dev, wanted)?))
    }

    fn open_raw(dev: *mut sys::ibv_device, name: String) -> Result<Self, VerbsError> {
        // SAFETY: `dev` is an element of a live device list.
        let ctx = unsafe { sys::ibv_open_device(dev) };
        let ctx = NonNull::new(ctx).ok_or_else(|| last_err("ibv_open_device"))?;
        Ok(Context { ctx, name })
    }

    /// The device's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    fn raw(&self) -> *mut sys::ibv_context {
        self.ctx.as_ptr()
    }

    /// Number of physical ports of the device (`ibv_query_device`).
    pub fn port_count(&self) -> Result<u8, VerbsError> {
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut attr: sys::ibv_device_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context, valid out-pointer.
        let rc = unsafe { sys::ibv_query_device(self.raw(), &mut attr) };
        if rc != 0 {
            return Err(rc_err("ibv_query_device", rc));
        }
        Ok(attr.phys_port_cnt)
    }

    /// Attributes of `port` (`ibv_query_port`): state, LID, MTU, link layer.
    pub fn query_port(&self, port: u8) -> Result<sys::ibv_port_attr, VerbsError> {
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut attr: sys::ibv_port_attr = unsafe { std::mem::zeroed() };
        // SAFETY: live context; the helper passes sizeof(attr) to the provider.
        let rc = unsafe { sys::___ibv_query_port(self.raw(), port, &mut attr) };
        if rc != 0 {
            return Err(rc_err("ibv_query_port", rc));
        }
        Ok(attr)
    }

    /// The GID at `index` of `port`'s GID table.
    pub fn query_gid(&self, port: u8, index: u8) -> Result<[u8; 16], VerbsError> {
        let mut gid = sys::ibv_gid { raw: [0; 16] };
        // SAFETY: live context, valid out-pointer to a 16-byte union.
        let rc = unsafe { sys::ibv_query_gid(self.raw(), port, c_int::from(index), &mut gid) };
        if rc != 0 {
            return Err(last_err("ibv_query_gid"));
        }
        // SAFETY: every bit pattern is a valid `[u8; 16]`.
        Ok(unsafe { gid.raw })
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: every child object holds an Arc of this context, so none is
        // left when it is closed.
        unsafe { sys::ibv_close_device(self.raw()) };
    }
}

/// A protection domain.
pub struct ProtectionDomain {
    pd: NonNull<sys::ibv_pd>,
    ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe; see `Context`.
unsafe impl Send for ProtectionDomain {}
// SAFETY: as above.
unsafe impl Sync for ProtectionDomain {}

impl ProtectionDomain {
    /// Allocates a protection domain on `ctx`.
    pub fn new(ctx: &Arc<Context>) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: live context.
        let pd = unsafe { sys::ibv_alloc_pd(ctx.raw()) };
        let pd = NonNull::new(pd).ok_or_else(|| last_err("ibv_alloc_pd"))?;
        Ok(Arc::new(ProtectionDomain {
            pd,
            ctx: Arc::clone(ctx),
        }))
    }

    /// The context the domain belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: memory regions and queue pairs hold an Arc of the domain, so
        // none is left.
        unsafe { sys::ibv_dealloc_pd(self.pd.as_ptr()) };
    }
}

/// Memory this crate allocated (page aligned, zeroed) for a region.
struct OwnedBuffer {
    ptr: NonNull<u8>,
    layout: Layout,
}

impl Drop for OwnedBuffer {
    fn drop(&mut self) {
        // SAFETY: allocated in `MemoryRegion::alloc` with this layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), self.layout) }
    }
}

/// A registered memory region: local read/write, remote read/write.
///
/// Its bytes may be written by the device (RECV, RDMA READ into it, a peer's
/// RDMA WRITE) at any time, so this type never hands out references to them:
/// it copies in and out through raw pointers.
pub struct MemoryRegion {
    mr: NonNull<sys::ibv_mr>,
    addr: *mut u8,
    len: usize,
    // Field order: the registration is removed (Drop) before the buffer is
    // freed (fields drop after `drop` runs).
    _owned: Option<OwnedBuffer>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: the region is only accessed through raw-pointer copies and verbs
// calls, which are thread-safe.
unsafe impl Send for MemoryRegion {}
// SAFETY: as above.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// Allocates `len` zeroed bytes (page aligned) and registers them.
    pub fn alloc(pd: &Arc<ProtectionDomain>, len: usize) -> Result<Arc<Self>, VerbsError> {
        let layout = Layout::from_size_align(len.max(1), BUFFER_ALIGN)
            .map_err(|e| VerbsError::Invalid(format!("buffer of {len} bytes: {e}")))?;
        // SAFETY: the layout has a non-zero size.
        let ptr = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(ptr)
            .ok_or_else(|| VerbsError::Invalid(format!("cannot allocate {len} bytes")))?;
        let owned = OwnedBuffer { ptr, layout };
        // SAFETY: the buffer is `len` bytes, owned by the region and freed only
        // after deregistration.
        unsafe { Self::register_inner(pd, ptr.as_ptr(), len, Some(owned)) }
    }

    /// Registers memory the caller owns (e.g. the DSM's shared space).
    ///
    /// # Safety
    /// `addr..addr+len` must be mapped memory that stays mapped (not unmapped
    /// nor remapped) for as long as the returned region (or any clone of the
    /// `Arc`) is alive. Its contents may change at any time through the device
    /// (peers may read and write it remotely).
    pub unsafe fn register(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
    ) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: forwarded to the caller's contract.
        unsafe { Self::register_inner(pd, addr, len, None) }
    }

    /// # Safety
    /// As [`MemoryRegion::register`].
    unsafe fn register_inner(
        pd: &Arc<ProtectionDomain>,
        addr: *mut u8,
        len: usize,
        owned: Option<OwnedBuffer>,
    ) -> Result<Arc<Self>, VerbsError> {
        if len == 0 || addr.is_null() {
            return Err(VerbsError::Invalid(
                "cannot register an empty or null range".into(),
            ));
        }
        let access = sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ;
        // SAFETY: live protection domain; the caller guarantees the range stays
        // mapped while registered. `access` has no OPTIONAL_RANGE bit, so the
        // plain ibv_reg_mr symbol is the right one.
        let mr = unsafe { sys::ibv_reg_mr(pd.pd.as_ptr(), addr.cast(), len, access.0 as c_int) };
        let mr = NonNull::new(mr).ok_or_else(|| last_err("ibv_reg_mr"))?;
        Ok(Arc::new(MemoryRegion {
            mr,
            addr,
            len,
            _owned: owned,
            _pd: Arc::clone(pd),
        }))
    }

    /// Start address, as peers address it in RDMA READ / WRITE.
    pub fn addr(&self) -> u64 {
        self.addr as u64
    }

    /// Start of the registered range. Its bytes may change at any time
    /// through the device.
    pub fn as_ptr(&self) -> *mut u8 {
        self.addr
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the region has no bytes (never true: empty ranges are not
    /// registered).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Local key, for this side's scatter/gather elements.
    pub fn lkey(&self) -> u32 {
        // SAFETY: the ibv_mr stays valid until deregistered in Drop.
        unsafe { self.mr.as_ref().lkey }
    }

    /// Remote key, which peers need to READ or WRITE the region.
    pub fn rkey(&self) -> u32 {
        // SAFETY: as above.
        unsafe { self.mr.as_ref().rkey }
    }

    /// Checks that `offset..offset+len` lies inside the region.
    pub fn check(&self, offset: usize, len: usize) -> Result<(), VerbsError> {
        match offset.checked_add(len) {
            Some(end) if end <= self.len => Ok(()),
            _ => Err(VerbsError::Invalid(format!(
                "range {offset}+{len} is outside the region of {} bytes",
                self.len
            ))),
        }
    }

    /// Copies `data` into the region at `offset`.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> Result<(), VerbsError> {
        self.check(offset, data.len())?;
        // SAFETY: in bounds (checked); the region is valid memory for its
        // lifetime; `data` cannot overlap it as no reference to it exists.
        unsafe { ptr::copy_nonoverlapping(data.as_ptr(), self.addr.add(offset), data.len()) };
        Ok(())
    }

    /// Copies bytes of the region at `offset` into `out`.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> Result<(), VerbsError> {
        self.check(offset, out.len())?;
        // SAFETY: as in `write_bytes`.
        unsafe { ptr::copy_nonoverlapping(self.addr.add(offset), out.as_mut_ptr(), out.len()) };
        Ok(())
    }

    /// A copy of `len` bytes at `offset`.
    pub fn to_vec(&self, offset: usize, len: usize) -> Result<Vec<u8>, VerbsError> {
        let mut v = Vec::new();
        self.append_to(offset, len, &mut v)?;
        Ok(v)
    }

    /// Appends `len` bytes of the region at `offset` to `out`, with no
    /// zeroing of the room first (a page received is 4 KiB written once,
    /// not twice).
    pub fn append_to(
        &self,
        offset: usize,
        len: usize,
        out: &mut Vec<u8>,
    ) -> Result<(), VerbsError> {
        self.check(offset, len)?;
        out.reserve(len);
        // SAFETY: the source is in bounds (checked) of memory valid for the
        // region's lifetime; `reserve` made room for `len` bytes after the
        // vector's end, which the copy initializes before `set_len` counts
        // them; the two cannot overlap (the vector's buffer is its own).
        unsafe {
            ptr::copy_nonoverlapping(self.addr.add(offset), out.as_mut_ptr().add(out.len()), len);
            out.set_len(out.len() + len);
        }
        Ok(())
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: queue pairs keep an Arc of every region used by an
        // outstanding work request, so the device no longer uses it.
        unsafe { sys::ibv_dereg_mr(self.mr.as_ptr()) };
    }
}

/// A completion queue with its own completion channel, so a thread can sleep
/// until a completion arrives.
pub struct CompletionQueue {
    cq: NonNull<sys::ibv_cq>,
    channel: NonNull<sys::ibv_comp_channel>,
    /// Events taken with ibv_get_cq_event and not yet acknowledged.
    unacked: Mutex<u32>,
    _ctx: Arc<Context>,
}

// SAFETY: verbs objects are thread-safe; see `Context`.
unsafe impl Send for CompletionQueue {}
// SAFETY: as above.
unsafe impl Sync for CompletionQueue {}

/// One work completion, reduced to what the transport needs.
#[derive(Debug, Clone, Copy)]
pub struct Completion {
    /// The id the work request was posted with.
    pub wr_id: u64,
    /// `ibv_wc_status` value (0: success).
    pub status: u32,
    /// `ibv_wc_opcode` value: which kind of request completed.
    pub opcode: u32,
    /// Bytes received (meaningful for receives).
    pub byte_len: u32,
    /// Number of the local queue pair the request was posted on.
    pub qp_num: u32,
    /// The provider's own error code.
    pub vendor_err: u32,
}

impl Completion {
    /// Whether the work request succeeded.
    pub fn ok(&self) -> bool {
        self.status == sys::ibv_wc_status::IBV_WC_SUCCESS
    }

    /// The failure as a [`VerbsError::Completion`].
    pub fn error(&self) -> VerbsError {
        // SAFETY: ibv_wc_status_str accepts any value and returns a static
        // NUL-terminated string.
        let text = unsafe { CStr::from_ptr(sys::ibv_wc_status_str(self.status)) }
            .to_string_lossy()
            .into_owned();
        VerbsError::Completion {
            status: self.status,
            text,
            vendor_err: self.vendor_err,
        }
    }
}

impl CompletionQueue {
    /// Creates a queue of at least `entries` entries with its own
    /// (non-blocking) completion channel, not armed (see [`Self::arm`]).
    pub fn new(ctx: &Arc<Context>, entries: usize) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: live context.
        let channel = unsafe { sys::ibv_create_comp_channel(ctx.raw()) };
        let channel = NonNull::new(channel).ok_or_else(|| last_err("ibv_create_comp_channel"))?;
        // SAFETY: the channel was just created; its fd is open.
        let fd = unsafe { channel.as_ref().fd };
        // SAFETY: plain fcntl on an fd we own (through the channel).
        let nonblock = unsafe {
            let flags = libc::fcntl(fd, libc::F_GETFL);
            flags >= 0 && libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) == 0
        };
        let entries = c_int::try_from(entries).unwrap_or(c_int::MAX);
        // SAFETY: live context and channel; no cq_context.
        let cq =
            unsafe { sys::ibv_create_cq(ctx.raw(), entries, ptr::null_mut(), channel.as_ptr(), 0) };
        let Some(cq) = NonNull::new(cq) else {
            let e = last_err("ibv_create_cq");
            // SAFETY: no CQ uses the channel.
            unsafe { sys::ibv_destroy_comp_channel(channel.as_ptr()) };
            return Err(e);
        };
        let out = Arc::new(CompletionQueue {
            cq,
            channel,
            unacked: Mutex::new(0),
            _ctx: Arc::clone(ctx),
        });
        if !nonblock {
            return Err(last_err("fcntl(O_NONBLOCK) on the completion channel"));
        }
        Ok(out)
    }

    /// Takes up to `max` completions without waiting.
    pub fn poll(&self, out: &mut Vec<Completion>, max: usize) -> Result<usize, VerbsError> {
        const BATCH: usize = 16;
        // SAFETY: all-zero is a valid value of this plain C struct (the union
        // members are integers).
        let mut wcs: [sys::ibv_wc; BATCH] = unsafe { std::mem::zeroed() };
        let mut total = 0;
        while total < max {
            let want = (max - total).min(BATCH) as c_int;
            // SAFETY: live CQ; `wcs` has room for `want` entries.
            let n = unsafe { sys::ibv_poll_cq(self.cq.as_ptr(), want, wcs.as_mut_ptr()) };
            if n < 0 {
                return Err(rc_err("ibv_poll_cq", n));
            }
            for wc in &wcs[..n as usize] {
                out.push(Completion {
                    wr_id: wc.wr_id,
                    status: wc.status,
                    opcode: wc.opcode,
                    byte_len: wc.byte_len,
                    qp_num: wc.qp_num,
                    vendor_err: wc.vendor_err,
                });
            }
            total += n as usize;
            if n < want {
                break;
            }
        }
        Ok(total)
    }

    /// Arms the CQ for an event at its next completion. The CQ is left
    /// unarmed while its threads poll: an armed CQ raises an event at each
    /// completion, which the adapter's driver (soft-RoCE: inside the
    /// sender's post) delivers whether or not anyone sleeps on it. A caller
    /// about to sleep arms first, then polls once more (a completion that
    /// came before the arm raises no event), then sleeps.
    pub fn arm(&self) -> Result<(), VerbsError> {
        // SAFETY: live CQ.
        let rc = unsafe { sys::ibv_req_notify_cq(self.cq.as_ptr(), 0) };
        if rc != 0 {
            return Err(rc_err("ibv_req_notify_cq", rc));
        }
        Ok(())
    }

    /// Sleeps until the channel's next event (one raised since the CQ was
    /// last armed, see [`Self::arm`], ends it at once) or `timeout`. The
    /// completions stay in the CQ for whoever polls it next; the CQ is not
    /// armed again.
    pub fn sleep_until_event(&self, timeout: Duration) -> Result<(), VerbsError> {
        // SAFETY: the channel is alive as long as `self`.
        let fd = unsafe { self.channel.as_ref().fd };
        let mut pfd = libc::pollfd {
            fd,
            events: libc::POLLIN,
            revents: 0,
        };
        let ms = c_int::try_from(timeout.as_millis()).unwrap_or(c_int::MAX);
        // SAFETY: one valid pollfd.
        let rc = unsafe { libc::poll(&mut pfd, 1, ms) };
        if rc > 0 {
            let mut cq: *mut sys::ibv_cq = ptr::null_mut();
            let mut cq_ctx: *mut libc::c_void = ptr::null_mut();
            // SAFETY: live channel (non-blocking fd); valid out-pointers.
            let got = unsafe { sys::ibv_get_cq_event(self.channel.as_ptr(), &mut cq, &mut cq_ctx) };
            if got == 0 {
                let mut unacked = self.unacked.lock().unwrap_or_else(|p| p.into_inner());
                *unacked += 1;
                if *unacked >= 64 {
                    // SAFETY: acknowledges events taken from this CQ's channel.
                    unsafe { sys::ibv_ack_cq_events(self.cq.as_ptr(), *unacked) };
                    *unacked = 0;
                }
            }
        }
        Ok(())
    }
}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        let unacked = *self.unacked.lock().unwrap_or_else(|p| p.into_inner());
        // SAFETY: every queue pair using this CQ holds an Arc of it, so none is
        // left; events are acknowledged before destroying (required by verbs).
        unsafe {
            if unacked > 0 {
                sys::ibv_ack_cq_events(self.cq.as_ptr(), unacked);
            }
            sys::ibv_destroy_cq(self.cq.as_ptr());
            sys::ibv_destroy_comp_channel(self.channel.as_ptr());
        }
    }
}

/// What a peer needs to connect its queue pair to ours.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct QpEndpoint {
    /// Queue pair number.
    pub qpn: u32,
    /// First packet sequence number of our send queue (24 bits).
    pub psn: u32,
    /// LID of the port (InfiniBand; 0 on RoCE).
    pub lid: u16,
    /// GID of the port at the chosen GID index.
    pub gid: [u8; 16],
    /// `ibv_mtu` enum value of the sender's port.
    pub mtu: u32,
    /// Whether the port is RoCE (needs the GRH/GID to address it).
    pub ethernet: bool,
}

/// How a queue pair uses its port.
#[derive(Debug, Clone, Copy)]
pub struct PortConfig {
    /// Port number (from 1).
    pub port: u8,
    /// Index of the source GID in the port's GID table.
    pub gid_index: u8,
}

/// One scatter/gather element of a work request: a range of a region.
#[derive(Clone)]
pub struct Segment {
    /// The registered region; held until the request completes.
    pub region: Arc<MemoryRegion>,
    /// Start of the range in the region (bytes).
    pub offset: usize,
    /// Length of the range (bytes).
    pub len: usize,
}

/// What a send-queue work request does.
#[derive(Debug, Clone, Copy)]
pub enum SendOp {
    /// A SEND, consuming one receive buffer posted by the peer.
    Send,
    /// One-sided READ of the peer's memory into the segments.
    RdmaRead {
        /// Address in the peer's registered region.
        remote_addr: u64,
        /// The region's remote key.
        rkey: u32,
    },
    /// One-sided WRITE of the segments into the peer's memory.
    RdmaWrite {
        /// Address in the peer's registered region.
        remote_addr: u64,
        /// The region's remote key.
        rkey: u32,
    },
}

/// An RC queue pair. Every posted work request keeps its memory regions
/// alive (held in `in_flight`) until [`QueuePair::complete`] is called with
/// its `wr_id`, which the completion poller does for every completion.
pub struct QueuePair {
    qp: NonNull<sys::ibv_qp>,
    /// Most bytes a SEND may carry inline (copied into the work request at
    /// post time, no buffer held), as the provider granted it.
    inline_limit: usize,
    in_flight: Mutex<HashMap<u64, Vec<Arc<MemoryRegion>>>>,
    port: PortConfig,
    _send_cq: Arc<CompletionQueue>,
    _recv_cq: Arc<CompletionQueue>,
    _pd: Arc<ProtectionDomain>,
}

// SAFETY: verbs objects are thread-safe; see `Context`.
unsafe impl Send for QueuePair {}
// SAFETY: as above.
unsafe impl Sync for QueuePair {}

/// Sizes of a queue pair's queues.
#[derive(Debug, Clone, Copy)]
pub struct QpCaps {
    /// Work requests the send queue holds at once.
    pub max_send_wr: u32,
    /// Work requests the receive queue holds at once.
    pub max_recv_wr: u32,
    /// Bytes of inline data to ask for (0: none). A provider that refuses
    /// the amount gets a queue pair without.
    pub max_inline_data: u32,
}

impl QueuePair {
    /// Creates an RC queue pair on `pd` using these completion queues and
    /// moves it to INIT on `port`; [`QueuePair::connect`] completes it.
    pub fn new_rc(
        pd: &Arc<ProtectionDomain>,
        send_cq: &Arc<CompletionQueue>,
        recv_cq: &Arc<CompletionQueue>,
        caps: QpCaps,
        port: PortConfig,
    ) -> Result<Arc<Self>, VerbsError> {
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut init: sys::ibv_qp_init_attr = unsafe { std::mem::zeroed() };
        init.send_cq = send_cq.cq.as_ptr();
        init.recv_cq = recv_cq.cq.as_ptr();
        init.cap.max_send_wr = caps.max_send_wr;
        init.cap.max_recv_wr = caps.max_recv_wr;
        init.cap.max_send_sge = 4;
        init.cap.max_recv_sge = 1;
        init.qp_type = sys::ibv_qp_type::IBV_QPT_RC;
        init.sq_sig_all = 0;
        init.cap.max_inline_data = caps.max_inline_data;
        // SAFETY: live PD and CQs (held by the new value); valid attributes.
        let mut qp = unsafe { sys::ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        if qp.is_null() && caps.max_inline_data > 0 {
            init.cap.max_inline_data = 0;
            // SAFETY: as above.
            qp = unsafe { sys::ibv_create_qp(pd.pd.as_ptr(), &mut init) };
        }
        let qp = NonNull::new(qp).ok_or_else(|| last_err("ibv_create_qp"))?;
        let out = Arc::new(QueuePair {
            qp,
            // ibv_create_qp wrote back the capabilities granted.
            inline_limit: init.cap.max_inline_data as usize,
            in_flight: Mutex::new(HashMap::new()),
            port,
            _send_cq: Arc::clone(send_cq),
            _recv_cq: Arc::clone(recv_cq),
            _pd: Arc::clone(pd),
        });
        out.to_init()?;
        Ok(out)
    }

    /// The queue pair number peers address.
    pub fn qp_num(&self) -> u32 {
        // SAFETY: the ibv_qp lives until destroyed in Drop.
        unsafe { self.qp.as_ref().qp_num }
    }

    fn modify(
        &self,
        attr: &mut sys::ibv_qp_attr,
        mask: sys::ibv_qp_attr_mask,
        what: &'static str,
    ) -> Result<(), VerbsError> {
        // SAFETY: live QP, valid attribute struct for the given mask.
        let rc = unsafe { sys::ibv_modify_qp(self.qp.as_ptr(), attr, mask.0 as c_int) };
        if rc != 0 {
            return Err(rc_err(what, rc));
        }
        Ok(())
    }

    fn to_init(&self) -> Result<(), VerbsError> {
        use sys::ibv_qp_attr_mask as M;
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_INIT;
        a.pkey_index = 0;
        a.port_num = self.port.port;
        a.qp_access_flags = (sys::ibv_access_flags::IBV_ACCESS_LOCAL_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_WRITE
            | sys::ibv_access_flags::IBV_ACCESS_REMOTE_READ)
            .0;
        self.modify(
            &mut a,
            M::IBV_QP_STATE | M::IBV_QP_PKEY_INDEX | M::IBV_QP_PORT | M::IBV_QP_ACCESS_FLAGS,
            "ibv_modify_qp(INIT)",
        )
    }

    /// Connects to `remote` (RTR then RTS). `local` is what we sent the peer.
    pub fn connect(&self, local: &QpEndpoint, remote: &QpEndpoint) -> Result<(), VerbsError> {
        use sys::ibv_qp_attr_mask as M;
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTR;
        a.path_mtu = local.mtu.min(remote.mtu);
        a.dest_qp_num = remote.qpn;
        a.rq_psn = remote.psn;
        a.max_dest_rd_atomic = 16;
        a.min_rnr_timer = 1; // 0.01 ms: receivers repost buffers quickly
        a.ah_attr.dlid = remote.lid;
        a.ah_attr.sl = 0;
        a.ah_attr.src_path_bits = 0;
        a.ah_attr.port_num = self.port.port;
        if remote.ethernet || remote.lid == 0 {
            a.ah_attr.is_global = 1;
            a.ah_attr.grh.dgid = sys::ibv_gid { raw: remote.gid };
            a.ah_attr.grh.sgid_index = self.port.gid_index;
            a.ah_attr.grh.hop_limit = 64;
        }
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_AV
                | M::IBV_QP_PATH_MTU
                | M::IBV_QP_DEST_QPN
                | M::IBV_QP_RQ_PSN
                | M::IBV_QP_MAX_DEST_RD_ATOMIC
                | M::IBV_QP_MIN_RNR_TIMER,
            "ibv_modify_qp(RTR)",
        )?;
        // SAFETY: as above.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_RTS;
        a.sq_psn = local.psn;
        a.timeout = 14; // 4.096 us * 2^14 = 67 ms per retry
        a.retry_cnt = 7;
        a.rnr_retry = 7; // infinite: a receiver out of buffers is back-pressure
        a.max_rd_atomic = 16;
        self.modify(
            &mut a,
            M::IBV_QP_STATE
                | M::IBV_QP_SQ_PSN
                | M::IBV_QP_TIMEOUT
                | M::IBV_QP_RETRY_CNT
                | M::IBV_QP_RNR_RETRY
                | M::IBV_QP_MAX_QP_RD_ATOMIC,
            "ibv_modify_qp(RTS)",
        )
    }

    fn sges(segs: &[Segment]) -> Result<Vec<sys::ibv_sge>, VerbsError> {
        segs.iter()
            .map(|s| {
                s.region.check(s.offset, s.len)?;
                Ok(sys::ibv_sge {
                    addr: s.region.addr() + s.offset as u64,
                    length: u32::try_from(s.len)
                        .map_err(|_| VerbsError::Invalid(format!("segment of {} bytes", s.len)))?,
                    lkey: s.region.lkey(),
                })
            })
            .collect()
    }

    fn hold(&self, wr_id: u64, segs: &[Segment]) -> Result<(), VerbsError> {
        let mut map = self.in_flight.lock().unwrap_or_else(|p| p.into_inner());
        if map.contains_key(&wr_id) {
            return Err(VerbsError::Invalid(format!(
                "wr_id {wr_id} is already in flight"
            )));
        }
        map.insert(wr_id, segs.iter().map(|s| Arc::clone(&s.region)).collect());
        Ok(())
    }

    /// Releases the regions of a completed work request.
    pub fn complete(&self, wr_id: u64) {
        self.in_flight
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&wr_id);
    }

    /// Posts one signaled send-queue work request.
    pub fn post_send(&self, wr_id: u64, op: SendOp, segs: &[Segment]) -> Result<(), VerbsError> {
        let mut sges = Self::sges(segs)?;
        let mut wr = Self::send_wr(wr_id, op, &mut sges);
        self.hold(wr_id, segs)?;
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; the sge list points at registered ranges (bounds
        // checked) whose regions are held in `in_flight` until completion; the
        // WR and sges only need to live for the duration of the call.
        let rc = unsafe { sys::ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            self.complete(wr_id);
            return Err(rc_err("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Most bytes [`Self::post_send_inline`] takes.
    pub fn inline_limit(&self) -> usize {
        self.inline_limit
    }

    /// Posts one signaled SEND of `data`, carried inline: the provider
    /// copies the bytes during the call, so no registered buffer is held
    /// until the completion. At most [`Self::inline_limit`] bytes.
    pub fn post_send_inline(&self, wr_id: u64, data: &[u8]) -> Result<(), VerbsError> {
        if data.len() > self.inline_limit {
            return Err(VerbsError::Invalid(format!(
                "{} bytes inline, the queue pair takes {}",
                data.len(),
                self.inline_limit
            )));
        }
        let mut sge = sys::ibv_sge {
            addr: data.as_ptr() as u64,
            length: data.len() as u32,
            lkey: 0,
        };
        let mut wr = Self::send_wr(wr_id, SendOp::Send, std::slice::from_mut(&mut sge));
        wr.send_flags |= sys::ibv_send_flags::IBV_SEND_INLINE.0;
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; the one sge points at `data`, which lives for the
        // call, and an inline SEND is copied into the work request before
        // ibv_post_send returns (no lkey is used, nothing is held).
        let rc = unsafe { sys::ibv_post_send(self.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            return Err(rc_err("ibv_post_send", rc));
        }
        Ok(())
    }

    /// Posts `first` unsignaled, then `last` signaled, in one call (one
    /// doorbell). On an RC queue pair completions are reported in posting
    /// order, so `last`'s completion means `first` completed too; a failed
    /// `first` is reported (with its id) and flushes `last`. The regions of
    /// both are held under `last`'s id. If the provider refuses `last` after
    /// accepting `first`, the hold is kept (until the queue pair is
    /// destroyed: `first` may still use the memory) and an error is returned;
    /// the caller must then treat the queue pair as failed.
    pub fn post_send_pair(
        &self,
        first: (u64, SendOp, &[Segment]),
        last: (u64, SendOp, &[Segment]),
    ) -> Result<(), VerbsError> {
        let mut sges_first = Self::sges(first.2)?;
        let mut sges_last = Self::sges(last.2)?;
        let mut wr_last = Self::send_wr(last.0, last.1, &mut sges_last);
        let mut wr_first = Self::send_wr(first.0, first.1, &mut sges_first);
        wr_first.send_flags = 0;
        wr_first.next = &mut wr_last;
        let held: Vec<Segment> = first.2.iter().chain(last.2).cloned().collect();
        self.hold(last.0, &held)?;
        let mut bad: *mut sys::ibv_send_wr = ptr::null_mut();
        // SAFETY: live QP; both sge lists point at registered ranges (bounds
        // checked) whose regions are held in `in_flight` under `last`'s id
        // until its completion (which follows `first`'s); the WRs, linked
        // through `next`, and their sges live until the call returns.
        let rc = unsafe { sys::ibv_post_send(self.qp.as_ptr(), &mut wr_first, &mut bad) };
        if rc != 0 {
            let first_taken = ptr::eq(bad, &wr_last);
            if !first_taken {
                self.complete(last.0);
            }
            return Err(rc_err("ibv_post_send", rc));
        }
        Ok(())
    }

    fn send_wr(wr_id: u64, op: SendOp, sges: &mut [sys::ibv_sge]) -> sys::ibv_send_wr {
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut wr: sys::ibv_send_wr = unsafe { std::mem::zeroed() };
        wr.wr_id = wr_id;
        wr.sg_list = sges.as_mut_ptr();
        wr.num_sge = sges.len() as c_int;
        wr.send_flags = sys::ibv_send_flags::IBV_SEND_SIGNALED.0;
        match op {
            SendOp::Send => wr.opcode = sys::ibv_wr_opcode::IBV_WR_SEND,
            SendOp::RdmaRead { remote_addr, rkey } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_READ;
                wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
            }
            SendOp::RdmaWrite { remote_addr, rkey } => {
                wr.opcode = sys::ibv_wr_opcode::IBV_WR_RDMA_WRITE;
                wr.wr.rdma = sys::rdma_t { remote_addr, rkey };
            }
        }
        wr
    }

    /// Posts one receive buffer.
    pub fn post_recv(&self, wr_id: u64, seg: &Segment) -> Result<(), VerbsError> {
        let mut sges = Self::sges(std::slice::from_ref(seg))?;
        let mut wr = sys::ibv_recv_wr {
            wr_id,
            next: ptr::null_mut(),
            sg_list: sges.as_mut_ptr(),
            num_sge: 1,
        };
        self.hold(wr_id, std::slice::from_ref(seg))?;
        let mut bad: *mut sys::ibv_recv_wr = ptr::null_mut();
        // SAFETY: as in `post_send`.
        let rc = unsafe { sys::ibv_post_recv(self.qp.as_ptr(), &mut wr, &mut bad) };
        if rc != 0 {
            self.complete(wr_id);
            return Err(rc_err("ibv_post_recv", rc));
        }
        Ok(())
    }

    /// Moves the queue pair to the error state: outstanding work requests are
    /// flushed (completed with an error) and new ones fail.
    pub fn set_error(&self) {
        // SAFETY: all-zero is a valid value of this plain C struct.
        let mut a: sys::ibv_qp_attr = unsafe { std::mem::zeroed() };
        a.qp_state = sys::ibv_qp_state::IBV_QPS_ERR;
        let _ = self.modify(
            &mut a,
            sys::ibv_qp_attr_mask::IBV_QP_STATE,
            "ibv_modify_qp(ERR)",
        );
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: live QP, destroyed once. After this the device no longer
        // touches the memory of its work requests, so `in_flight` (dropped
        // after this function) may release the regions.
        unsafe { sys::ibv_destroy_qp(self.qp.as_ptr()) };
    }
}

/// Endpoint data for a queue pair on `ctx`'s `port`.
pub fn local_endpoint(ctx: &Context, qp: &QueuePair, psn: u32) -> Result<QpEndpoint, VerbsError> {
    let attr = ctx.query_port(qp.port.port)?;
    let ethernet = attr.link_layer == LINK_LAYER_ETHERNET;
    let gid = ctx.query_gid(qp.port.port, qp.port.gid_index)?;
    Ok(QpEndpoint {
        qpn: qp.qp_num(),
        psn: psn & 0x00ff_ffff,
        lid: attr.lid,
        gid,
        mtu: attr.active_mtu,
        ethernet,
    })
}

/// The GID index to use on a port: `DSM_RDMA_GID_INDEX` if set, else the
/// first IPv4-mapped GID (RoCE v2 over IPv4 routes between hosts), else 0.
pub fn choose_gid_index(ctx: &Context, port: u8, wanted: Option<u8>) -> Result<u8, VerbsError> {
    if let Some(i) = wanted {
        return Ok(i);
    }
    let attr = ctx.query_port(port)?;
    if attr.link_layer != LINK_LAYER_ETHERNET {
        return Ok(0);
    }
    let len = u8::try_from(attr.gid_tbl_len.clamp(0, 255)).unwrap_or(0);
    for i in 0..len.min(32) {
        if let Ok(gid) = ctx.query_gid(port, i) {
            if gid[..10].iter().all(|b| *b == 0) && gid[10] == 0xff && gid[11] == 0xff {
                return Ok(i);
            }
        }
    }
    Ok(0)
}
