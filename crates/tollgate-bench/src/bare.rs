//! The floor: the least a reverse proxy can do in Rust. It takes each request, points it at the
//! upstream and streams the answer back over pooled keep-alive connections, with no headers
//! touched, no auth, no limits and no logging. Whatever a gateway spends beyond this is its own.

use bytes::Bytes;
use http::{Request, Response, Uri};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto;
use std::net::SocketAddr;
use tokio::net::TcpListener;

type ProxyBody = BoxBody<Bytes, hyper::Error>;

/// Serves the pass-through proxy on `listen` until the process is killed.
pub async fn serve(listen: SocketAddr, upstream: SocketAddr) -> anyhow::Result<()> {
    let listener = TcpListener::bind(listen).await?;
    let client: Client<HttpConnector, Incoming> =
        Client::builder(TokioExecutor::new()).build_http();
    loop {
        let (stream, _) = listener.accept().await?;
        let _ = stream.set_nodelay(true);
        let client = client.clone();
        tokio::spawn(async move {
            let service = service_fn(move |request| forward(client.clone(), upstream, request));
            let _ = auto::Builder::new(TokioExecutor::new())
                .serve_connection(TokioIo::new(stream), service)
                .await;
        });
    }
}

async fn forward(
    client: Client<HttpConnector, Incoming>,
    upstream: SocketAddr,
    mut request: Request<Incoming>,
) -> Result<Response<ProxyBody>, hyper::Error> {
    let path = request
        .uri()
        .path_and_query()
        .map_or("/", |p| p.as_str())
        .to_string();
    let Ok(uri) = format!("http://{upstream}{path}").parse::<Uri>() else {
        return Ok(status(400));
    };
    *request.uri_mut() = uri;
    match client.request(request).await {
        Ok(response) => Ok(response.map(|body| body.boxed())),
        Err(_) => Ok(status(502)),
    }
}

fn status(code: u16) -> Response<ProxyBody> {
    let mut response = Response::new(Full::new(Bytes::new()).map_err(|e| match e {}).boxed());
    *response.status_mut() =
        http::StatusCode::from_u16(code).unwrap_or(http::StatusCode::BAD_GATEWAY);
    response
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[tokio::test]
    async fn forwards_requests_and_answers_as_they_are() {
        let mock = tollgate_mock::MockUpstream::start(SocketAddr::from(([127, 0, 0, 1], 0)))
            .await
            .unwrap();
        let port = crate::procs::free_port().unwrap();
        let listen = SocketAddr::from(([127, 0, 0, 1], port));
        let proxy = tokio::spawn(serve(listen, mock.addr));
        let http = reqwest::Client::new();
        let mut answer = None;
        for _ in 0..50 {
            if let Ok(response) = http
                .post(format!("http://{listen}/echo/a?b=1"))
                .header("x-custom", "kept")
                .body("hello")
                .send()
                .await
            {
                answer = Some(response);
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let response = answer.unwrap();
        assert_eq!(response.status(), 200);
        let echoed: serde_json::Value = response.json().await.unwrap();
        assert_eq!(echoed["path"], "/echo/a");
        assert_eq!(echoed["query"], "b=1");
        assert_eq!(echoed["body"], "hello");
        assert_eq!(echoed["headers"]["x-custom"], "kept");
        proxy.abort();
    }
}
