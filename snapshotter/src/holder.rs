//! The holder: a tiny long-lived process of tarn's own
//! (`tarn-snapshotter --fd-holder SOCK`) that keeps the /dev/fuse fd of
//! every lazy mount, so that the mount's connection outlives the daemon
//! that serves it (restart, upgrade, `kill -9`). It does nothing else: no
//! FUSE request, no network, no state but fds by mountpoint, so it has
//! nothing to upgrade and little to crash on.
//!
//! Protocol: one request per connection on a root-only `SOCK_SEQPACKET`
//! unix socket (a message is one datagram, fds ride with SCM_RIGHTS):
//!
//! - `PUT\0<mountpoint>` + 1 fd: keep it (replacing an older one); `OK`.
//! - `DROP\0<mountpoint>`: close it; `OK`.
//! - `LIST`: one `FD\0<mountpoint>` + 1 fd (a copy; the holder keeps
//!   its own) per kept fd, then `END`.
//!
//! The holder closes an fd by itself once its connection is gone (the
//! kernel reports POLLERR on it: the mount was unmounted and let go), and
//! exits after [`IDLE_EXIT`] holding nothing; a daemon that needs it again
//! starts a new one ([`Holder::ensure`]).

use std::collections::HashMap;
use std::io::{IoSlice, IoSliceMut};
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use nix::sys::socket::{
    self, AddressFamily, ControlMessage, ControlMessageOwned, MsgFlags, SockFlag, SockType,
    UnixAddr,
};

/// The holder's socket in the daemon's root.
pub const SOCKET_NAME: &str = "holder.sock";
/// Beside the socket: the holder's pid (for operators and tests that must
/// stop it; the daemon never does).
pub const PID_FILE: &str = "holder.pid";
/// Holding nothing this long, the holder exits.
pub const IDLE_EXIT: Duration = Duration::from_secs(30);
/// Largest message: a verb and a mountpoint (PATH_MAX).
const MAX_MESSAGE: usize = 4096 + 16;
/// How long one client may take over one request, either side.
const CLIENT_TIMEOUT: Duration = Duration::from_secs(5);
/// At most this many fds are kept (one per lazy layer).
const MAX_FDS: usize = 4096;
/// How long a started holder may take to listen.
const START_WAIT: Duration = Duration::from_secs(5);

