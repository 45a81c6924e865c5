//! Serves an axum router over plain HTTP or HTTPS (rustls), with the client's address in every
//! request (`ConnectInfo<SocketAddr>`, for per-address rate limits). A plaintext request on an
//! HTTPS port gets a one-line 400 naming the problem instead of a bare reset. And the one
//! client the gateway needs: [`get`], a single HTTP/1.1 GET (the `status` command's).

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioIo, TokioTimer};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

/// A client that has not finished its TLS handshake by then is dropped.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// The next connection on `listener`. An accept that fails (out of file descriptors and the
/// like) is logged and tried again 100 ms later instead of spinning.
pub async fn accept(listener: &TcpListener) -> (TcpStream, SocketAddr) {
    loop {
        match listener.accept().await {
            Ok(accepted) => return accepted,
            Err(e) => {
                tracing::warn!("cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
}

/// The TLS side of `tcp`, if its handshake completes within [`HANDSHAKE_TIMEOUT`]; why not is
/// logged (debug) with the peer's address.
pub async fn handshake(
    acceptor: &tokio_rustls::TlsAcceptor,
    tcp: TcpStream,
    addr: SocketAddr,
) -> Option<tokio_rustls::server::TlsStream<TcpStream>> {
    match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
        Ok(Ok(tls)) => Some(tls),
        Ok(Err(e)) => {
            tracing::debug!(%addr, "TLS handshake failed: {e}");
            None
        }
        Err(_) => {
            tracing::debug!(%addr, "TLS handshake timed out");
            None
        }
    }
}

/// Serves `router` on `listener` until the process ends: HTTPS with `tls`, plain HTTP without.
pub async fn serve(
    listener: TcpListener,
    tls: Option<Arc<rustls::ServerConfig>>,
    router: Router,
) -> std::io::Result<()> {
    let Some(config) = tls else {
        return axum::serve(listener, router.into_make_service_with_connect_info::<SocketAddr>())
            .await;
    };
    let acceptor = tokio_rustls::TlsAcceptor::from(config);
    loop {
        let (tcp, addr) = accept(&listener).await;
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            if speaks_plain_http(&tcp).await {
                return refuse_plaintext(tcp).await;
            }
            let Some(tls) = handshake(&acceptor, tcp, addr).await else { return };
            let service = hyper::service::service_fn(move |mut request| {
                request.extensions_mut().insert(ConnectInfo(addr));
                tower::ServiceExt::oneshot(router.clone(), request)
            });
            // HTTP/1.1 only (no h2 in the gateway's binary); the timer bounds how long a
            // client may take to send its headers.
            let served = hyper::server::conn::http1::Builder::new()
                .timer(TokioTimer::new())
                .header_read_timeout(HANDSHAKE_TIMEOUT)
                .serve_connection(TokioIo::new(tls), service)
                .with_upgrades()
                .await;
            if let Err(e) = served {
                tracing::debug!(%addr, "connection ended: {e}");
            }
        });
    }
}

/// A TLS connection opens with a handshake record (0x16); a plain HTTP request with a method
/// name in ASCII letters.
async fn speaks_plain_http(tcp: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    let peeked = tokio::time::timeout(HANDSHAKE_TIMEOUT, tcp.peek(&mut first)).await;
    matches!(peeked, Ok(Ok(1))) && first[0].is_ascii_alphabetic()
}

async fn refuse_plaintext(mut tcp: TcpStream) {
    let body = "this server speaks HTTPS only; use https://\n";
    let answer = format!(
        "HTTP/1.1 400 Bad Request\r\ncontent-type: text/plain\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.write_all(answer.as_bytes()).await;
    let _ = tcp.shutdown().await;
}

/// Headers every Millwright page and API answer carries: no framing, no MIME sniffing, no
/// referrer, the given content security policy, no caching, and HSTS over HTTPS. Headers the
/// handler set itself are kept.
pub fn secure_headers(headers: &mut axum::http::HeaderMap, policy: &'static str, https: bool) {
    use axum::http::{HeaderValue, header};
    let mut set = |name: header::HeaderName, value: &'static str| {
        headers.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::REFERRER_POLICY, "no-referrer");
    set(header::CONTENT_SECURITY_POLICY, policy);
    set(header::CACHE_CONTROL, "no-store");
    if https {
        set(header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    }
}

/// Whether a state-changing request comes from a page of this same origin: browsers send
/// `Sec-Fetch-Site` and `Origin` on cross-site form posts, so a forged form on another site
/// is told apart from the gateway's own page. Requests without either (curl, the CLI) pass.
pub fn same_origin(headers: &axum::http::HeaderMap) -> bool {
    use axum::http::header;
    if let Some(site) = headers.get("sec-fetch-site").and_then(|v| v.to_str().ok())
        && site != "same-origin"
        && site != "none"
    {
        return false;
    }
    let Some(origin) = headers.get(header::ORIGIN) else { return true };
    let host = headers.get(header::HOST).and_then(|v| v.to_str().ok());
    let origin = origin.to_str().ok();
    let origin_host =
        origin.and_then(|o| o.strip_prefix("https://").or_else(|| o.strip_prefix("http://")));
    matches!((origin_host, host), (Some(o), Some(h)) if o.eq_ignore_ascii_case(h))
}

/// Why a [`get`] failed.
#[derive(Debug, thiserror::Error)]
pub enum GetError {
    #[error("{0:?} is not an http:// or https:// URL with a host")]
    Url(String),
    #[error("an https:// URL needs the CA its certificate chains to")]
    NoCa,
    #[error("no answer within {0:?}")]
    Timeout(Duration),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Http(#[from] hyper::Error),
}

/// GETs `url` (`http://` or `https://`, whose certificate must chain to `tls`'s roots) and
/// returns the status code and up to `limit` bytes of body, all within `timeout`.
pub async fn get(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    limit: usize,
    timeout: Duration,
) -> Result<(u16, Vec<u8>), GetError> {
    tokio::time::timeout(timeout, get_now(url, tls, limit))
        .await
        .map_err(|_| GetError::Timeout(timeout))?
}

async fn get_now(
    url: &str,
    tls: Option<Arc<rustls::ClientConfig>>,
    limit: usize,
) -> Result<(u16, Vec<u8>), GetError> {
    let bad = || GetError::Url(url.to_owned());
    let uri: axum::http::Uri = url.parse().map_err(|_| bad())?;
    let secure = match uri.scheme_str() {
        Some("https") => true,
        Some("http") => false,
        _ => return Err(bad()),
    };
    let authority = uri.authority().ok_or_else(bad)?.clone();
    let host = authority.host().trim_start_matches('[').trim_end_matches(']').to_owned();
    let port = authority.port_u16().unwrap_or(if secure { 443 } else { 80 });
    let path = uri.path_and_query().map_or("/", |p| p.as_str()).to_owned();
    let tcp = TcpStream::connect((host.as_str(), port)).await?;
    let request = axum::http::Request::get(path)
        .header(axum::http::header::HOST, authority.as_str())
        .body(axum::body::Body::empty())
        .map_err(|_| bad())?;
    let response = if secure {
        let config = tls.ok_or(GetError::NoCa)?;
        let name = rustls::pki_types::ServerName::try_from(host).map_err(|_| bad())?;
        let stream = tokio_rustls::TlsConnector::from(config).connect(name, tcp).await?;
        send(TokioIo::new(stream), request).await?
    } else {
        send(TokioIo::new(tcp), request).await?
    };
    let code = response.status().as_u16();
    let body = axum::body::to_bytes(axum::body::Body::new(response.into_body()), limit)
        .await
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    Ok((code, body.to_vec()))
}

async fn send<T>(
    io: TokioIo<T>,
    request: axum::http::Request<axum::body::Body>,
) -> Result<axum::http::Response<hyper::body::Incoming>, hyper::Error>
where
    T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    tokio::spawn(connection);
    sender.send_request(request).await
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderMap;

    fn headers(pairs: &[(&'static str, &'static str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, v.parse().unwrap());
        }
        h
    }

    /// A CA and a certificate for 127.0.0.1 signed by it, as PEM files in `dir`.
    fn pki(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, std::path::PathBuf) {
        let mut ca = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let ca = ca.self_signed(&ca_key).unwrap();
        let leaf_key = rcgen::KeyPair::generate().unwrap();
        let leaf = rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned()])
            .unwrap()
            .signed_by(&leaf_key, &ca, &ca_key)
            .unwrap();
        let paths = (dir.join("ca.pem"), dir.join("cert.pem"), dir.join("key.pem"));
        std::fs::write(&paths.0, ca.pem()).unwrap();
        std::fs::write(&paths.1, leaf.pem()).unwrap();
        std::fs::write(&paths.2, leaf_key.serialize_pem()).unwrap();
        paths
    }

    #[tokio::test]
    async fn get_reads_over_https_with_the_ca_and_plaintext_is_told_to_use_https() {
        let dir = tempfile::tempdir().unwrap();
        let (ca, cert, key) = pki(dir.path());
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let router = Router::new().route("/api/status", axum::routing::get(|| async { "{}" }));
        let tls = crate::tls::server_config(&cert, &key, None).unwrap();
        tokio::spawn(serve(listener, Some(tls), router));
        let client = crate::tls::client_config(&ca, None).unwrap();
        let second = Duration::from_secs(5);
        let url = format!("https://127.0.0.1:{port}/api/status");
        let (code, body) = get(&url, Some(client), 1024, second).await.unwrap();
        assert_eq!((code, body.as_slice()), (200, b"{}".as_slice()));
        let plain = format!("http://127.0.0.1:{port}/api/status");
        let (code, body) = get(&plain, None, 1024, second).await.unwrap();
        assert_eq!(code, 400);
        assert!(String::from_utf8_lossy(&body).contains("HTTPS only"));
        assert!(matches!(get(&url, None, 1024, second).await, Err(GetError::NoCa)));
        // A client trusting another CA refuses the server's certificate.
        let other = dir.path().join("other");
        std::fs::create_dir(&other).unwrap();
        let other = crate::tls::client_config(&pki(&other).0, None).unwrap();
        let refused = get(&url, Some(other), 1024, second).await;
        assert!(matches!(refused, Err(GetError::Io(_))), "{refused:?}");
        assert!(matches!(get("ftp://x/", None, 1, second).await, Err(GetError::Url(_))));
        // A browser or curl offers h2 first; the server speaks HTTP/1.1 only and must say so.
        let mut offer = (*crate::tls::client_config(&ca, None).unwrap()).clone();
        offer.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
        let tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1").unwrap();
        let tls = tokio_rustls::TlsConnector::from(Arc::new(offer)).connect(name, tcp).await;
        assert_eq!(tls.unwrap().get_ref().1.alpn_protocol(), Some(b"http/1.1".as_slice()));
    }

    #[test]
    fn cross_site_form_posts_are_told_apart_from_the_page_itself() {
        assert!(same_origin(&headers(&[("host", "gw:8090")])), "no browser headers: curl");
        assert!(same_origin(&headers(&[("host", "gw:8090"), ("origin", "https://gw:8090")])));
        assert!(same_origin(&headers(&[("host", "gw:8090"), ("sec-fetch-site", "same-origin")])));
        assert!(!same_origin(&headers(&[("host", "gw:8090"), ("origin", "http://evil.example")])));
        assert!(!same_origin(&headers(&[("host", "gw:8090"), ("origin", "null")])));
        assert!(!same_origin(&headers(&[("host", "gw:8090"), ("sec-fetch-site", "cross-site")])));
    }
}
