//! The raw socket an AoE initiator speaks through: AF_PACKET, SOCK_RAW, EtherType
//! 0x88A2, bound to one interface, non-blocking and registered with tokio (`AsyncFd`).
//!
//! A packet socket belongs to the network namespace of the thread that creates it, and
//! interface names are looked up there too; everything here runs on the caller's thread
//! for that reason (no `spawn_blocking`).

use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, RawFd};

use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::unix::AsyncFd;

use super::error::AoeError;
use super::frame::{Mac, ETHERTYPE};

/// Kernel buffers big enough for a window of jumbo frames in each direction.
const SOCKET_BUFFER: usize = 8 << 20;

/// An AF_PACKET socket bound to `iface`, with what the interface told us.
pub struct AoeSocket {
    fd: AsyncFd<Socket>,
    pub iface: String,
    pub ifindex: u32,
    pub mac: Mac,
    pub mtu: usize,
}

impl AoeSocket {
    /// Open and bind. Must run inside a tokio runtime (the socket registers with it).
    pub fn open(iface: &str) -> Result<Self, AoeError> {
        let sock = raw_socket(iface)?;
        let err = |op: &'static str| {
            move |error| AoeError::Socket {
                iface: iface.to_string(),
                op,
                error,
            }
        };
        let ifindex = if_index(iface)?;
        bind(sock.as_raw_fd(), ifindex).map_err(err("bind"))?;
        let mtu = if_mtu(sock.as_raw_fd(), iface).map_err(err("SIOCGIFMTU"))?;
        let mac = if_mac(sock.as_raw_fd(), iface).map_err(err("SIOCGIFHWADDR"))?;
        sock.set_nonblocking(true).map_err(err("O_NONBLOCK"))?;
        // Best effort: the plain sizes are capped by net.core.[rw]mem_max; as root the
        // FORCE variants are not.
        let _ = sock.set_recv_buffer_size(SOCKET_BUFFER);
        let _ = sock.set_send_buffer_size(SOCKET_BUFFER);
        force_buffers(sock.as_raw_fd());
        bypass_qdisc(sock.as_raw_fd());
        // SAFETY: the AsyncFd owns the socket, whose descriptor stays open and the same
        // until the AsyncFd drops.
        let fd = unsafe { AsyncFd::register(sock) }.map_err(|e| AoeError::Socket {
            iface: iface.to_string(),
            op: "register with the runtime",
            error: e.into(),
        })?;
        Ok(AoeSocket {
            fd,
            iface: iface.to_string(),
            ifindex,
            mac,
            mtu,
        })
    }

    /// Receive one frame into `buf`; `Ok(None)` when none is waiting.
    pub fn try_recv(&self, buf: &mut [u8]) -> io::Result<Option<usize>> {
        loop {
            // SAFETY: buf is a valid writable slice of buf.len() bytes.
            let n = unsafe {
                libc::recv(
                    self.fd.as_raw_fd(),
                    buf.as_mut_ptr().cast(),
                    buf.len(),
                    libc::MSG_DONTWAIT | libc::MSG_TRUNC,
                )
            };
            if n >= 0 {
                // MSG_TRUNC reports the real length; a frame bigger than buf is cut.
                return Ok(Some((n as usize).min(buf.len())));
            }
            let e = io::Error::last_os_error();
            match e.kind() {
                io::ErrorKind::WouldBlock => return Ok(None),
                io::ErrorKind::Interrupted => continue,
                _ => return Err(e),
            }
        }
    }

    /// Wait until a frame may be waiting; clears readiness so the next wait blocks.
    pub async fn readable(&self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        guard.clear_ready();
        Ok(())
    }

    /// Send one frame made of `head` then `data` (sector payload straight from the
    /// caller's buffer: no copy into a frame buffer).
    pub fn send(&self, head: &[u8], data: &[u8]) -> io::Result<()> {
        let iov = [
            libc::iovec {
                iov_base: head.as_ptr() as *mut _,
                iov_len: head.len(),
            },
            libc::iovec {
                iov_base: data.as_ptr() as *mut _,
                iov_len: data.len(),
            },
        ];
        // SAFETY: msghdr is plain data; zeroed is a valid "no address, no control" value.
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = iov.as_ptr() as *mut _;
        msg.msg_iovlen = if data.is_empty() { 1 } else { 2 };
        // SAFETY: msg points at iovecs over live slices for the duration of the call.
        let n = unsafe { libc::sendmsg(self.fd.as_raw_fd(), &msg, libc::MSG_DONTWAIT) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

fn raw_socket(iface: &str) -> Result<Socket, AoeError> {
    let proto = Protocol::from(i32::from(ETHERTYPE.to_be()));
    Socket::new(Domain::PACKET, Type::RAW, Some(proto)).map_err(|error| {
        match error.raw_os_error() {
            Some(libc::EPERM | libc::EACCES) => AoeError::NoPermission {
                iface: iface.to_string(),
            },
            _ => AoeError::Socket {
                iface: iface.to_string(),
                op: "socket(AF_PACKET)",
                error,
            },
        }
    })
}

fn if_index(iface: &str) -> Result<u32, AoeError> {
    let missing = || AoeError::NoInterface {
        iface: iface.to_string(),
    };
    let name = std::ffi::CString::new(iface).map_err(|_| missing())?;
    // SAFETY: name is a valid NUL-terminated string.
    let index = unsafe { libc::if_nametoindex(name.as_ptr()) };
    if index == 0 {
        return Err(missing());
    }
    Ok(index)
}

fn bind(fd: RawFd, ifindex: u32) -> io::Result<()> {
    // SAFETY: sockaddr_ll is plain data; all-zero then filled is valid.
    let mut sll: libc::sockaddr_ll = unsafe { std::mem::zeroed() };
    sll.sll_family = libc::AF_PACKET as u16;
    sll.sll_protocol = ETHERTYPE.to_be();
    sll.sll_ifindex = ifindex as i32;
    // SAFETY: sll is a valid sockaddr_ll of the given size.
    let r = unsafe {
        libc::bind(
            fd,
            (&sll as *const libc::sockaddr_ll).cast(),
            size_of::<libc::sockaddr_ll>() as u32,
        )
    };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn ifreq(iface: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; all-zero is valid.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(iface.bytes().take(15)) {
        *d = s as libc::c_char;
    }
    req
}

fn if_mtu(fd: RawFd, iface: &str) -> io::Result<usize> {
    let mut req = ifreq(iface);
    // SAFETY: SIOCGIFMTU reads the name and writes ifru_mtu of a valid ifreq.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFMTU, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl filled the mtu member of the union.
    Ok(unsafe { req.ifr_ifru.ifru_mtu }.max(0) as usize)
}

fn if_mac(fd: RawFd, iface: &str) -> io::Result<Mac> {
    let mut req = ifreq(iface);
    // SAFETY: SIOCGIFHWADDR reads the name and writes ifru_hwaddr of a valid ifreq.
    if unsafe { libc::ioctl(fd, libc::SIOCGIFHWADDR, &mut req) } < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the ioctl filled the hwaddr member of the union.
    let data = unsafe { req.ifr_ifru.ifru_hwaddr.sa_data };
    let mut mac = [0u8; 6];
    for (d, s) in mac.iter_mut().zip(data.iter()) {
        *d = *s as u8;
    }
    Ok(Mac(mac))
}

/// SO_RCVBUFFORCE/SO_SNDBUFFORCE need CAP_NET_ADMIN; without it the plain sizes stand.
fn force_buffers(fd: RawFd) {
    let size = SOCKET_BUFFER as libc::c_int;
    for opt in [libc::SO_RCVBUFFORCE, libc::SO_SNDBUFFORCE] {
        // SAFETY: a valid int option value of the right size.
        unsafe {
            libc::setsockopt(
                fd,
                libc::SOL_SOCKET,
                opt,
                (&size as *const libc::c_int).cast(),
                size_of::<libc::c_int>() as u32,
            );
        }
    }
}

/// Frames go straight to the driver, skipping the interface's queueing discipline: less
/// work per frame, and AoE has its own flow control (the window). Best effort.
fn bypass_qdisc(fd: RawFd) {
    const PACKET_QDISC_BYPASS: libc::c_int = 20; // linux/if_packet.h
    let on: libc::c_int = 1;
    // SAFETY: a valid int option value of the right size.
    unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_PACKET,
            PACKET_QDISC_BYPASS,
            (&on as *const libc::c_int).cast(),
            size_of::<libc::c_int>() as u32,
        );
    }
}
