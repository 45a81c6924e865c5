//! A TLS-terminating MQTT proxy for fault tests: a party connects to it as it would to the
//! broker (the proxy shows the broker's certificate), and the proxy connects on to the real
//! broker presenting that party's own client certificate, so the broker still sees who it is.
//! Between the two it reads the broker's MQTT packets and, while told to, swallows the PUBACKs:
//! the connection stays up, pings are answered, messages flow both ways, and no publish of the
//! party's is ever acknowledged (a half-open link, a wedged broker or bridge).

use millwright_io::tls::ClientIdentity;
use rustls::pki_types::ServerName;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

/// MQTT control packet type of PUBACK (the high nibble of the first byte).
const PUBACK: u8 = 4;

pub struct MqttProxy {
    /// Where the party connects instead of the broker.
    pub port: u16,
    drop_pubacks: Arc<AtomicBool>,
    dropped: Arc<AtomicU64>,
    /// Its tasks stop when it is dropped.
    _runtime: tokio::runtime::Runtime,
}

impl MqttProxy {
    /// Listens on a free loopback port with the broker's `cert`/`key`; forwards each connection
    /// to the broker at `127.0.0.1:upstream`, checked against `ca`, presenting `client`.
    pub fn start(
        ca: &Path,
        cert: &Path,
        key: &Path,
        upstream: u16,
        client: &ClientIdentity,
    ) -> anyhow::Result<MqttProxy> {
        let acceptor =
            tokio_rustls::TlsAcceptor::from(millwright_io::tls::server_config(cert, key, None)?);
        let connector =
            tokio_rustls::TlsConnector::from(millwright_io::tls::client_config(ca, Some(client))?);
        let runtime =
            tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build()?;
        let listener = runtime.block_on(TcpListener::bind("127.0.0.1:0"))?;
        let port = listener.local_addr()?.port();
        let drop_pubacks = Arc::new(AtomicBool::new(false));
        let dropped = Arc::new(AtomicU64::new(0));
        let (drop, count) = (drop_pubacks.clone(), dropped.clone());
        runtime.spawn(async move {
            while let Ok((down, _)) = listener.accept().await {
                let (acceptor, connector) = (acceptor.clone(), connector.clone());
                let (drop, count) = (drop.clone(), count.clone());
                tokio::spawn(async move {
                    let _ = relay(down, acceptor, connector, upstream, drop, count).await;
                });
            }
        });
        Ok(MqttProxy { port, drop_pubacks, dropped, _runtime: runtime })
    }

    /// From now on, swallow (or again pass) the broker's PUBACKs.
    pub fn drop_pubacks(&self, on: bool) {
        self.drop_pubacks.store(on, Ordering::SeqCst);
    }

    /// PUBACKs swallowed so far.
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::SeqCst)
    }
}

async fn relay(
    down: TcpStream,
    acceptor: tokio_rustls::TlsAcceptor,
    connector: tokio_rustls::TlsConnector,
    upstream: u16,
    drop: Arc<AtomicBool>,
    count: Arc<AtomicU64>,
) -> anyhow::Result<()> {
    let down = acceptor.accept(down).await?;
    let up = TcpStream::connect(("127.0.0.1", upstream)).await?;
    let up = connector.connect(ServerName::try_from("127.0.0.1")?, up).await?;
    let (mut down_read, mut down_write) = tokio::io::split(down);
    let (mut up_read, mut up_write) = tokio::io::split(up);
    let to_broker = async {
        let _ = tokio::io::copy(&mut down_read, &mut up_write).await;
        let _ = up_write.shutdown().await;
    };
    let from_broker = async {
        let _ = filter(&mut up_read, &mut down_write, &drop, &count).await;
        let _ = down_write.shutdown().await;
    };
    // Either side closing ends the connection.
    tokio::select! {
        _ = to_broker => {}
        _ = from_broker => {}
    }
    Ok(())
}

/// Copies whole MQTT packets from `from` to `to`, leaving out PUBACKs while `drop` is set.
async fn filter(
    from: &mut (impl AsyncRead + Unpin),
    to: &mut (impl AsyncWrite + Unpin),
    drop: &AtomicBool,
    count: &AtomicU64,
) -> anyhow::Result<()> {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = [0u8; 16 * 1024];
    loop {
        while let Some(len) = packet_len(&buf) {
            let packet: Vec<u8> = buf.drain(..len).collect();
            if packet[0] >> 4 == PUBACK && drop.load(Ordering::SeqCst) {
                count.fetch_add(1, Ordering::SeqCst);
                continue;
            }
            to.write_all(&packet).await?;
        }
        to.flush().await?;
        let n = from.read(&mut chunk).await?;
        if n == 0 {
            return Ok(());
        }
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The length of the first complete MQTT packet in `buf`, if it holds one: a type byte, a
/// variable-length "remaining length" of up to four bytes, then that many bytes.
fn packet_len(buf: &[u8]) -> Option<usize> {
    let mut remaining = 0usize;
    for i in 0..4 {
        let byte = *buf.get(1 + i)?;
        remaining |= usize::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            let total = 2 + i + remaining;
            return (buf.len() >= total).then_some(total);
        }
    }
    // A malformed length: pass the bytes on as one packet and let the party judge them.
    Some(buf.len())
}

#[cfg(test)]
mod tests {
    use super::packet_len;

    #[test]
    fn packets_are_cut_at_their_remaining_length() {
        assert_eq!(packet_len(&[]), None);
        assert_eq!(packet_len(&[0x40]), None);
        assert_eq!(packet_len(&[0x40, 0x02, 0x00]), None);
        assert_eq!(packet_len(&[0x40, 0x02, 0x00, 0x07, 0x30]), Some(4));
        assert_eq!(packet_len(&[0xd0, 0x00]), Some(2));
        // 321 = 0xc1 0x02: two length bytes.
        let mut long = vec![0x30, 0xc1, 0x02];
        long.extend(vec![0u8; 320]);
        assert_eq!(packet_len(&long), None);
        long.push(0);
        assert_eq!(packet_len(&long), Some(324));
    }
}
