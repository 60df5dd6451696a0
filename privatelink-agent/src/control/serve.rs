//! Serving the API over TCP, plain or TLS, so that slow or idle clients cannot starve it: a
//! request's header and body must arrive in time, an idle connection is closed, and connections
//! beyond a cap wait in the listen backlog instead of taking file descriptors.
use std::{
    convert::Infallible,
    net::SocketAddr,
    path::Path,
    sync::{
        Arc, Mutex,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use axum::{Router, extract::ConnectInfo};
use hyper::body::Incoming;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::{
    io::{AsyncRead, AsyncWrite},
    net::TcpListener,
    sync::Semaphore,
};
use tokio_rustls::{TlsAcceptor, rustls};

use super::http::BodyTimeout;

/// How long clients may take, and how many may be connected at once.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Limits {
    /// A request's header (or a TLS handshake) must arrive within this.
    pub header_read_timeout: Duration,
    /// A request's body must arrive within this.
    pub body_read_timeout: Duration,
    /// A connection without a request for this long is closed.
    pub idle_timeout: Duration,
    /// Connections at once; more wait in the listen backlog until one closes.
    pub max_connections: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(10),
            body_read_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(60),
            max_connections: 4096,
        }
    }
}

/// Where and how to serve the API.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Serving {
    pub listen: SocketAddr,
    pub limits: Limits,
    /// The PEM certificate chain and key: TLS when given.
    pub tls: Option<(std::path::PathBuf, std::path::PathBuf)>,
    /// Failed authentications per client address and minute before it is refused (0: no limit).
    pub auth_failures_per_minute: u32,
    /// The URL other API servers reach this one at (a node publishes it with its reports, so that
    /// any server can sum a link's history over the nodes that carried it).
    pub advertise: Option<String>,
}

impl Serving {
    /// Binds the listener and loads the TLS files; says how it serves (and warns about plain HTTP
    /// off loopback). Errors name the address or file.
    pub async fn bind(&self) -> anyhow::Result<(TcpListener, Option<TlsAcceptor>)> {
        use anyhow::Context as _;
        let tls = match &self.tls {
            Some((c, k)) => Some(tls_acceptor(c, k).context("api TLS")?),
            None => None,
        };
        let listener = TcpListener::bind(self.listen)
            .await
            .with_context(|| format!("api.listen: binding {}", self.listen))?;
        if let Some(fds) = raise_fd_limit() {
            log::debug!("open-file limit {fds}");
        }
        let scheme = if tls.is_some() { "https" } else { "http" };
        log::info!("control-plane API on {scheme}://{}", self.listen);
        if let Some(w) = plain_http_warning(self.listen, tls.is_some()) {
            log::warn!("{w}");
        }
        Ok((listener, tls))
    }
}

/// The URL to advertise: the one configured (checked: `http://` or `https://`, a host, no path
/// beyond `/`), else the listen address when other hosts can reach it (not loopback, not
/// unspecified), else none.
pub fn advertised(
    configured: Option<&str>,
    listen: SocketAddr,
    tls: bool,
) -> Result<Option<String>, String> {
    match configured {
        Some(u) => {
            let rest = u
                .strip_prefix("http://")
                .or_else(|| u.strip_prefix("https://"))
                .ok_or_else(|| format!("{u:?}: an http:// or https:// URL"))?;
            let host = rest.strip_suffix('/').unwrap_or(rest);
            if host.is_empty() || host.contains(['/', '?', '#', '@', ' ']) {
                return Err(format!("{u:?}: scheme and host[:port] only"));
            }
            Ok(Some(format!("{}{host}", &u[..u.len() - rest.len()])))
        }
        None if listen.ip().is_loopback() || listen.ip().is_unspecified() => Ok(None),
        None => Ok(Some(format!(
            "{}://{listen}",
            if tls { "https" } else { "http" }
        ))),
    }
}

/// Why the TLS certificate or key could not be used.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate in it")]
    NoCertificate { path: String },
    #[error("{path}: no PEM private key in it (PKCS#8, PKCS#1 or SEC1)")]
    NoKey { path: String },
    #[error("the certificate and key do not make a TLS configuration: {0}")]
    Config(#[from] rustls::Error),
}

