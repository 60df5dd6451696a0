//! Console sessions. A browser that signs in with an account token gets an opaque session id in a
//! cookie that scripts cannot read (`HttpOnly`) and that other sites' requests do not carry
//! (`SameSite=Strict`); the token itself stays on the server. Every request made with the cookie
//! must also carry the session's CSRF token in [`CSRF_HEADER`]: a page on another origin can make
//! the browser send the cookie only in top-level navigations, and can never read the CSRF token or
//! set the header (no CORS is granted). The token is checked again on every request, so revoking
//! it ends its sessions at once.
use std::{
    collections::HashMap,
    sync::Mutex,
    time::{Duration, Instant},
};

use sha2::{Digest, Sha256};

use super::error::ApiError;

/// The session cookie's name.
pub const COOKIE: &str = "pl_session";
/// The request header that must carry the session's CSRF token.
pub const CSRF_HEADER: &str = "x-csrf-token";

struct Session {
    token: String,
    csrf: [u8; 32],
    started: Instant,
    used: Instant,
}

/// The sessions of one API server (a browser signs in again at another server).
pub struct Sessions {
    /// By SHA-256 of the session id: a lookup's timing says nothing about the ids held.
    by_id: Mutex<HashMap<[u8; 32], Session>>,
    idle: Duration,
    lifetime: Duration,
}

/// A new session: the cookie value and the CSRF token, both 32 random bytes in hex.
pub struct Started {
    pub id: String,
    pub csrf: String,
}

impl Default for Sessions {
    fn default() -> Self {
        Sessions::new(Self::IDLE, Self::LIFETIME)
    }
}

fn random32() -> [u8; 32] {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).expect("the OS random source");
    b
}

fn digest(s: &str) -> [u8; 32] {
    Sha256::digest(s.as_bytes()).into()
}

impl Sessions {
    /// A session unused this long ends.
    pub const IDLE: Duration = Duration::from_secs(30 * 60);
    /// A session ends this long after sign-in, used or not.
    pub const LIFETIME: Duration = Duration::from_secs(12 * 3600);
    /// Sessions held at once; beyond it, the least recently used one ends.
    const MAX: usize = 10_000;

    pub fn new(idle: Duration, lifetime: Duration) -> Self {
        Sessions {
            by_id: Mutex::new(HashMap::new()),
            idle,
            lifetime,
        }
    }

    fn map(&self) -> std::sync::MutexGuard<'_, HashMap<[u8; 32], Session>> {
        self.by_id.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn live(&self, s: &Session, now: Instant) -> bool {
        now.duration_since(s.used) < self.idle && now.duration_since(s.started) < self.lifetime
    }

    /// Starts a session for `token` (already authenticated by the caller).
    pub fn start(&self, token: &str) -> Started {
        let now = Instant::now();
        let (id, csrf) = (hex::encode(random32()), random32());
        let mut map = self.map();
        map.retain(|_, s| self.live(s, now));
        if map.len() >= Self::MAX
            && let Some(oldest) = map.iter().min_by_key(|(_, s)| s.used).map(|(k, _)| *k)
        {
            map.remove(&oldest);
        }
        map.insert(
            digest(&id),
            Session {
                token: token.to_string(),
                csrf,
                started: now,
                used: now,
            },
        );
        Started {
            id,
            csrf: hex::encode(csrf),
        }
    }

