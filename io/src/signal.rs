//! Process shutdown: SIGTERM (systemd, `kill`) or ctrl-c. Shared by both daemons.

/// Completes on the first SIGTERM or ctrl-c.
pub async fn shutdown() {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()).ok();
    let sigterm = async {
        match term.as_mut() {
            Some(t) => {
                t.recv().await;
            }
            None => std::future::pending::<()>().await,
        }
    };
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = sigterm => {}
    }
    tracing::info!("shutdown requested");
}