/// A TLS server configuration from PEM files: the certificate chain (leaf first) and its key.
pub fn tls_acceptor(cert: &Path, key: &Path) -> Result<TlsAcceptor, TlsError> {
    use rustls::pki_types::{CertificateDer, PrivateKeyDer, pem::PemObject};
    let read = |p: &Path| {
        std::fs::read(p).map_err(|source| TlsError::Read {
            path: p.display().to_string(),
            source,
        })
    };
    let cert_pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
        .filter_map(Result::ok)
        .collect();
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.display().to_string(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_slice(&read(key)?).map_err(|_| TlsError::NoKey {
        path: key.display().to_string(),
    })?;
    // ring, not aws-lc-rs: no C toolchain or cmake in the build. It offers no post-quantum key
    // exchange, which is why rustls marks it deprecated.
    #[allow(deprecated)]
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_single_cert(chain, key_der)?;
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// The warning for a plain-HTTP API on an address other hosts can reach (tokens would cross the
/// network in clear text), if that is what `addr` without TLS is.
pub fn plain_http_warning(addr: SocketAddr, tls: bool) -> Option<String> {
    (!tls && !addr.ip().is_loopback()).then(|| {
        format!(
            "the API serves plain HTTP on {addr}, which is not loopback: bearer tokens cross the \
             network unencrypted; set [api] tls_cert and tls_key (or --tls-cert/--tls-key)"
        )
    })
}

/// Whether a request came over TLS (a request extension set by the server): the console's cookie
/// is then `Secure`.
#[derive(Clone, Copy, Debug, Default)]
pub struct OverTls(pub bool);

/// Serves `app` on `listener` until the task is dropped. Each request carries the peer address
/// (`ConnectInfo<SocketAddr>`), the body timeout and whether it came over TLS ([`OverTls`]).
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<TlsAcceptor>,
) -> std::io::Result<()> {
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    loop {
        let permit = slots
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        let (stream, peer) = match listener.accept().await {
            Ok(v) => v,
            Err(e) => {
                // Out of file descriptors or similar: back off instead of spinning.
                log::warn!("API: accepting a connection failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let (app, limits, tls) = (app.clone(), limits.clone(), tls.clone());
        tokio::spawn(async move {
            let _permit = permit;
            match tls {
                None => connection(stream, peer, app, &limits, false).await,
                Some(acceptor) => {
                    match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(stream))
                        .await
                    {
                        Ok(Ok(s)) => connection(s, peer, app, &limits, true).await,
                        Ok(Err(e)) => log::debug!("API: TLS handshake with {peer} failed: {e}"),
                        Err(_) => log::debug!("API: TLS handshake with {peer} timed out"),
                    }
                }
            }
        });
    }
}

/// Requests in flight and when the last one began or ended.
struct Activity {
    in_flight: AtomicUsize,
    last: Mutex<Instant>,
}

impl Activity {
    fn touch(&self) {
        *self.last.lock().unwrap_or_else(|p| p.into_inner()) = Instant::now();
    }

    fn idle_for(&self) -> Option<Duration> {
        (self.in_flight.load(Ordering::Acquire) == 0).then(|| {
            self.last
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .elapsed()
        })
    }
}

/// Ends a request's accounting however its future ends.
struct InFlight(Arc<Activity>);

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.touch();
        self.0.in_flight.fetch_sub(1, Ordering::AcqRel);
    }
}

async fn connection<I>(io: I, peer: SocketAddr, app: Router, limits: &Limits, tls: bool)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        in_flight: AtomicUsize::new(0),
        last: Mutex::new(Instant::now()),
    });
    let body_timeout = BodyTimeout(limits.body_read_timeout);
    let seen = activity.clone();
    let service = hyper::service::service_fn(move |mut req: hyper::Request<Incoming>| {
        seen.in_flight.fetch_add(1, Ordering::AcqRel);
        seen.touch();
        let guard = InFlight(seen.clone());
        req.extensions_mut().insert(ConnectInfo(peer));
        req.extensions_mut().insert(body_timeout);
        req.extensions_mut().insert(OverTls(tls));
        let app = app.clone();
        async move {
            let r = tower::ServiceExt::oneshot(app, req).await;
            drop(guard);
            Ok::<_, Infallible>(r.unwrap_or_else(|never| match never {}))
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .serve_connection(TokioIo::new(io), service);
    tokio::pin!(conn);
    let tick = (limits.idle_timeout / 4).clamp(Duration::from_millis(50), Duration::from_secs(1));
    let mut closing = false;
    loop {
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    log::debug!("API: connection from {peer}: {e}");
                }
                return;
            }
            _ = tokio::time::sleep(tick), if !closing => {
                if activity.idle_for().is_some_and(|d| d >= limits.idle_timeout) {
                    conn.as_mut().graceful_shutdown();
                    closing = true;
                }
            }
        }
    }
}

/// Raises this process's open-file limit to its hard limit, so that the connection cap, not the
/// descriptor limit, bounds the API (a soft limit of 1024 is common). Returns the new soft limit.
pub fn raise_fd_limit() -> Option<u64> {
    let mut lim = libc_rlimit()?;
    if lim.0 < lim.1 {
        lim.0 = lim.1;
        set_rlimit(lim)?;
    }
    Some(lim.0)
}

fn libc_rlimit() -> Option<(u64, u64)> {
    let mut r = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one rlimit into the struct it is given.
    (unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut r) } == 0)
        .then_some((r.rlim_cur, r.rlim_max))
}

fn set_rlimit((cur, max): (u64, u64)) -> Option<()> {
    let r = libc::rlimit {
        rlim_cur: cur,
        rlim_max: max,
    };
    // SAFETY: setrlimit reads one rlimit from the struct it is given.
    (unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &r) } == 0).then_some(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_http_off_loopback_is_warned_about() {
        let lo: SocketAddr = "127.0.0.1:7070".parse().unwrap();
        let lo6: SocketAddr = "[::1]:7070".parse().unwrap();
        let any: SocketAddr = "0.0.0.0:7070".parse().unwrap();
        let lan: SocketAddr = "198.18.0.1:7070".parse().unwrap();
        assert_eq!(plain_http_warning(lo, false), None);
        assert_eq!(plain_http_warning(lo6, false), None);
        assert!(
            plain_http_warning(any, false)
                .unwrap()
                .contains("unencrypted")
        );
        assert!(plain_http_warning(lan, false).is_some());
        assert_eq!(plain_http_warning(lan, true), None, "TLS: no warning");
    }

    #[test]
    fn tls_files_that_are_not_pem_are_refused_by_name() {
        let dir = std::env::temp_dir().join(format!("pl-tls-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let junk = dir.join("junk.pem");
        std::fs::write(&junk, "not a certificate").unwrap();
        let e = tls_acceptor(&junk, &junk).err().unwrap();
        assert!(matches!(e, TlsError::NoCertificate { .. }), "{e}");
        let e = tls_acceptor(&dir.join("missing.pem"), &junk).err().unwrap();
        assert!(e.to_string().contains("missing.pem"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