#[derive(Debug, thiserror::Error)]
pub enum HolderError {
    #[error("holder socket {path}: {source}")]
    Socket { path: PathBuf, source: nix::Error },
    #[error("starting the holder {program}")]
    Spawn {
        program: PathBuf,
        source: std::io::Error,
    },
    #[error("the holder did not listen on {0} in time")]
    NotStarted(PathBuf),
    #[error("the holder answered {0:?}")]
    Protocol(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// The daemon's side: talks to the holder at one socket, starting it when
/// it is not there.
#[derive(Clone, Debug)]
pub struct Holder {
    socket: PathBuf,
    program: PathBuf,
}

impl Holder {
    /// The holder at `socket`, started as `program --fd-holder socket`.
    pub fn new(socket: PathBuf, program: PathBuf) -> Holder {
        Holder { socket, program }
    }

    pub fn socket(&self) -> &Path {
        &self.socket
    }

    /// Makes sure a holder listens, starting one if none does. The holder
    /// gets a process group of its own, so that signals meant for the
    /// daemon's group (a terminal's ^C, a supervisor's group kill without
    /// systemd) do not reach it.
    pub fn ensure(&self) -> Result<(), HolderError> {
        if self.connect().is_ok() {
            return Ok(());
        }
        use std::os::unix::process::CommandExt;
        let spawn_error = |source| HolderError::Spawn {
            program: self.program.clone(),
            source,
        };
        let mut child = std::process::Command::new(&self.program)
            .arg("--fd-holder")
            .arg(&self.socket)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()
            .map_err(spawn_error)?;
        let deadline = Instant::now() + START_WAIT;
        while Instant::now() < deadline {
            if self.connect().is_ok() {
                // Reaped by nobody while it runs; once it exits it is a
                // zombie of this process until this process exits too.
                std::thread::spawn(move || child.wait());
                return Ok(());
            }
            if let Ok(Some(_)) = child.try_wait() {
                // Lost a race with another holder that listens now, or failed.
                return self.connect().map(drop).map_err(|_| self.not_started());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Err(self.not_started())
    }

    fn not_started(&self) -> HolderError {
        HolderError::NotStarted(self.socket.clone())
    }

    /// Hands `fd` (the connection of `mountpoint`) to the holder.
    pub fn put(&self, mountpoint: &Path, fd: BorrowedFd<'_>) -> Result<(), HolderError> {
        let request = message("PUT", mountpoint);
        let ask = || self.request(&request, Some(fd)).and_then(expect_ok);
        match ask() {
            Ok(()) => Ok(()),
            // The holder exits when idle: start one and ask again.
            Err(_) => {
                self.ensure()?;
                ask()
            }
        }
    }

    /// Tells the holder to close the connection of `mountpoint`.
    pub fn drop_fd(&self, mountpoint: &Path) -> Result<(), HolderError> {
        match self.connect() {
            // No holder, nothing held.
            Err(_) => Ok(()),
            Ok(sock) => {
                send(&sock, &message("DROP", mountpoint), None).map_err(|e| self.error(e))?;
                expect_ok(receive(&sock).map_err(|e| self.error(e))?)
            }
        }
    }

    /// Copies of every fd the holder keeps, by mountpoint; none if no
    /// holder runs.
    pub fn list(&self) -> Result<HashMap<PathBuf, OwnedFd>, HolderError> {
        let Ok(sock) = self.connect() else {
            return Ok(HashMap::new());
        };
        send(&sock, b"LIST", None).map_err(|e| self.error(e))?;
        let mut out = HashMap::new();
        loop {
            let (text, fd) = receive(&sock).map_err(|e| self.error(e))?;
            if text == b"END" {
                return Ok(out);
            }
            match (text.strip_prefix(b"FD\0"), fd) {
                (Some(path), Some(fd)) if out.len() < MAX_FDS => {
                    out.insert(PathBuf::from(std::ffi::OsStr::from_bytes(path)), fd);
                }
                _ => return Err(protocol(&text)),
            }
        }
    }

    fn request(
        &self,
        request: &[u8],
        fd: Option<BorrowedFd<'_>>,
    ) -> Result<(Vec<u8>, Option<OwnedFd>), HolderError> {
        let sock = self.connect()?;
        send(&sock, request, fd).map_err(|e| self.error(e))?;
        receive(&sock).map_err(|e| self.error(e))
    }

    fn connect(&self) -> Result<OwnedFd, HolderError> {
        let sock = seqpacket().map_err(|e| self.error(e))?;
        let addr = UnixAddr::new(&self.socket).map_err(|e| self.error(e))?;
        socket::connect(sock.as_raw_fd(), &addr).map_err(|e| self.error(e))?;
        timeouts(&sock).map_err(|e| self.error(e))?;
        Ok(sock)
    }

    fn error(&self, source: nix::Error) -> HolderError {
        HolderError::Socket {
            path: self.socket.clone(),
            source,
        }
    }
}

fn message(verb: &str, path: &Path) -> Vec<u8> {
    let mut m = verb.as_bytes().to_vec();
    m.push(0);
    m.extend_from_slice(path.as_os_str().as_bytes());
    m
}

fn expect_ok((text, _): (Vec<u8>, Option<OwnedFd>)) -> Result<(), HolderError> {
    if text == b"OK" {
        Ok(())
    } else {
        Err(protocol(&text))
    }
}

fn protocol(text: &[u8]) -> HolderError {
    HolderError::Protocol(String::from_utf8_lossy(&text[..text.len().min(200)]).into_owned())
}

fn seqpacket() -> nix::Result<OwnedFd> {
    socket::socket(
        AddressFamily::Unix,
        SockType::SeqPacket,
        SockFlag::SOCK_CLOEXEC,
        None,
    )
}

/// A peer that stops answering cannot hold either side up for long.
fn timeouts(sock: &OwnedFd) -> nix::Result<()> {
    let t = nix::sys::time::TimeVal::new(i64::try_from(CLIENT_TIMEOUT.as_secs()).unwrap_or(5), 0);
    socket::setsockopt(sock, socket::sockopt::ReceiveTimeout, &t)?;
    socket::setsockopt(sock, socket::sockopt::SendTimeout, &t)
}

fn send(sock: &OwnedFd, data: &[u8], fd: Option<BorrowedFd<'_>>) -> nix::Result<()> {
    let fds: Vec<RawFd> = fd.iter().map(|f| f.as_raw_fd()).collect();
    let cmsg = [ControlMessage::ScmRights(&fds)];
    let cmsgs: &[ControlMessage<'_>] = if fds.is_empty() { &[] } else { &cmsg };
    socket::sendmsg::<()>(
        sock.as_raw_fd(),
        &[IoSlice::new(data)],
        cmsgs,
        MsgFlags::MSG_NOSIGNAL,
        None,
    )?;
    Ok(())
}

/// One message and the fd that came with it, if any (more than one is
/// closed and refused).
fn receive(sock: &OwnedFd) -> nix::Result<(Vec<u8>, Option<OwnedFd>)> {
    let mut buf = vec![0u8; MAX_MESSAGE];
    let mut space = nix::cmsg_space!([RawFd; 4]);
    let (len, fds) = {
        let mut iov = [IoSliceMut::new(&mut buf)];
        let msg = socket::recvmsg::<()>(
            sock.as_raw_fd(),
            &mut iov,
            Some(&mut space),
            MsgFlags::MSG_CMSG_CLOEXEC,
        )?;
        let mut fds: Vec<OwnedFd> = Vec::new();
        for c in msg.cmsgs()? {
            if let ControlMessageOwned::ScmRights(raw) = c {
                // SAFETY: the kernel just installed these fds in this
                // process for this message; nothing else owns them.
                fds.extend(raw.into_iter().map(|r| unsafe { OwnedFd::from_raw_fd(r) }));
            }
        }
        (msg.bytes, fds)
    };
    buf.truncate(len);
    if fds.len() > 1 {
        return Err(nix::Error::EPROTO);
    }
    Ok((buf, fds.into_iter().next()))
}

/// The holder process: serves `socket` until it has held nothing for
/// [`IDLE_EXIT`]. Refuses to start if another holder answers there.
pub fn serve(socket: &Path) -> Result<(), HolderError> {
    let err = |source| HolderError::Socket {
        path: socket.to_owned(),
        source,
    };
    let listener = listen(socket).map_err(err)?;
    let pid_file = socket.with_file_name(PID_FILE);
    let _ = std::fs::write(&pid_file, format!("{}\n", std::process::id()));
    let mut held: HashMap<PathBuf, OwnedFd> = HashMap::new();
    let mut idle_since = Some(Instant::now());
    loop {
        reap(&mut held);
        match (held.is_empty(), idle_since) {
            (false, _) => idle_since = None,
            (true, None) => idle_since = Some(Instant::now()),
            (true, Some(t)) if t.elapsed() >= IDLE_EXIT => break,
            (true, Some(_)) => {}
        }
        let mut poll = [nix::poll::PollFd::new(
            listener.as_fd(),
            nix::poll::PollFlags::POLLIN,
        )];
        match nix::poll::poll(&mut poll, nix::poll::PollTimeout::from(1000u16)) {
            Ok(0) | Err(nix::Error::EINTR) => continue,
            Ok(_) => {}
            Err(e) => return Err(err(e)),
        }
        let Ok(raw) = socket::accept4(listener.as_raw_fd(), SockFlag::SOCK_CLOEXEC) else {
            continue;
        };
        // SAFETY: accept4 just returned this fd; nothing else owns it.
        let client = unsafe { OwnedFd::from_raw_fd(raw) };
        if timeouts(&client).is_ok() {
            // A client that misbehaves only loses its own request.
            let _ = answer(&client, &mut held);
        }
    }
    // Only ours: a new holder may already have replaced the file if this
    // one was slow to notice (it then answers there).
    drop(listener);
    if let Ok(sock) = seqpacket() {
        let answered = UnixAddr::new(socket)
            .and_then(|addr| socket::connect(sock.as_raw_fd(), &addr))
            .is_ok();
        if !answered {
            let _ = std::fs::remove_file(socket);
            let _ = std::fs::remove_file(&pid_file);
        }
    }
    Ok(())
}

fn listen(path: &Path) -> nix::Result<OwnedFd> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|_| nix::Error::ENOENT)?;
    }
    let probe = seqpacket()?;
    let addr = UnixAddr::new(path)?;
    if socket::connect(probe.as_raw_fd(), &addr).is_ok() {
        return Err(nix::Error::EADDRINUSE);
    }
    let _ = std::fs::remove_file(path);
    let sock = seqpacket()?;
    socket::bind(sock.as_raw_fd(), &addr)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))
        .map_err(|_| nix::Error::EPERM)?;
    socket::listen(&sock, socket::Backlog::new(64)?)?;
    Ok(sock)
}

