//! The connector every request to a customer's URL goes through: the host is resolved (by an
//! injected resolver, so tests never leave loopback), every address is checked by
//! [`tollgate_core::egress::Guard`] on every attempt (a name that resolved to a public address
//! once and to an inside one now, DNS rebinding, is refused then), and the connection goes only
//! to an admitted address: no proxy from the environment, and a client built on it follows no
//! redirect (hyper's does not).

use async_trait::async_trait;
use hyper_util::rt::TokioIo;
use std::future::Future;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::net::TcpStream;
use tollgate_core::egress::{Guard, Refused};

/// Turns a host name into addresses.
#[async_trait]
pub trait Resolver: Send + Sync {
    async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>>;
}

/// The system's resolver (`getaddrinfo`, through tokio).
pub struct SystemResolver;

#[async_trait]
impl Resolver for SystemResolver {
    async fn resolve(&self, host: &str) -> io::Result<Vec<IpAddr>> {
        let found = tokio::net::lookup_host((host, 0)).await?;
        Ok(found.map(|address| address.ip()).collect())
    }
}

/// A `tower::Service<Uri>` connector for hyper's client that connects only where the guard
/// admits.
#[derive(Clone)]
pub struct GuardedConnector {
    guard: Arc<Guard>,
    resolver: Arc<dyn Resolver>,
    connect_timeout: Duration,
}

impl GuardedConnector {
    pub fn new(guard: Guard, resolver: Arc<dyn Resolver>, connect_timeout: Duration) -> Self {
        GuardedConnector {
            guard: Arc::new(guard),
            resolver,
            connect_timeout,
        }
    }

    /// The addresses a request to `uri` may go to, in the resolver's order.
    pub async fn admitted(&self, uri: &http::Uri) -> Result<Vec<SocketAddr>, io::Error> {
        let refused = |e: Refused| io::Error::new(io::ErrorKind::PermissionDenied, e);
        let host = uri
            .host()
            .ok_or_else(|| refused(Refused::NoHost))?
            .trim_start_matches('[')
            .trim_end_matches(']');
        let port = uri.port_u16().unwrap_or(match uri.scheme_str() {
            Some("http") => 80,
            _ => 443,
        });
        let addresses = match host.parse::<IpAddr>() {
            Ok(ip) => vec![ip],
            Err(_) => self.resolver.resolve(host).await?,
        };
        self.guard.admit_all(&addresses).map_err(refused)?;
        Ok(addresses
            .into_iter()
            .map(|ip| SocketAddr::new(ip, port))
            .collect())
    }

    async fn connect(self, uri: http::Uri) -> io::Result<TokioIo<TcpStream>> {
        let mut last = io::Error::new(io::ErrorKind::NotFound, "no address to connect to");
        for address in self.admitted(&uri).await? {
            match tokio::time::timeout(self.connect_timeout, TcpStream::connect(address)).await {
                Ok(Ok(stream)) => {
                    stream.set_nodelay(true)?;
                    return Ok(TokioIo::new(stream));
                }
                Ok(Err(e)) => last = e,
                Err(_) => {
                    last = io::Error::new(
                        io::ErrorKind::TimedOut,
                        format!(
                            "no connection to {address} within {:?}",
                            self.connect_timeout
                        ),
                    )
                }
            }
        }
        Err(last)
    }
}