    /// The token of the live session `id` when `csrf` is its CSRF token: 401 `session_expired`
    /// for an unknown or ended session, 403 `csrf` for a missing or wrong CSRF token (the session
    /// goes on: the request may come from another site).
    pub fn token(&self, id: &str, csrf: Option<&str>) -> Result<String, ApiError> {
        let now = Instant::now();
        let mut map = self.map();
        let key = digest(id);
        let s = match map.get_mut(&key) {
            Some(s) if self.live(s, now) => s,
            Some(_) => {
                map.remove(&key);
                return Err(expired());
            }
            None => return Err(expired()),
        };
        // Compared as digests: the time taken says nothing about how much of it matched.
        let given = csrf
            .and_then(|c| hex::decode(c).ok())
            .map(|c| <[u8; 32]>::from(Sha256::digest(&c)));
        if given != Some(Sha256::digest(s.csrf).into()) {
            return Err(ApiError::new(
                403,
                "csrf",
                format!(
                    "a request made with the console's session cookie must carry the session's CSRF token in {CSRF_HEADER}"
                ),
            ));
        }
        s.used = now;
        Ok(s.token.clone())
    }

    /// The token and the CSRF token of the live session `id`, which counts as used (a reloaded
    /// page asks for its CSRF token again: only a page of this origin can read the answer).
    pub fn resume(&self, id: &str) -> Result<(String, String), ApiError> {
        let now = Instant::now();
        let mut map = self.map();
        match map.get_mut(&digest(id)) {
            Some(s) if self.live(s, now) => {
                s.used = now;
                Ok((s.token.clone(), hex::encode(s.csrf)))
            }
            _ => Err(expired()),
        }
    }

    /// Ends session `id`; whether it was live.
    pub fn end(&self, id: &str) -> bool {
        self.map().remove(&digest(id)).is_some()
    }

    /// Sessions held now (ended ones are dropped as new ones start).
    pub fn len(&self) -> usize {
        let now = Instant::now();
        self.map().values().filter(|s| self.live(s, now)).count()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// 401 `session_expired`: the session is unknown or ended.
pub fn expired() -> ApiError {
    ApiError::new(
        401,
        "session_expired",
        "the console session ended or is unknown: sign in again",
    )
}

/// The value of cookie `name` in a request's `Cookie` headers.
pub fn cookie(headers: &axum::http::HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(axum::http::header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(cookie::Cookie::split_parse)
        .filter_map(Result::ok)
        .find(|c| c.name() == name)
        .map(|c| c.value().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_session_needs_its_own_csrf_token_and_ends() {
        let s = Sessions::new(Duration::from_millis(200), Duration::from_secs(60));
        let a = s.start("tok-a");
        let b = s.start("tok-b");
        assert_eq!(s.token(&a.id, Some(&a.csrf)).unwrap(), "tok-a");
        for csrf in [None, Some(""), Some("zz"), Some(b.csrf.as_str())] {
            assert_eq!(s.token(&a.id, csrf).unwrap_err().status, 403, "{csrf:?}");
        }
        // A forged or guessed id is unknown; another session's id gives that session's token.
        assert_eq!(s.token(&a.csrf, Some(&a.csrf)).unwrap_err().status, 401);
        assert_eq!(s.token(&b.id, Some(&b.csrf)).unwrap(), "tok-b");
        assert!(s.end(&a.id));
        assert_eq!(s.token(&a.id, Some(&a.csrf)).unwrap_err().status, 401);
        assert!(!s.end(&a.id), "ended once");
        assert_eq!(s.resume(&b.id).unwrap(), ("tok-b".into(), b.csrf.clone()));
        // Idle past its limit (counting live sessions does not use them).
        let wait = Instant::now();
        while !s.is_empty() {
            assert!(wait.elapsed() < Duration::from_secs(5));
            std::thread::sleep(Duration::from_millis(20));
        }
        assert_eq!(s.token(&b.id, Some(&b.csrf)).unwrap_err().status, 401);
        assert_eq!(s.resume(&b.id).unwrap_err().status, 401);
    }

    #[test]
    fn cookies_are_read_from_every_cookie_header() {
        let mut h = axum::http::HeaderMap::new();
        h.append("cookie", "a=1; pl_session=abc".parse().unwrap());
        h.append("cookie", "x=2".parse().unwrap());
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("abc"));
        assert_eq!(cookie(&h, "x").as_deref(), Some("2"));
        assert_eq!(cookie(&h, "pl"), None);
    }
}