/// Closes the fds whose connection the kernel has ended.
fn reap(held: &mut HashMap<PathBuf, OwnedFd>) {
    use nix::poll::{PollFd, PollFlags, PollTimeout};
    let gone: Vec<PathBuf> = held
        .iter()
        .filter(|(_, fd)| {
            // No events asked: POLLERR (an aborted connection) is always
            // reported, pending requests (POLLIN) never wake us.
            let mut p = [PollFd::new(fd.as_fd(), PollFlags::empty())];
            matches!(nix::poll::poll(&mut p, PollTimeout::ZERO), Ok(n) if n > 0)
                && p[0].revents().is_some_and(|r| {
                    r.intersects(PollFlags::POLLERR | PollFlags::POLLHUP | PollFlags::POLLNVAL)
                })
        })
        .map(|(k, _)| k.clone())
        .collect();
    for k in gone {
        held.remove(&k);
    }
}

fn answer(client: &OwnedFd, held: &mut HashMap<PathBuf, OwnedFd>) -> nix::Result<()> {
    let (text, fd) = receive(client)?;
    let path = |rest: &[u8]| PathBuf::from(std::ffi::OsStr::from_bytes(rest));
    if let Some(rest) = text.strip_prefix(b"PUT\0") {
        let reply: &[u8] = match fd {
            Some(fd) if held.len() < MAX_FDS || held.contains_key(&path(rest)) => {
                held.insert(path(rest), fd);
                b"OK"
            }
            Some(_) => b"ERR full",
            None => b"ERR no fd",
        };
        return send(client, reply, None);
    }
    if let Some(rest) = text.strip_prefix(b"DROP\0") {
        held.remove(&path(rest));
        return send(client, b"OK", None);
    }
    if text == b"LIST" {
        for (k, fd) in held.iter() {
            send(client, &message("FD", k), Some(fd.as_fd()))?;
        }
        return send(client, b"END", None);
    }
    send(client, b"ERR unknown request", None)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fds_are_kept_listed_and_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join(SOCKET_NAME);
        let s = socket.clone();
        std::thread::spawn(move || serve(&s));
        let holder = Holder::new(socket.clone(), PathBuf::from("/nonexistent"));
        wait(|| holder.connect().is_ok());
        let file = std::fs::File::open("/dev/null").unwrap();
        holder.put(Path::new("/a/fs"), file.as_fd()).unwrap();
        holder.put(Path::new("/b/fs"), file.as_fd()).unwrap();
        let listed = holder.list().unwrap();
        assert_eq!(listed.len(), 2);
        assert!(listed.contains_key(Path::new("/a/fs")));
        holder.drop_fd(Path::new("/a/fs")).unwrap();
        let listed = holder.list().unwrap();
        assert_eq!(listed.keys().collect::<Vec<_>>(), [Path::new("/b/fs")]);
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
        assert!(matches!(listen(&socket), Err(nix::Error::EADDRINUSE)));
    }

    #[test]
    fn no_holder_means_nothing_held() {
        let dir = tempfile::tempdir().unwrap();
        let holder = Holder::new(dir.path().join(SOCKET_NAME), PathBuf::from("/nonexistent"));
        assert!(holder.list().unwrap().is_empty());
        holder.drop_fd(Path::new("/a/fs")).unwrap();
        assert!(holder.ensure().is_err(), "no program to start");
    }

    fn wait(f: impl Fn() -> bool) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while !f() {
            assert!(Instant::now() < deadline, "holder did not listen");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}
