//! Failed authentication, limited per client address: after [`AuthLimiter::MAX_FAILURES`] failures
//! within [`AuthLimiter::WINDOW`], every request from that address is refused with 429 until the
//! window that began with its first failure ends (a token cannot be guessed faster than that, and
//! a valid token from that address waits too: the guesser cannot tell a hit from a miss).
use std::{
    collections::HashMap,
    net::IpAddr,
    sync::{
        Mutex,
        atomic::{AtomicU32, AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use super::error::ApiError;

pub struct AuthLimiter {
    by_addr: Mutex<HashMap<IpAddr, Failures>>,
    refused: AtomicU64,
    limited: AtomicU64,
    /// 0: no limit.
    max_failures: AtomicU32,
    window: Duration,
}

#[derive(Clone, Copy)]
struct Failures {
    since: Instant,
    count: u32,
}

impl Default for AuthLimiter {
    fn default() -> Self {
        AuthLimiter::new(Self::MAX_FAILURES, Self::WINDOW)
    }
}

impl AuthLimiter {
    pub const MAX_FAILURES: u32 = 20;
    pub const WINDOW: Duration = Duration::from_secs(60);
    /// Addresses remembered at once; beyond it, expired entries go first, then the oldest.
    const MAX_ADDRESSES: usize = 100_000;

    pub fn new(max_failures: u32, window: Duration) -> Self {
        AuthLimiter {
            by_addr: Mutex::new(HashMap::new()),
            refused: AtomicU64::new(0),
            limited: AtomicU64::new(0),
            max_failures: AtomicU32::new(max_failures),
            window,
        }
    }

    /// Failures an address may have per window from now on (0: no limit).
    pub fn set_max_failures(&self, n: u32) {
        self.max_failures.store(n, Ordering::Relaxed);
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<IpAddr, Failures>> {
        self.by_addr.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Refuses `addr` while it is over its failures (429 with the seconds until it may try again).
    pub fn check(&self, addr: IpAddr) -> Result<(), ApiError> {
        let now = Instant::now();
        let mut map = self.map();
        let Some(f) = map.get(&addr).copied() else {
            return Ok(());
        };
        let end = f.since + self.window;
        if now >= end {
            map.remove(&addr);
            return Ok(());
        }
        let max = self.max_failures.load(Ordering::Relaxed);
        if max == 0 || f.count < max {
            return Ok(());
        }
        drop(map);
        self.limited.fetch_add(1, Ordering::Relaxed);
        let wait = (end - now).as_secs().max(1);
        Err(ApiError {
            retry_after: Some(wait),
            ..ApiError::new(
                429,
                "too_many_auth_failures",
                format!(
                    "{max} failed authentications from this address within {} s: try again in \
                     {wait} s",
                    self.window.as_secs()
                ),
            )
        })
    }

    /// Counts a failed authentication from `addr`.
    pub fn failed(&self, addr: IpAddr) {
        self.refused.fetch_add(1, Ordering::Relaxed);
        let now = Instant::now();
        let mut map = self.map();
        if map.len() >= Self::MAX_ADDRESSES && !map.contains_key(&addr) {
            let window = self.window;
            map.retain(|_, f| now < f.since + window);
            if map.len() >= Self::MAX_ADDRESSES
                && let Some(oldest) = map.iter().min_by_key(|(_, f)| f.since).map(|(a, _)| *a)
            {
                map.remove(&oldest);
            }
        }
        let f = map.entry(addr).or_insert(Failures {
            since: now,
            count: 0,
        });
        if now >= f.since + self.window {
            *f = Failures {
                since: now,
                count: 0,
            };
        }
        f.count = f.count.saturating_add(1);
    }

    /// Failed authentications so far, and requests refused for too many of them.
    pub fn counts(&self) -> (u64, u64) {
        (
            self.refused.load(Ordering::Relaxed),
            self.limited.load(Ordering::Relaxed),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_address_is_refused_after_its_failures_until_the_window_ends() {
        let l = AuthLimiter::new(3, Duration::from_millis(300));
        let a: IpAddr = "198.18.0.1".parse().unwrap();
        let b: IpAddr = "2001:db8::1".parse().unwrap();
        for _ in 0..3 {
            assert!(l.check(a).is_ok());
            l.failed(a);
        }
        let e = l.check(a).unwrap_err();
        assert_eq!((e.status, e.code), (429, "too_many_auth_failures"));
        assert!(e.retry_after.is_some());
        assert!(l.check(b).is_ok(), "another address is not limited");
        assert_eq!(l.counts(), (3, 1));
        let deadline = Instant::now() + Duration::from_secs(5);
        while l.check(a).is_err() {
            assert!(Instant::now() < deadline, "the window never ended");
            std::thread::sleep(Duration::from_millis(20));
        }
        l.failed(a);
        assert!(l.check(a).is_ok(), "a new window starts from one failure");
        l.set_max_failures(0);
        for _ in 0..10 {
            l.failed(b);
        }
        assert!(l.check(b).is_ok(), "0: no limit");
    }
}
