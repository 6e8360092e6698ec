//! The crate's only `unsafe`: a parent-death signal for helper processes (set
//! between fork and exec), the two KVM ioctls rustix has no typed wrapper for (its
//! `ioctl` patterns drop the return value, which here is the answer), and `poll(2)`
//! on one fd (rustix's is behind its `event` feature, which the workspace does not
//! build).
#![allow(unsafe_code)]

use std::os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd};

use rustix::io::Errno;

/// `_IO(KVMIO, 0x00)`
const KVM_GET_API_VERSION: libc::c_ulong = 0xAE00;
/// `_IO(KVMIO, 0x01)`
const KVM_CREATE_VM: libc::c_ulong = 0xAE01;

pub fn open_rw(path: &str) -> Result<OwnedFd, Errno> {
    rustix::fs::open(
        path,
        rustix::fs::OFlags::RDWR | rustix::fs::OFlags::CLOEXEC,
        rustix::fs::Mode::empty(),
    )
}

pub fn kvm_api_version(kvm: &OwnedFd) -> Result<i32, Errno> {
    // SAFETY: KVM_GET_API_VERSION takes no argument and only returns an int; the fd
    // is open for the duration of the call.
    let ret = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_GET_API_VERSION as _, 0) };
    if ret < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    Ok(ret)
}

/// Creates (and, by dropping the returned fd, destroys) a VM of machine type 0.
pub fn kvm_create_vm(kvm: &OwnedFd) -> Result<OwnedFd, Errno> {
    // SAFETY: KVM_CREATE_VM takes the machine type as an integer argument (0 is the
    // default type) and returns a new fd that nothing else owns.
    let ret = unsafe { libc::ioctl(kvm.as_raw_fd(), KVM_CREATE_VM as _, 0) };
    if ret < 0 {
        return Err(Errno::from_raw_os_error(
            std::io::Error::last_os_error().raw_os_error().unwrap_or(0),
        ));
    }
    // SAFETY: `ret` is a fresh fd returned by the kernel and owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(ret) })
}

/// Whether `fd` becomes readable within `timeout_ms` (0: just look). A pidfd is
/// readable once its process has exited.
pub fn poll_readable(fd: BorrowedFd<'_>, timeout_ms: i32) -> Result<bool, Errno> {
    let mut pfd = libc::pollfd {
        fd: fd.as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    loop {
        // SAFETY: `pfd` is one valid pollfd on the stack for the duration of the call,
        // and nfds says exactly one; the fd is borrowed, so it stays open.
        let ret = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
        if ret >= 0 {
            return Ok(ret > 0 && pfd.revents != 0);
        }
        let errno = std::io::Error::last_os_error().raw_os_error().unwrap_or(0);
        if errno != libc::EINTR {
            return Err(Errno::from_raw_os_error(errno));
        }
    }
}

/// Makes `cmd`'s child die with SIGKILL when the thread that started it ends (its
/// parent dies): for helpers that must never outlive the process watching through
/// them (a `virsh event` stream), whereas a VM must (see `Vm::spawn_own_group`).
pub fn kill_with_parent(cmd: &mut std::process::Command) {
    use std::os::unix::process::CommandExt as _;
    // SAFETY: the closure runs between fork and exec and only calls prctl(2), which is
    // async-signal-safe; it touches no memory shared with the parent.
    unsafe {
        cmd.pre_exec(|| {
            rustix::process::set_parent_process_death_signal(Some(rustix::process::Signal::KILL))
                .map_err(std::io::Error::from)
        });
    }
}
