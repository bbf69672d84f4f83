//! TCP settings every remote member's connection gets.

use std::time::Duration;

use socket2::{SockRef, TcpKeepalive};
use tokio::net::TcpStream;

/// Requests are small and latency-bound: no Nagle. Keepalive probes (10 s idle, then every
/// 5 s, 3 tries) and TCP_USER_TIMEOUT (`user_timeout`: how long sent data may stay
/// unacknowledged) turn a silently dead peer into a dead connection, even mid-transfer.
/// Failures only lose those benefits, so they are logged (naming `proto`), not fatal.
pub(crate) fn tune(s: &TcpStream, user_timeout: Duration, proto: &str) {
    let sock = SockRef::from(s);
    let keepalive = TcpKeepalive::new()
        .with_time(Duration::from_secs(10))
        .with_interval(Duration::from_secs(5))
        .with_retries(3);
    let results = [
        sock.set_nodelay(true),
        sock.set_tcp_keepalive(&keepalive),
        sock.set_tcp_user_timeout(Some(user_timeout)),
    ];
    for e in results.into_iter().filter_map(Result::err) {
        tracing::warn!(error = %e, "cannot set a TCP option on an {proto} connection");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A dead peer must become a dead connection: keepalive, TCP_USER_TIMEOUT equal to
    /// the given deadline, and no Nagle delay.
    #[tokio::test]
    async fn connections_get_keepalive_user_timeout_and_nodelay() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let s = TcpStream::connect(listener.local_addr().unwrap())
            .await
            .unwrap();
        tune(&s, Duration::from_secs(7), "test");
        let sock = SockRef::from(&s);
        assert!(sock.nodelay().unwrap());
        assert!(sock.keepalive().unwrap());
        assert_eq!(sock.keepalive_time().unwrap(), Duration::from_secs(10));
        assert_eq!(sock.keepalive_interval().unwrap(), Duration::from_secs(5));
        assert_eq!(sock.keepalive_retries().unwrap(), 3);
        assert_eq!(
            sock.tcp_user_timeout().unwrap(),
            Some(Duration::from_secs(7))
        );
    }
}
