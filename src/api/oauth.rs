//! The OAuth 2 authorization-server surface over HTTPS (docs/oauth.md): RFC 8414 and OpenID
//! discovery, JWKS, the token endpoint (RFC 7523 jwt-bearer with JWT-SVIDs, RFC 8705
//! client_credentials over mTLS, RFC 8693 token exchange, RFC 8707 resource indicators),
//! RFC 7662 introspection and RFC 7009 revocation. Callers authenticate with SVIDs only: the TLS
//! client certificate, or a JWT-SVID as assertion. Decisions are the broker's
//! ([`crate::broker::oauth`]); this module parses, authenticates and answers as the RFCs say.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::{Method, Request, Response, StatusCode};
use serde_json::{Value, json};
use zeroize::Zeroizing;

pub use super::TlsPeer as Peer;
use crate::broker::Broker;
use crate::broker::oauth::{
    AccessToken, ExchangeRequest, OAuthError, OAuthErrorCode as C, Revocation, TaskChoice,
    TokenRequest,
};
use crate::error::Error;
use crate::identity::Identity;
use crate::issuers::{ATTR_CLIENT_ID, ATTR_CNF, actors_of};
use crate::model::{CredentialRecord, SpiffeId};

/// Largest request body read (a form with a few JWTs).
pub const MAX_BODY_BYTES: usize = 32 << 10;

const JWT_BEARER: &str = "urn:ietf:params:oauth:grant-type:jwt-bearer";
const TOKEN_EXCHANGE: &str = "urn:ietf:params:oauth:grant-type:token-exchange";
const CLIENT_ASSERTION_JWT: &str = "urn:ietf:params:oauth:client-assertion-type:jwt-bearer";
const TT_ACCESS_TOKEN: &str = "urn:ietf:params:oauth:token-type:access_token";
const TT_JWT: &str = "urn:ietf:params:oauth:token-type:jwt";
/// What a JWT-SVID may be signed with (the SPIFFE JWT-SVID specification).
const SVID_ALGS: [&str; 9] = [
    "RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256", "PS384", "PS512",
];

/// What the OAuth listener serves with.
#[derive(Clone)]
pub struct OAuthService {
    pub broker: Arc<Broker>,
    pub identity: Identity,
    pub issuer: String,
    pub metrics: Arc<crate::telemetry::Metrics>,
    /// Requests per remote address (`[server] requests_per_remote_per_second`), checked before
    /// anything else is read.
    pub remote_rate: Arc<crate::ratelimit::RateLimiter<std::net::IpAddr>>,
}

type Answer = Response<Full<Bytes>>;

fn json_answer(status: StatusCode, body: &Value) -> Answer {
    let mut r = Response::new(Full::new(Bytes::from(body.to_string())));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(
        hyper::header::CONTENT_TYPE,
        hyper::header::HeaderValue::from_static("application/json"),
    );
    h.insert(
        hyper::header::CACHE_CONTROL,
        hyper::header::HeaderValue::from_static("no-store"),
    );
    h.insert(
        hyper::header::PRAGMA,
        hyper::header::HeaderValue::from_static("no-cache"),
    );
    r
}

fn error_answer(e: &OAuthError) -> Answer {
    let status = match e.code {
        C::InvalidClient => StatusCode::UNAUTHORIZED,
        C::SlowDown => StatusCode::TOO_MANY_REQUESTS,
        C::TemporarilyUnavailable => StatusCode::SERVICE_UNAVAILABLE,
        C::ServerError => StatusCode::INTERNAL_SERVER_ERROR,
        _ => StatusCode::BAD_REQUEST,
    };
    let mut body = json!({"error": e.code.as_str(), "error_description": e.description});
    if let Some(a) = &e.approval_id {
        body["approval_id"] = json!(a);
    }
    if let Some(t) = &e.task_id {
        body["task_id"] = json!(t);
    }
    let mut r = json_answer(status, &body);
    match e.code {
        C::InvalidClient => {
            r.headers_mut().insert(
                hyper::header::WWW_AUTHENTICATE,
                hyper::header::HeaderValue::from_static(
                    "Bearer error=\"invalid_client\", error_description=\"authenticate with an \
                     X.509-SVID (mutual TLS) or a JWT-SVID client assertion\"",
                ),
            );
        }
        C::SlowDown | C::TemporarilyUnavailable => {
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from_static("1"),
            );
        }
        _ => {}
    }
    r
}

