//! Wakes the agent when network interfaces change (rtnetlink RTMGRP_LINK): new, deleted, up, down.
//! The messages only say "look again"; the agent rescans the interfaces it wants.
use std::{io, os::fd::OwnedFd};

use nix::sys::socket::{
    AddressFamily, MsgFlags, NetlinkAddr, SockFlag, SockProtocol, SockType, bind, recv, socket,
};
use tokio::io::unix::AsyncFd;

/// rtnetlink multicast group of link events.
const RTMGRP_LINK: u32 = 1;

pub struct LinkWatch {
    fd: AsyncFd<OwnedFd>,
}

impl LinkWatch {
    /// Subscribes to link events of the calling thread's network namespace.
    pub fn new() -> io::Result<Self> {
        let fd = socket(
            AddressFamily::Netlink,
            SockType::Raw,
            SockFlag::SOCK_NONBLOCK | SockFlag::SOCK_CLOEXEC,
            SockProtocol::NetlinkRoute,
        )?;
        bind(
            std::os::fd::AsRawFd::as_raw_fd(&fd),
            &NetlinkAddr::new(0, RTMGRP_LINK),
        )?;
        // SAFETY: the OwnedFd is owned by the AsyncFd for its whole life, so the descriptor stays
        // open and as_raw_fd always returns the same one.
        let fd = unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
            .map_err(|e| io::Error::other(e.to_string()))?;
        Ok(LinkWatch { fd })
    }

    /// Waits for at least one link event, then drains what is queued.
    pub async fn changed(&mut self) -> io::Result<()> {
        let mut guard = self.fd.readable().await?;
        let mut buf = [0u8; 8192];
        loop {
            match recv(
                std::os::fd::AsRawFd::as_raw_fd(guard.get_inner()),
                &mut buf,
                MsgFlags::empty(),
            ) {
                Ok(_) => continue,
                Err(nix::errno::Errno::EAGAIN) => break,
                // ENOBUFS: events were lost, which is fine: the agent rescans anyway.
                Err(nix::errno::Errno::ENOBUFS) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        guard.clear_ready();
        Ok(())
    }
}
