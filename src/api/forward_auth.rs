//! HTTP forward auth for nginx `auth_request`, Caddy `forward_auth` and Traefik `forwardAuth`:
//! the proxy (on mTLS with its own SVID, a configured gateway) asks `/forward-auth` about the
//! request it holds, passing the agent's verified client certificate and the original method,
//! host and URI in headers. The decision is [`Broker::check_tool_call`], as for Envoy; allowed
//! answers 200 with the credential header for the proxy to copy upstream, denied 403 (401 when
//! no agent certificate came).

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Request, Response, StatusCode};

use super::ext_authz::{denial_body, insufficient_scope};
use crate::broker::Broker;
use crate::broker::tool_calls::{ToolCallRequest, ToolCallVerdict};
use crate::error::Error;
use crate::gateway::{HttpCall, client_cert};
use crate::model::SpiffeId;

/// Headers that carry the agent's certificate, in the order they are looked at.
const CERT_HEADERS: [&str; 2] = ["x-forwarded-tls-client-cert", "x-client-cert"];

fn json(status: StatusCode, body: String) -> Response<Full<Bytes>> {
    let mut r = Response::new(Full::new(Bytes::from(body)));
    *r.status_mut() = status;
    r.headers_mut().insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    r
}

fn refusal(status: StatusCode, error: &str, reason: &str) -> Response<Full<Bytes>> {
    json(
        status,
        serde_json::json!({"error": error, "reason": reason}).to_string(),
    )
}

/// The one of `names` present in `headers`. Two present at once is refused: the proxy sets
/// one, so the other came from the agent (a proxy that passes the agent's headers on, as nginx's
/// `auth_request` does, would otherwise let the agent choose).
fn one_of<'a>(
    headers: &'a HashMap<String, String>,
    names: &[&str],
) -> Result<Option<&'a str>, String> {
    let mut found = names
        .iter()
        .filter_map(|n| headers.get(*n).map(|v| (*n, v.as_str())));
    match (found.next(), found.next()) {
        (Some((_, v)), None) => Ok(Some(v)),
        (None, _) => Ok(None),
        (Some((a, _)), Some((b, _))) => Err(format!(
            "both {a} and {b} arrived: the proxy sets one, so the other came from the client; \
             configure the proxy to remove the one it does not set"
        )),
    }
}