fn err(code: C, description: impl Into<String>) -> OAuthError {
    OAuthError::new(code, description)
}

/// A broker error from an authenticated introspection or revocation.
fn from_broker(e: Error) -> OAuthError {
    match e {
        Error::PermissionDenied(m) | Error::Unauthenticated(m) => err(C::UnauthorizedClient, m),
        Error::ResourceExhausted(m) => err(C::SlowDown, m),
        Error::Unavailable(m) => err(C::TemporarilyUnavailable, m),
        Error::InvalidArgument { field, reason } => {
            err(C::InvalidRequest, format!("{field}: {reason}"))
        }
        e => {
            tracing::error!(error = %e, "OAuth request failed inside the broker");
            err(
                C::ServerError,
                "internal error; the broker's log has the detail",
            )
        }
    }
}

/// The form parameters of a request, each at most once (RFC 6749 §3.1).
struct Form(BTreeMap<String, Zeroizing<String>>);

impl Form {
    fn parse(body: &[u8]) -> Result<Self, OAuthError> {
        let mut out = BTreeMap::new();
        for (k, v) in form_urlencoded::parse(body) {
            if k.is_empty() {
                continue;
            }
            if out.contains_key(k.as_ref()) {
                return Err(err(
                    C::InvalidRequest,
                    format!(
                        "parameter {} is repeated; each may appear once",
                        crate::model::preview(&k)
                    ),
                ));
            }
            out.insert(k.into_owned(), Zeroizing::new(v.into_owned()));
        }
        Ok(Self(out))
    }

    /// A parameter, absent when missing or empty (RFC 6749 §3.1: empty means omitted).
    fn get(&self, name: &str) -> Option<&str> {
        self.0
            .get(name)
            .map(|v| v.as_str())
            .filter(|v| !v.is_empty())
    }

    fn require(&self, name: &str) -> Result<&str, OAuthError> {
        self.get(name)
            .ok_or_else(|| err(C::InvalidRequest, format!("parameter {name} is required")))
    }
}

impl OAuthService {
    /// The issuer's path ("" or "/p").
    fn base_path(&self) -> &str {
        let rest = self.issuer.strip_prefix("https://").unwrap_or("");
        rest.find('/').map_or("", |i| &rest[i..])
    }

    fn endpoint(&self, name: &str) -> String {
        format!("{}/{name}", self.issuer)
    }

    /// The discovery document (RFC 8414 and OpenID Connect Discovery alike).
    pub fn metadata(&self) -> Value {
        let auth = ["tls_client_auth", "private_key_jwt"];
        json!({
            "issuer": self.issuer,
            "token_endpoint": self.endpoint("token"),
            "jwks_uri": self.endpoint("jwks.json"),
            "introspection_endpoint": self.endpoint("introspect"),
            "revocation_endpoint": self.endpoint("revoke"),
            "grant_types_supported": [JWT_BEARER, "client_credentials", TOKEN_EXCHANGE],
            "token_endpoint_auth_methods_supported": ["tls_client_auth", "private_key_jwt", "none"],
            "token_endpoint_auth_signing_alg_values_supported": SVID_ALGS,
            "introspection_endpoint_auth_methods_supported": auth,
            "introspection_endpoint_auth_signing_alg_values_supported": SVID_ALGS,
            "revocation_endpoint_auth_methods_supported": auth,
            "revocation_endpoint_auth_signing_alg_values_supported": SVID_ALGS,
            "tls_client_certificate_bound_access_tokens": true,
            "scopes_supported": self.broker.oauth.oauth_scopes(),
            "response_types_supported": ["none"],
            "subject_types_supported": ["public"],
            "id_token_signing_alg_values_supported": ["ES256"],
        })
    }

