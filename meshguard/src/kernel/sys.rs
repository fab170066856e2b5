//! The three `bpf(2)` commands aya 0.14 does not offer: a link's fd by its id (so that the agent
//! holds every link it attached, pinned or not), pinning an fd, and which programs a cgroup runs
//! (so that the agent notices when its programs were detached behind its back).

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_PROG_QUERY: libc::c_long = 16;
const BPF_LINK_GET_FD_BY_ID: libc::c_long = 30;

/// Attach types (`enum bpf_attach_type`) of the agent's cgroup programs.
pub const ATTACH_CGROUP_INET_INGRESS: u32 = 0;
pub const ATTACH_CGROUP_INET_EGRESS: u32 = 1;
pub const ATTACH_CGROUP_SOCK_OPS: u32 = 3;
pub const ATTACH_CGROUP_INET_SOCK_RELEASE: u32 = 34;

/// `bpf(cmd, attr, size)` with an attribute struct of our own: the kernel reads only `size`
/// bytes and takes the rest of its union as zero.
fn sys_bpf<T>(cmd: libc::c_long, attr: &mut T) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a live, initialised repr(C) struct of the layout `cmd` expects, and
    // the kernel writes at most `size_of::<T>()` bytes into it.
    let ret = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            cmd,
            attr as *mut T,
            size_of::<T>() as libc::c_uint,
        )
    };
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// A new fd for the link with this id.
pub fn link_fd_by_id(id: u32) -> io::Result<OwnedFd> {
    #[repr(C)]
    struct GetFdById {
        id: u32,
        next_id: u32,
        open_flags: u32,
    }
    let fd = sys_bpf(
        BPF_LINK_GET_FD_BY_ID,
        &mut GetFdById {
            id,
            next_id: 0,
            open_flags: 0,
        },
    )?;
    // SAFETY: the kernel returned a new fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Pins a map, program or link fd at `path` on bpffs.
pub fn pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    use std::os::unix::ffi::OsStrExt as _;
    #[repr(C)]
    struct ObjPin {
        pathname: u64,
        bpf_fd: u32,
        file_flags: u32,
        path_fd: i32,
        _pad: u32,
    }
    let path = CString::new(path.as_os_str().as_bytes())
        .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
    sys_bpf(
        BPF_OBJ_PIN,
        &mut ObjPin {
            pathname: path.as_ptr() as u64,
            bpf_fd: fd.as_raw_fd() as u32,
            file_flags: 0,
            path_fd: 0,
            _pad: 0,
        },
    )?;
    Ok(())
}

/// Ids of the programs attached directly to a cgroup for one attach type.
pub fn cgroup_programs(cgroup: BorrowedFd<'_>, attach_type: u32) -> io::Result<Vec<u32>> {
    #[repr(C)]
    struct Query {
        target_fd: u32,
        attach_type: u32,
        query_flags: u32,
        attach_flags: u32,
        prog_ids: u64,
        prog_cnt: u32,
        _pad: u32,
    }
    let mut ids = vec![0u32; 64];
    loop {
        let mut query = Query {
            target_fd: cgroup.as_raw_fd() as u32,
            attach_type,
            query_flags: 0,
            attach_flags: 0,
            prog_ids: ids.as_mut_ptr() as u64,
            prog_cnt: ids.len() as u32,
            _pad: 0,
        };
        match sys_bpf(BPF_PROG_QUERY, &mut query) {
            Ok(_) => {
                ids.truncate(query.prog_cnt as usize);
                return Ok(ids);
            }
            // More programs than room: the kernel says how many.
            Err(e) if e.raw_os_error() == Some(libc::ENOSPC) && ids.len() < 1 << 16 => {
                ids = vec![0; (query.prog_cnt as usize).max(ids.len() * 2)];
            }
            Err(e) => return Err(e),
        }
    }
}