impl tower::Service<http::Uri> for GuardedConnector {
    type Response = TokioIo<TcpStream>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<TokioIo<TcpStream>>> + Send>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: http::Uri) -> Self::Future {
        Box::pin(self.clone().connect(uri))
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Mutex;
    use tokio::net::TcpListener;

    /// Answers each name from a script: one answer per call, the last repeated.
    struct Scripted(Mutex<Vec<Vec<IpAddr>>>);

    #[async_trait]
    impl Resolver for Scripted {
        async fn resolve(&self, _host: &str) -> io::Result<Vec<IpAddr>> {
            let mut answers = self.0.lock().unwrap();
            Ok(if answers.len() > 1 {
                answers.remove(0)
            } else {
                answers[0].clone()
            })
        }
    }

    /// A loopback listener that counts the connections it accepts.
    async fn counting_listener() -> (u16, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                drop(stream);
            }
        });
        (port, accepted)
    }

    fn connector(allowed: &[&str], answers: Vec<Vec<&str>>) -> GuardedConnector {
        let answers = answers
            .into_iter()
            .map(|a| a.into_iter().map(|ip| ip.parse().unwrap()).collect())
            .collect();
        GuardedConnector::new(
            Guard {
                allow_http: true,
                allowed: allowed.iter().map(|n| n.parse().unwrap()).collect(),
            },
            Arc::new(Scripted(Mutex::new(answers))),
            Duration::from_secs(2),
        )
    }

    async fn connect(connector: &GuardedConnector, uri: &str) -> io::Result<()> {
        let mut service = connector.clone();
        tower::Service::call(&mut service, uri.parse().unwrap())
            .await
            .map(drop)
    }

    #[tokio::test]
    async fn a_name_or_address_inside_the_network_is_never_connected_to() {
        let (port, accepted) = counting_listener().await;
        let guarded = connector(&[], vec![vec!["127.0.0.1"]]);
        for uri in [
            format!("http://hooks.test:{port}/"),
            format!("http://127.0.0.1:{port}/"),
            format!("http://[::ffff:127.0.0.1]:{port}/"),
        ] {
            let refused = connect(&guarded, &uri).await.unwrap_err();
            assert_eq!(refused.kind(), io::ErrorKind::PermissionDenied, "{uri}");
            assert!(refused.to_string().contains("loopback"), "{refused}");
        }
        // A name with one inside address among public ones is refused whole.
        let mixed = connector(&[], vec![vec!["93.184.215.14", "10.0.0.7"]]);
        let refused = connect(&mixed, &format!("http://hooks.test:{port}/")).await;
        assert!(refused.unwrap_err().to_string().contains("private"));
        tokio::task::yield_now().await;
        assert_eq!(accepted.load(Ordering::SeqCst), 0);
    }

    /// Through hyper's client, as the sender uses it: a redirect comes back as it is, never
    /// followed (here, to the metadata address).
    #[tokio::test]
    async fn a_client_on_the_connector_delivers_and_follows_no_redirect() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let accepted = Arc::new(AtomicUsize::new(0));
        let count = accepted.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                count.fetch_add(1, Ordering::SeqCst);
                let mut head = [0u8; 1024];
                let _ = stream.read(&mut head).await;
                let answer = "HTTP/1.1 302 Found\r\nLocation: http://169.254.169.254/\r\n\
                              Content-Length: 0\r\n\r\n";
                let _ = stream.write_all(answer.as_bytes()).await;
            }
        });
        let guarded = connector(&["127.0.0.0/8"], vec![vec!["127.0.0.1"]]);
        let client =
            hyper_util::client::legacy::Client::builder(hyper_util::rt::TokioExecutor::new())
                .build::<_, http_body_util::Empty<bytes::Bytes>>(guarded);
        let uri: http::Uri = format!("http://hooks.test:{port}/in").parse().unwrap();
        let response = client.get(uri).await.unwrap();
        assert_eq!(response.status(), 302);
        assert_eq!(accepted.load(Ordering::SeqCst), 1);
    }

    #[tokio::test]
    async fn each_attempt_resolves_and_checks_again_so_a_rebinding_name_is_refused() {
        let (port, accepted) = counting_listener().await;
        // Allowed: 127.0.0.0/8 (a receiver on this machine); the name first resolves there,
        // then to the metadata address.
        let guarded = connector(
            &["127.0.0.0/8"],
            vec![vec!["127.0.0.1"], vec!["169.254.169.254"]],
        );
        let uri = format!("http://hooks.test:{port}/");
        connect(&guarded, &uri).await.unwrap();
        let refused = connect(&guarded, &uri).await.unwrap_err();
        assert!(refused.to_string().contains("link-local"), "{refused}");
        for _ in 0..50 {
            if accepted.load(Ordering::SeqCst) == 1 {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert_eq!(
            accepted.load(Ordering::SeqCst),
            1,
            "the allowed attempt only"
        );
    }
}