    /// The endpoint a path names (as metrics label it), if any.
    fn route(&self, path: &str) -> Option<&'static str> {
        let base = self.base_path();
        let local = path.strip_prefix(base).unwrap_or("\u{0}");
        let rfc8414 = path
            .strip_prefix("/.well-known/oauth-authorization-server")
            .is_some_and(|rest| rest == base);
        if rfc8414 || local == "/.well-known/openid-configuration" {
            return Some("metadata");
        }
        match local {
            "/jwks.json" => Some("jwks"),
            "/token" => Some("token"),
            "/introspect" => Some("introspect"),
            "/revoke" => Some("revoke"),
            _ => None,
        }
    }

    /// Answers one request.
    pub async fn handle<B>(&self, peer: &Peer, req: Request<B>) -> Answer
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let path = req.uri().path().to_owned();
        let get = |r: &Request<B>| *r.method() == Method::GET || *r.method() == Method::HEAD;
        let Some(route) = self.route(&path) else {
            return json_answer(
                StatusCode::NOT_FOUND,
                &json!({"error": "not_found", "error_description": format!(
                    "no OAuth endpoint at {}; discovery is at /.well-known/oauth-authorization-server{}",
                    crate::model::preview(&path),
                    self.base_path()
                )}),
            );
        };
        let wants_get = matches!(route, "metadata" | "jwks");
        let method_ok = if wants_get {
            get(&req)
        } else {
            *req.method() == Method::POST
        };
        if !method_ok {
            let mut r = json_answer(
                StatusCode::METHOD_NOT_ALLOWED,
                &json!({"error": "invalid_request", "error_description": format!("{route} takes {}", if wants_get { "GET" } else { "POST" })}),
            );
            r.headers_mut().insert(
                hyper::header::ALLOW,
                hyper::header::HeaderValue::from_static(if wants_get {
                    "GET, HEAD"
                } else {
                    "POST"
                }),
            );
            return r;
        }
        match route {
            "metadata" => {
                let mut r = json_answer(StatusCode::OK, &self.metadata());
                r.headers_mut().insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("max-age=300"),
                );
                r.headers_mut().remove(hyper::header::PRAGMA);
                return r;
            }
            "jwks" => {
                let jwks: Value =
                    serde_json::from_str(&self.broker.jwks_json()).unwrap_or(Value::Null);
                let mut r = json_answer(StatusCode::OK, &jwks);
                r.headers_mut().insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("max-age=60"),
                );
                r.headers_mut().remove(hyper::header::PRAGMA);
                return r;
            }
            _ => {}
        }
        if let Some(auth) = req.headers().get(hyper::header::AUTHORIZATION) {
            // RFC 6749 §5.2: 401 with a challenge of the scheme the client tried.
            let scheme = auth
                .to_str()
                .ok()
                .and_then(|v| v.split_whitespace().next())
                .filter(|s| s.eq_ignore_ascii_case("basic"))
                .map_or("Bearer", |_| "Basic");
            let mut r = error_answer(&err(
                C::InvalidClient,
                "this authorization server has no client secrets: authenticate with an \
                 X.509-SVID (mutual TLS) or a JWT-SVID client assertion, not an Authorization \
                 header",
            ));
            if let Ok(v) = hyper::header::HeaderValue::from_str(&format!(
                "{scheme} realm=\"jitbroker\", error=\"invalid_client\""
            )) {
                r.headers_mut().insert(hyper::header::WWW_AUTHENTICATE, v);
            }
            return r;
        }
        let form = match self.read_form(req).await {
            Ok(f) => f,
            Err(e) => return error_answer(&e),
        };
        let answer = match route {
            "token" => self.token(peer, &form).await,
            "introspect" => self.introspect(peer, &form).await,
            _ => self.revoke(peer, &form).await,
        };
        answer.unwrap_or_else(|e| error_answer(&e))
    }

    /// Answers one request and counts it.
    pub async fn serve<B>(&self, peer: &Peer, req: Request<B>) -> Answer
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let started = std::time::Instant::now();
        if let Err(wait_ms) = self.remote_rate.check(&peer.remote.ip(), self.broker.now()) {
            self.metrics.rate_limited("remote");
            let mut r = error_answer(&err(
                C::SlowDown,
                format!(
                    "{} is over [server] requests_per_remote_per_second; retry in {wait_ms} ms",
                    peer.remote.ip()
                ),
            ));
            r.headers_mut().insert(
                hyper::header::RETRY_AFTER,
                hyper::header::HeaderValue::from(wait_ms.div_ceil(1000).max(1)),
            );
            return r;
        }
        let endpoint = self.route(req.uri().path());
        let answer = self.handle(peer, req).await;
        if let Some(endpoint) = endpoint {
            self.metrics
                .oauth(endpoint, answer.status().as_u16(), started.elapsed());
        }
        answer
    }

    async fn read_form<B>(&self, req: Request<B>) -> Result<Form, OAuthError>
    where
        B: hyper::body::Body<Data = Bytes> + Send + Unpin,
        B::Error: std::error::Error + Send + Sync + 'static,
    {
        let form_type = req
            .headers()
            .get(hyper::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split(';').next())
            .map(|v| {
                v.trim()
                    .eq_ignore_ascii_case("application/x-www-form-urlencoded")
            });
        if form_type != Some(true) {
            return Err(err(
                C::InvalidRequest,
                "the body must be application/x-www-form-urlencoded",
            ));
        }
        let body = Limited::new(req.into_body(), MAX_BODY_BYTES)
            .collect()
            .await
            .map_err(|_| {
                err(
                    C::InvalidRequest,
                    format!("the body is over {MAX_BODY_BYTES} bytes or could not be read"),
                )
            })?
            .to_bytes();
        let body = Zeroizing::new(body.to_vec());
        Form::parse(&body)
    }

    /// Refuses a caller over its request rate.
    fn admit(&self, who: &SpiffeId) -> Result<(), OAuthError> {
        self.broker.admit(who).map_err(|e| match e {
            Error::ResourceExhausted(m) => err(C::SlowDown, m),
            e => from_broker(e),
        })
    }

    /// A JWT-SVID presented as an assertion, verified for this issuer or `endpoint`.
    fn verify_assertion(
        &self,
        peer: &Peer,
        token: &str,
        endpoint: &str,
    ) -> Result<SpiffeId, String> {
        let aud = [self.issuer.as_str(), endpoint];
        let verified = self
            .identity
            .verify_jwt_for(token, &aud)
            .map_err(|e| e.to_string())
            .and_then(|s| SpiffeId::parse("assertion sub", &s).map_err(|e| e.to_string()));
        if let Err(e) = &verified {
            self.broker.auth_failed(&peer.remote.ip().to_string(), e);
        }
        verified
    }

    /// The JWT-SVID client assertion of a request (RFC 7523 §2.2), verified, if one came.
    fn client_assertion(
        &self,
        peer: &Peer,
        form: &Form,
        endpoint: &str,
    ) -> Result<Option<SpiffeId>, OAuthError> {
        Ok(
            match (
                form.get("client_assertion_type"),
                form.get("client_assertion"),
            ) {
                (None, None) => None,
                (Some(CLIENT_ASSERTION_JWT), Some(a)) => Some(
                    self.verify_assertion(peer, a, endpoint)
                        .map_err(|e| err(C::InvalidClient, format!("client_assertion: {e}")))?,
                ),
                (Some(t), Some(_)) if t != CLIENT_ASSERTION_JWT => {
                    return Err(err(
                        C::InvalidClient,
                        format!("client_assertion_type must be {CLIENT_ASSERTION_JWT}"),
                    ));
                }
                _ => {
                    return Err(err(
                        C::InvalidRequest,
                        "client_assertion and client_assertion_type come together",
                    ));
                }
            },
        )
    }

    /// The authenticated client of an introspection or revocation: the client certificate or a
    /// JWT-SVID client assertion (both must agree when both come), and `client_id` if sent.
    fn client(&self, peer: &Peer, form: &Form, endpoint: &str) -> Result<SpiffeId, OAuthError> {
        let asserted = self.client_assertion(peer, form, endpoint)?;
        let who = match (asserted, &peer.spiffe_id) {
            (Some(a), Some(c)) if &a != c => {
                return Err(err(
                    C::InvalidClient,
                    format!("the client assertion names {a} but the client certificate {c}"),
                ));
            }
            (Some(a), _) => a,
            (None, Some(c)) => c.clone(),
            (None, None) => {
                self.broker.auth_failed(
                    &peer.remote.ip().to_string(),
                    "OAuth request without an SVID",
                );
                return Err(err(
                    C::InvalidClient,
                    "authenticate with an X.509-SVID (mutual TLS) or a JWT-SVID client assertion",
                ));
            }
        };
        if let Some(id) = form.get("client_id")
            && id != who.as_str()
        {
            return Err(err(
                C::InvalidClient,
                format!(
                    "client_id {} is not the authenticated SPIFFE ID {who}",
                    crate::model::preview(id)
                ),
            ));
        }
        self.admit(&who)?;
        Ok(who)
    }

    /// Client identification that comes along with a grant must name the grant's workload `who`:
    /// `client_id` if sent, and a client assertion, which must also verify. `names` says what
    /// `who` is (for `client_id`, and for the assertion) in the refusal.
    fn same_client(
        &self,
        peer: &Peer,
        form: &Form,
        endpoint: &str,
        who: &SpiffeId,
        (as_client_id, as_assertion): (&str, &str),
    ) -> Result<(), OAuthError> {
        if let Some(id) = form.get("client_id")
            && id != who.as_str()
        {
            return Err(err(
                C::InvalidClient,
                format!("client_id is not {as_client_id} {who}"),
            ));
        }
        if let Some(client) = self.client_assertion(peer, form, endpoint)?
            && &client != who
        {
            return Err(err(
                C::InvalidClient,
                format!("the client assertion names {client} but {as_assertion} {who}"),
            ));
        }
        Ok(())
    }

    /// The one resource indicator of a request (`resource`, or RFC 8693's `audience`).
    fn resource(form: &Form) -> Result<String, OAuthError> {
        match (form.get("resource"), form.get("audience")) {
            (Some(r), Some(a)) if r != a => Err(err(
                C::InvalidTarget,
                "resource and audience name different targets; name one",
            )),
            (Some(r), _) | (None, Some(r)) => Ok(r.to_owned()),
            (None, None) => Err(err(
                C::InvalidTarget,
                "parameter resource is required: the RFC 8707 indicator of the resource server",
            )),
        }
    }

    fn task_choice(form: &Form) -> Result<TaskChoice, OAuthError> {
        match (form.get("task_id"), form.get("purpose")) {
            (Some(t), None) => Ok(TaskChoice::Existing(t.to_owned())),
            (None, Some(p)) => Ok(TaskChoice::New {
                purpose: p.to_owned(),
            }),
            (Some(_), Some(_)) => Err(err(
                C::InvalidRequest,
                "send task_id (an active task) or purpose (a new task), not both",
            )),
            (None, None) => Err(err(
                C::InvalidRequest,
                "parameter task_id (an active task) or purpose (a new task) is required",
            )),
        }
    }

    async fn token(&self, peer: &Peer, form: &Form) -> Result<Answer, OAuthError> {
        let endpoint = self.endpoint("token");
        let grant_type = form.require("grant_type")?;
        let token = match grant_type {
            JWT_BEARER => {
                let assertion = form.require("assertion")?;
                let agent = self
                    .verify_assertion(peer, assertion, &endpoint)
                    .map_err(|e| err(C::InvalidGrant, format!("assertion: {e}")))?;
                self.same_client(
                    peer,
                    form,
                    &endpoint,
                    &agent,
                    ("the assertion's subject", "the grant's assertion"),
                )?;
                self.admit(&agent)?;
                let req = TokenRequest {
                    resource: Self::resource(form)?,
                    scope: form.get("scope").map(str::to_owned),
                    task: Self::task_choice(form)?,
                    certificate_thumbprint: None,
                };
                self.broker.oauth.oauth_token(&agent, req).await?
            }
            "client_credentials" => {
                let (Some(agent), Some(thumb)) = (&peer.spiffe_id, &peer.thumbprint) else {
                    self.broker.auth_failed(
                        &peer.remote.ip().to_string(),
                        "client_credentials without a client certificate",
                    );
                    return Err(err(
                        C::InvalidClient,
                        "client_credentials needs mutual TLS with the client's X.509-SVID \
                         (RFC 8705 tls_client_auth)",
                    ));
                };
                self.same_client(
                    peer,
                    form,
                    &endpoint,
                    agent,
                    (
                        "the client certificate's SPIFFE ID",
                        "the client certificate",
                    ),
                )?;
                self.admit(agent)?;
                let req = TokenRequest {
                    resource: Self::resource(form)?,
                    scope: form.get("scope").map(str::to_owned),
                    task: Self::task_choice(form)?,
                    certificate_thumbprint: Some(thumb.clone()),
                };
                self.broker.oauth.oauth_token(agent, req).await?
            }
            TOKEN_EXCHANGE => {
                let subject = form.require("subject_token")?;
                match form.require("subject_token_type")? {
                    TT_ACCESS_TOKEN | TT_JWT => {}
                    other => {
                        return Err(err(
                            C::InvalidRequest,
                            format!(
                                "subject_token_type {} is not supported; use {TT_ACCESS_TOKEN}",
                                crate::model::preview(other)
                            ),
                        ));
                    }
                }
                if let Some(t) = form.get("requested_token_type")
                    && t != TT_ACCESS_TOKEN
                    && t != TT_JWT
                {
                    return Err(err(
                        C::InvalidRequest,
                        format!("requested_token_type must be {TT_ACCESS_TOKEN}"),
                    ));
                }
                let actor = match (form.get("actor_token"), form.get("actor_token_type")) {
                    (Some(a), Some(TT_JWT)) => {
                        let id = self
                            .verify_assertion(peer, a, &endpoint)
                            .map_err(|e| err(C::InvalidRequest, format!("actor_token: {e}")))?;
                        if let Some(c) = &peer.spiffe_id
                            && c != &id
                        {
                            return Err(err(
                                C::InvalidRequest,
                                format!("actor_token names {id} but the client certificate {c}"),
                            ));
                        }
                        id
                    }
                    (Some(_), _) => {
                        return Err(err(
                            C::InvalidRequest,
                            format!("actor_token_type must be {TT_JWT} (a JWT-SVID)"),
                        ));
                    }
                    (None, Some(_)) => {
                        return Err(err(
                            C::InvalidRequest,
                            "actor_token_type without actor_token",
                        ));
                    }
                    (None, None) => match &peer.spiffe_id {
                        Some(c) => c.clone(),
                        None => {
                            return Err(err(
                                C::InvalidClient,
                                "the actor authenticates with its JWT-SVID as actor_token or \
                                 with its X.509-SVID over mutual TLS",
                            ));
                        }
                    },
                };
                self.admit(&actor)?;
                let req = ExchangeRequest {
                    subject_token: Zeroizing::new(subject.to_owned()),
                    resource: Self::resource(form)?,
                    scope: form.get("scope").map(str::to_owned),
                    certificate_thumbprint: peer
                        .spiffe_id
                        .as_ref()
                        .filter(|c| *c == &actor)
                        .and(peer.thumbprint.clone()),
                };
                let t = self
                    .broker
                    .oauth
                    .oauth_exchange(&actor, req)
                    .await
                    .map_err(|mut e| {
                        // RFC 8693 §2.2.2: an unusable subject token is invalid_request.
                        if e.code == C::InvalidGrant {
                            e.code = C::InvalidRequest;
                        }
                        e
                    })?;
                let mut body = token_body(&t);
                body["issued_token_type"] = json!(TT_ACCESS_TOKEN);
                return Ok(json_answer(StatusCode::OK, &body));
            }
            other => {
                return Err(err(
                    C::UnsupportedGrantType,
                    format!(
                        "grant_type {} is not supported; supported: {JWT_BEARER}, \
                         client_credentials, {TOKEN_EXCHANGE}",
                        crate::model::preview(other)
                    ),
                ));
            }
        };
        Ok(json_answer(StatusCode::OK, &token_body(&token)))
    }

    async fn introspect(&self, peer: &Peer, form: &Form) -> Result<Answer, OAuthError> {
        let who = self.client(peer, form, &self.endpoint("introspect"))?;
        let token = form.require("token")?;
        let record = self
            .broker
            .oauth
            .oauth_introspect(&who, token)
            .await
            .map_err(from_broker)?;
        let body = match record {
            Some(r) => self.introspection(&r),
            None => json!({"active": false}),
        };
        Ok(json_answer(StatusCode::OK, &body))
    }

    /// The RFC 7662 answer for an active credential.
    fn introspection(&self, r: &CredentialRecord) -> Value {
        let aud = self
            .broker
            .oauth
            .resource_indicator(&r.resource)
            .unwrap_or_else(|| r.resource.clone());
        let mut v = json!({
            "active": true,
            "scope": r.action,
            "client_id": r.attributes.get(ATTR_CLIENT_ID).map_or(r.owner.as_str(), String::as_str),
            "sub": r.owner.as_str(),
            "aud": aud,
            "iss": self.issuer,
            "exp": r.expires_at / 1000,
            "iat": r.issued_at / 1000,
            "nbf": r.issued_at / 1000,
            "jti": r.id.as_str(),
            "token_type": "Bearer",
            "task_id": r.task_id.as_str(),
        });
        if let Some(x5t) = r.attributes.get(ATTR_CNF) {
            v["cnf"] = json!({"x5t#S256": x5t});
        }
        // The same `act` as the token's own claim: exchange actors around the delegators.
        if let Some(a) =
            crate::issuers::jwt::act_claim(&r.delegation_chain, &actors_of(&r.attributes))
        {
            v["act"] = a;
        }
        v
    }

    async fn revoke(&self, peer: &Peer, form: &Form) -> Result<Answer, OAuthError> {
        let who = self.client(peer, form, &self.endpoint("revoke"))?;
        let token = form.require("token")?;
        match self
            .broker
            .oauth
            .oauth_revoke(&who, token)
            .await
            .map_err(from_broker)?
        {
            Revocation::Done | Revocation::Unknown => {
                let mut r = Response::new(Full::new(Bytes::new()));
                r.headers_mut().insert(
                    hyper::header::CACHE_CONTROL,
                    hyper::header::HeaderValue::from_static("no-store"),
                );
                Ok(r)
            }
            Revocation::NotYours => Err(err(
                C::UnauthorizedClient,
                format!("the token was not issued to {who}"),
            )),
        }
    }
}

/// The token endpoint's success body (RFC 6749 §5.1) with jitbroker's `task_id`.
fn token_body(t: &AccessToken) -> Value {
    json!({
        "access_token": t.issued.secret.expose(),
        "token_type": "Bearer",
        "expires_in": t.expires_in,
        "scope": t.issued.record.action,
        "task_id": t.issued.record.task_id.as_str(),
    })
}
