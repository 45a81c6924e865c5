//! Serves an axum router over plain HTTP or HTTPS (rustls), with the client's address in every
//! request (`ConnectInfo<SocketAddr>`, for per-address rate limits). A plaintext request on an
//! HTTPS port gets a one-line 400 naming the problem instead of a bare reset.

use axum::Router;
use axum::extract::ConnectInfo;
use hyper_util::rt::{TokioExecutor, TokioIo};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::io::AsyncWriteExt as _;
use tokio::net::{TcpListener, TcpStream};

/// A client that has not finished its TLS handshake by then is dropped.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

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
        let (tcp, addr) = match listener.accept().await {
            Ok(accepted) => accepted,
            Err(e) => {
                // Out of file descriptors and the like: wait instead of spinning.
                tracing::warn!("cannot accept a connection: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let (acceptor, router) = (acceptor.clone(), router.clone());
        tokio::spawn(async move {
            if speaks_plain_http(&tcp).await {
                return refuse_plaintext(tcp).await;
            }
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(e)) => return tracing::debug!(%addr, "TLS handshake failed: {e}"),
                Err(_) => return tracing::debug!(%addr, "TLS handshake timed out"),
            };
            let service = hyper::service::service_fn(move |mut request| {
                request.extensions_mut().insert(ConnectInfo(addr));
                tower::ServiceExt::oneshot(router.clone(), request)
            });
            let served = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                .serve_connection_with_upgrades(TokioIo::new(tls), service)
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
