//! Mosquitto configuration from the device registry, pure: a TLS listener that requires a
//! client certificate of the fleet CA and takes its common name as the user name (and as the
//! client id, so nobody can take over another party's session), and an ACL file that confines
//! each enrolled device to its own topics. Revoked devices get no entries: with
//! `use_identity_as_username` a revoked device may still complete its TLS handshake until its
//! certificate expires, but it can neither publish nor subscribe, and the server refuses
//! whatever reaches it anyway.

use crate::identity::SERVER_USER;
use crate::identity_db::EnrolledRow;
use std::fmt::Write as _;
use std::path::Path;

/// An ACL granting the server the whole tree and each enrolled, unrevoked device exactly what
/// it sends (its uplink streams, status and last will, chunk requests) and receives (acks,
/// directives, chunks, the trust root). `device_reads` are extra filters every device may read
/// (e.g. a sensor topic of MQTT-fed assets on the same broker).
pub fn acl(rows: &[EnrolledRow], device_reads: &[String]) -> String {
    let mut out = String::from(
        "# Written by Millwright from its device registry; rewritten on every enrollment and\n\
         # revocation. Each device may touch only its own topics.\n\n",
    );
    let _ = writeln!(out, "user {SERVER_USER}\ntopic readwrite millwright/v1/#\n");
    for r in rows.iter().filter(|r| r.revoked_ms.is_none()) {
        let d = &r.device;
        let _ = writeln!(out, "user {d}");
        for write in ["up/+", "status", "fetch"] {
            let _ = writeln!(out, "topic write millwright/v1/{d}/{write}");
        }
        for read in ["ack", "desired", "chunk"] {
            let _ = writeln!(out, "topic read millwright/v1/{d}/{read}");
        }
        let _ = writeln!(out, "topic read millwright/v1/trust/root");
        for filter in device_reads {
            let _ = writeln!(out, "topic read {filter}");
        }
        out.push('\n');
    }
    out
}

/// Where the listener's files are.
#[derive(Debug, Clone)]
pub struct Listener<'a> {
    pub bind: &'a str,
    pub port: u16,
    pub ca: &'a Path,
    pub cert: &'a Path,
    pub key: &'a Path,
    pub acl: &'a Path,
}

/// A `mosquitto.conf` fragment for the fleet's listener.
pub fn config(l: &Listener<'_>) -> String {
    format!(
        "# Written by `millwright broker mosquitto-config`: the Millwright fleet listener.\n\
         per_listener_settings true\n\
         listener {port} {bind}\n\
         cafile {ca}\n\
         certfile {cert}\n\
         keyfile {key}\n\
         tls_version tlsv1.2\n\
         require_certificate true\n\
         use_identity_as_username true\n\
         use_username_as_clientid true\n\
         allow_anonymous false\n\
         acl_file {acl}\n\
         # The server's sessions hold every device's messages while it catches up: Mosquitto\n\
         # silently drops QoS 1 messages queued beyond max_queued_messages (default 1000).\n\
         max_queued_messages 100000\n\
         max_packet_size 4194304\n\
         # A batch and its ack are small messages that wait for each other: without this each\n\
         # waits for the peer's delayed TCP ACK (~40 ms a hop).\n\
         set_tcp_nodelay true\n",
        port = l.port,
        bind = l.bind,
        ca = l.ca.display(),
        cert = l.cert.display(),
        key = l.key.display(),
        acl = l.acl.display(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(device: &str, revoked: bool) -> EnrolledRow {
        EnrolledRow {
            device: device.into(),
            key_id: String::new(),
            public_key: String::new(),
            cert_sha256: String::new(),
            site: None,
            tags: vec![],
            device_class: None,
            enrolled_by: "ada".into(),
            enrolled_ms: 0,
            revoked_ms: revoked.then_some(1),
            revoked_by: None,
            revoked_reason: None,
        }
    }

    #[test]
    fn each_device_gets_its_own_topics_and_revoked_ones_nothing() {
        let text = acl(&[row("gw-01", false), row("gw-02", true)], &["plant/#".into()]);
        assert!(text.contains("user millwright-server\ntopic readwrite millwright/v1/#"));
        assert!(text.contains("user gw-01\ntopic write millwright/v1/gw-01/up/+\n"));
        assert!(text.contains("topic read millwright/v1/gw-01/ack\n"));
        assert!(text.contains("topic read plant/#\n"));
        assert!(!text.contains("gw-02"), "{text}");
        assert!(!text.contains("pattern"), "no patterns: a revoked device must match nothing");
    }
}