/// Answers one forward-auth request from `proxy` (the verified SPIFFE ID of the connection).
pub async fn handle<B>(
    broker: &Arc<Broker>,
    proxy: Option<&SpiffeId>,
    max_body: usize,
    path: &str,
    req: Request<B>,
) -> Response<Full<Bytes>>
where
    B: hyper::body::Body<Data = Bytes> + Send + Unpin,
    B::Error: std::error::Error + Send + Sync + 'static,
{
    let Some(proxy) = proxy else {
        return refusal(
            StatusCode::UNAUTHORIZED,
            "unauthenticated",
            "the proxy must connect with mTLS using its X.509-SVID",
        );
    };
    if req.uri().path() != path {
        return refusal(
            StatusCode::NOT_FOUND,
            "not_found",
            &format!("forward auth is at {path} ([gateway] forward_auth_path)"),
        );
    }
    let mut headers = HashMap::new();
    for (k, v) in req.headers() {
        let v = String::from_utf8_lossy(v.as_bytes()).into_owned();
        headers
            .entry(k.as_str().to_owned())
            .and_modify(|e: &mut String| {
                e.push(',');
                e.push_str(&v);
            })
            .or_insert(v);
    }
    // Traefik can forward the body (forwardBody); nginx and Caddy send none.
    let body = match Limited::new(req.into_body(), max_body.saturating_add(1))
        .collect()
        .await
    {
        Ok(b) => b.to_bytes(),
        Err(e) => {
            return refusal(
                StatusCode::PAYLOAD_TOO_LARGE,
                "denied",
                &format!("the forwarded body could not be read: {e}"),
            );
        }
    };
    let ambiguous = |e: String| refusal(StatusCode::BAD_REQUEST, "denied", &e);
    let cert = match one_of(&headers, &CERT_HEADERS) {
        Ok(c) => c,
        Err(e) => return ambiguous(e),
    };
    // The original request comes in one family of headers, never a mix.
    let forwarded = ["x-forwarded-method", "x-forwarded-uri", "x-forwarded-host"];
    let original = ["x-original-method", "x-original-uri", "x-original-host"];
    let family = |names: &[&str]| names.iter().any(|n| headers.contains_key(*n));
    if family(&forwarded) && family(&original) {
        return ambiguous(
            "both x-forwarded-* and x-original-* arrived: the proxy sets one family, so the \
             other came from the client; configure the proxy to remove it"
                .into(),
        );
    }
    let agent = match cert {
        None => {
            return refusal(
                StatusCode::UNAUTHORIZED,
                "unauthenticated",
                "no agent certificate: the proxy must require the agent's X.509-SVID and pass it \
                 in x-client-cert or x-forwarded-tls-client-cert",
            );
        }
        Some(v) => match client_cert::leaf_der(v).and_then(|der| {
            crate::identity::peer_spiffe_id(&[rustls_pki_types::CertificateDer::from(der)])
                .map_err(|e| e.to_string())
        }) {
            Ok(id) => id,
            Err(e) => {
                return refusal(
                    StatusCode::UNAUTHORIZED,
                    "unauthenticated",
                    &format!("the agent certificate is unusable: {e}"),
                );
            }
        },
    };
    let pick = |a: &str, b: &str| {
        headers
            .get(a)
            .or_else(|| headers.get(b))
            .map(String::as_str)
    };
    let (Some(method), Some(uri)) = (
        pick("x-forwarded-method", "x-original-method"),
        pick("x-forwarded-uri", "x-original-uri"),
    ) else {
        return refusal(
            StatusCode::BAD_REQUEST,
            "denied",
            "the proxy must pass the original method and URI (x-forwarded-method and \
             x-forwarded-uri, or x-original-method and x-original-uri)",
        );
    };
    let host = pick("x-forwarded-host", "x-original-host").unwrap_or_default();
    let request_id = pick("traceparent", "x-request-id").unwrap_or_default();
    let verdict = broker
        .tool_calls
        .check_tool_call(
            proxy,
            ToolCallRequest {
                principal: &agent,
                call: HttpCall {
                    method,
                    host,
                    path: uri,
                    headers: &headers,
                    body: (!body.is_empty()).then_some(&body[..]),
                },
                request_id,
            },
        )
        .await;
    match verdict {
        Ok(ToolCallVerdict::Allow { header, value, .. }) => {
            let mut r = Response::new(Full::new(Bytes::new()));
            match (
                hyper::header::HeaderName::from_bytes(header.as_bytes()),
                hyper::header::HeaderValue::from_str(value.as_str()),
            ) {
                (Ok(n), Ok(mut v)) => {
                    v.set_sensitive(true);
                    r.headers_mut().insert(n, v);
                    r
                }
                _ => refusal(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    "error",
                    "the credential does not fit in an HTTP header",
                ),
            }
        }
        Ok(ToolCallVerdict::Deny(d)) => {
            let mut r = json(StatusCode::FORBIDDEN, denial_body(&d));
            if let Some(v) =
                insufficient_scope(&d).and_then(|v| hyper::header::HeaderValue::from_str(&v).ok())
            {
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
            }
            r
        }
        Err(e) => {
            let status = match &e {
                Error::PermissionDenied(_) => StatusCode::FORBIDDEN,
                Error::Unauthenticated(_) => StatusCode::UNAUTHORIZED,
                Error::Unavailable(_) | Error::Storage(_) => StatusCode::SERVICE_UNAVAILABLE,
                _ => StatusCode::INTERNAL_SERVER_ERROR,
            };
            refusal(status, "denied", &e.to_string())
        }
    }
}
