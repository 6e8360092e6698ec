//! HTTP surface: the router, the admin-token and client-certificate guards, a JSON
//! extractor whose failures are JSON errors, and thin handlers over
//! [`crate::service`].

use std::sync::Arc;

use axum::extract::rejection::QueryRejection;
use axum::extract::{FromRequest, FromRequestParts, Path, Query, Request, State};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::Router;
use bytes::Bytes;
use powernode_proto::admin::{
    CreateNodeRequest, DrainRequest, EventsResponse, NodeResponse, ProvisionRequest,
    SignalsResponse, TaskResponse, TerminateRequest, UpdateNodeRequest,
};
use powernode_proto::node::{
    CompleteTaskRequest, EnrollmentRequest, HandshakeRequest, HeartbeatRequest, LeaseRequest,
    ReissueRequest, RenewLeaseRequest, RenewRequest,
};
use powernode_proto::{paths, ErrorCode};
use serde::de::DeserializeOwned;
use serde::Deserialize;

use crate::ca::ClientIdentity;
use crate::error::{AppError, AppResult};
use crate::service::modules::{RecordRequest, SetTemplateModules, SignRequest};
use crate::service::AppState;

/// Largest request body accepted (`payload_too_large` above it).
pub const MAX_BODY_BYTES: usize = 1024 * 1024;

/// What the TLS layer learned about the peer, attached to every request of the
/// connection by the accept loop.
#[derive(Debug, Clone)]
pub enum PeerAuth {
    /// No client certificate was presented.
    Anonymous,
    /// A certificate that chains to our CA and names an instance.
    Verified(Arc<ClientIdentity>),
    /// A certificate was presented but is not ours, expired or unbound.
    Invalid(Arc<str>),
}

pub fn app(state: AppState) -> Router {
    let admin = Router::new()
        .route(paths::ADMIN_NODES, post(create_node).get(list_nodes))
        .route(paths::ADMIN_CLUSTERS, post(provision_cluster))
        .route(
            "/api/v1/system/nodes/{id}",
            get(get_node).patch(update_node).delete(delete_node),
        )
        .route("/api/v1/system/nodes/{id}/provision", post(provision))
        .route(paths::ADMIN_TEMPLATES, get(list_templates))
        .route(
            paths::ADMIN_DISK_IMAGE_PUBLICATIONS,
            get(list_publications).post(publish_image),
        )
        .route("/api/v1/system/instances/{id}", get(get_instance))
        .route(
            "/api/v1/system/instances/{id}/identity",
            get(instance_identity),
        )
        .route("/api/v1/system/instances/{id}/drain", post(drain))
        .route("/api/v1/system/instances/{id}/terminate", post(terminate))
        .route("/api/v1/system/instances/{id}/drift", get(drift))
        .route("/api/v1/system/instances/{id}/reboot", post(reboot))
        .route(
            "/api/v1/system/instances/{id}/collect_diagnostics",
            post(collect_diagnostics),
        )
        .route(
            "/api/v1/system/instances/{id}/module_update",
            post(module_update),
        )
        .route(
            "/api/v1/system/instances/{id}/attribute_failure",
            get(attribute_failure),
        )
        .route("/api/v1/system/tasks/{id}", get(get_task))
        .route("/api/v1/system/tasks/{id}/cancel", post(cancel_task))
        .route(paths::ADMIN_SIGNALS, get(recent_signals))
        .route(paths::ADMIN_EVENTS, get(recent_events))
        .route(
            paths::ADMIN_MODULE_PUBLICATIONS,
            get(list_module_publications).post(record_module_publication),
        )
        .route(paths::ADMIN_MODULE_SIGNATURES, post(sign_module))
        .route(paths::ADMIN_MODULE_SIGNING_KEY, get(module_signing_key))
        .route(paths::ADMIN_MODULE_TRUST, get(module_trust))
        .route(
            "/api/v1/system/templates/{id}/modules",
            put(set_template_modules),
        )
        .route_layer(middleware::from_fn_with_state(state.clone(), admin_auth));
    let node = Router::new()
        .route(paths::ENROLLMENT, post(enroll))
        .route(paths::BOOT_REPORT, post(boot_report))
        .route(paths::HANDSHAKE, post(handshake))
        .route(paths::HEARTBEAT, post(heartbeat))
        .route(paths::DESIRED_MODULES, get(desired_modules))
        .route(paths::CERTIFICATE_RENEW, post(renew_certificate))
        .route(paths::CERTIFICATE_REISSUE, post(reissue_certificate))
        .route(paths::TASK_LEASE, post(lease))
        .route(
            "/api/v1/system/worker_api/tasks/{id}/renew",
            post(renew_lease),
        )
        .route(
            "/api/v1/system/worker_api/tasks/{id}/complete",
            post(complete_task),
        );
    let token_state = state.clone();
    let node_state = state.clone();
    let registry = crate::registry::router(
        state.modules.storage.clone(),
        crate::registry::Access {
            token_ok: Arc::new(move |t: &str| token_state.admin_token_ok(t)),
            node: Arc::new(move |ext| registry_reader(&node_state, ext.get::<PeerAuth>())),
        },
    );
    Router::new()
        .merge(admin)
        .merge(node)
        .route(
            "/healthz",
            get(|| async { axum::Json(serde_json::json!({"ok": true})) }),
        )
        .fallback(not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY_BYTES))
        .layer(middleware::map_response_with_state(
            state.clone(),
            date_header,
        ))
        .with_state(state)
        // After the JSON body limit: registry uploads stream with their own bound.
        .merge(registry)
}

/// The `Date` of every answer is the control plane's clock, the one that dates
/// certificates: nodes judge certificate dates by it, not by their own RTC. (hyper
/// would write the system clock; the two differ only where a test skews the clock.)
async fn date_header(State(st): State<AppState>, mut resp: Response) -> Response {
    let secs = u64::try_from(st.clock.now_ms().div_euclid(1000)).unwrap_or(0);
    let date =
        httpdate::fmt_http_date(std::time::UNIX_EPOCH + std::time::Duration::from_secs(secs));
    if let Ok(v) = header::HeaderValue::from_str(&date) {
        resp.headers_mut().insert(header::DATE, v);
    }
    resp
}

async fn not_found() -> AppError {
    AppError::new(
        StatusCode::NOT_FOUND,
        ErrorCode::NotFound,
        "no such endpoint",
    )
}

async fn method_not_allowed() -> AppError {
    AppError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        ErrorCode::BadRequest,
        "method not allowed on this endpoint",
    )
}

/// `Authorization: Bearer <admin token>` on every admin route.
async fn admin_auth(State(state): State<AppState>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
        .map(str::trim);
    match presented {
        None => AppError::unauthorized(
            ErrorCode::AdminTokenMissing,
            "admin API needs `Authorization: Bearer <admin token>`",
        )
        .into_response(),
        Some(t) if state.admin_token_ok(t) => next.run(req).await,
        Some(_) => {
            AppError::forbidden(ErrorCode::AdminTokenInvalid, "wrong admin token").into_response()
        }
    }
}

/// JSON body extractor whose failures are [`AppError`]s: `malformed_json` for text
/// that is not JSON, `bad_request` for JSON of the wrong shape, `payload_too_large`
/// above [`MAX_BODY_BYTES`]. An empty body reads as `{}`.
#[derive(Debug)]
pub struct Json<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Json<T> {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, AppError> {
        let bytes = Bytes::from_request(req, state).await.map_err(|e| {
            if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                AppError::new(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    ErrorCode::PayloadTooLarge,
                    format!("request body exceeds {MAX_BODY_BYTES} bytes"),
                )
            } else {
                AppError::bad_request(format!("cannot read request body: {}", e.body_text()))
            }
        })?;
        let body: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
            b"{}"
        } else {
            &bytes
        };
        serde_json::from_slice(body).map(Json).map_err(|e| {
            if e.classify() == serde_json::error::Category::Data {
                AppError::bad_request(format!("request body has the wrong shape: {e}"))
            } else {
                AppError::new(
                    StatusCode::BAD_REQUEST,
                    ErrorCode::MalformedJson,
                    format!("request body is not valid JSON: {e}"),
                )
            }
        })
    }
}

/// The caller's verified, unexpired client certificate (not yet checked against
/// revocation and instance state: that happens under the state lock).
#[derive(Debug)]
pub struct NodeCert(pub Arc<ClientIdentity>);

/// What the node API makes of the TLS layer's verdict: the certificate when it is
/// ours and unexpired (by the server's clock).
fn node_certificate(peer: Option<&PeerAuth>, state: &AppState) -> AppResult<Arc<ClientIdentity>> {
    match peer {
        None | Some(PeerAuth::Anonymous) => Err(AppError::unauthorized(
            ErrorCode::ClientCertificateRequired,
            "this endpoint needs the client certificate from enrollment",
        )),
        Some(PeerAuth::Invalid(why)) => Err(AppError::unauthorized(
            ErrorCode::ClientCertificateInvalid,
            why.to_string(),
        )),
        Some(PeerAuth::Verified(id)) => {
            if state.clock.now_ms() >= id.not_after_ms {
                return Err(AppError::unauthorized(
                    ErrorCode::CertificateExpired,
                    format!(
                        "the client certificate has expired; re-enroll it at {}",
                        paths::CERTIFICATE_REISSUE
                    ),
                ));
            }
            Ok(id.clone())
        }
    }
}

impl FromRequestParts<AppState> for NodeCert {
    type Rejection = AppError;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, AppError> {
        node_certificate(parts.extensions.get::<PeerAuth>(), state).map(NodeCert)
    }
}

/// The embedded registry's view of a reader's client certificate: the node API's
/// checks, the certificate's ([`node_certificate`]) then the state's
/// ([`AppState::authorize_node`]: not revoked, instance known and not terminated).
fn registry_reader(state: &AppState, peer: Option<&PeerAuth>) -> crate::registry::NodeReader {
    use crate::registry::NodeReader;
    if matches!(peer, None | Some(PeerAuth::Anonymous)) {
        return NodeReader::Absent;
    }
    match node_certificate(peer, state).and_then(|id| state.authorize_node(&id).map(|()| id)) {
        Ok(id) => NodeReader::Live(id.instance_id.clone()),
        Err(e) => {
            let instance = match peer {
                Some(PeerAuth::Verified(id)) => format!(" (instance {})", id.instance_id),
                _ => String::new(),
            };
            NodeReader::Refused(format!("{}: {}{instance}", e.code, e.message))
        }
    }
}

#[derive(Debug, Deserialize)]
struct ListQuery {
    limit: Option<u32>,
    instance_id: Option<String>,
}

fn list_query(q: Result<Query<ListQuery>, QueryRejection>) -> AppResult<(u32, Option<String>)> {
    let Query(q) = q.map_err(|e| AppError::bad_request(e.body_text()))?;
    Ok((q.limit.unwrap_or(50).clamp(1, 1000), q.instance_id))
}

type JsonOut<T> = AppResult<axum::Json<T>>;

// ----- admin handlers ---------------------------------------------------------------

async fn create_node(
    State(st): State<AppState>,
    Json(req): Json<CreateNodeRequest>,
) -> AppResult<(StatusCode, axum::Json<NodeResponse>)> {
    let node = st.create_node(req).await?;
    Ok((StatusCode::CREATED, axum::Json(NodeResponse { node })))
}

async fn provision_cluster(
    State(st): State<AppState>,
    Json(req): Json<powernode_proto::admin::ProvisionClusterRequest>,
) -> AppResult<(
    StatusCode,
    axum::Json<powernode_proto::admin::ProvisionClusterResponse>,
)> {
    let made = st.provision_cluster(req).await?;
    Ok((StatusCode::CREATED, axum::Json(made)))
}

async fn list_nodes(State(st): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "nodes": st.list_nodes() }))
}

async fn get_node(State(st): State<AppState>, Path(id): Path<String>) -> JsonOut<NodeResponse> {
    Ok(axum::Json(NodeResponse {
        node: st.get_node(&id)?,
    }))
}

async fn update_node(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<UpdateNodeRequest>,
) -> JsonOut<NodeResponse> {
    Ok(axum::Json(NodeResponse {
        node: st.update_node(&id, req).await?,
    }))
}

async fn delete_node(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> JsonOut<powernode_proto::admin::DeleteNodeResponse> {
    Ok(axum::Json(st.delete_node(&id).await?))
}

async fn provision(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<ProvisionRequest>,
) -> AppResult<(
    StatusCode,
    axum::Json<powernode_proto::admin::ProvisionResponse>,
)> {
    Ok((
        StatusCode::CREATED,
        axum::Json(st.provision(&id, req).await?),
    ))
}

async fn list_publications(State(st): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({"publications": st.list_publications()}))
}

#[derive(Debug, Default, serde::Deserialize)]
struct PublishRequest {
    #[serde(default)]
    image_base: Option<std::path::PathBuf>,
}

async fn publish_image(
    State(st): State<AppState>,
    Json(req): Json<PublishRequest>,
) -> AppResult<(StatusCode, axum::Json<serde_json::Value>)> {
    let p = st.publish_image(req.image_base).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({"publication": p})),
    ))
}

async fn list_templates(State(st): State<AppState>) -> axum::Json<powernode_proto::admin::Catalog> {
    axum::Json(st.catalog())
}

async fn get_instance(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> JsonOut<powernode_proto::admin::InstanceResponse> {
    Ok(axum::Json(powernode_proto::admin::InstanceResponse {
        instance: st.get_instance(&id)?,
    }))
}

async fn instance_identity(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> JsonOut<serde_json::Value> {
    Ok(axum::Json(st.instance_identity(&id).await?))
}

async fn drain(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<DrainRequest>,
) -> JsonOut<powernode_proto::admin::InstanceActionResponse> {
    Ok(axum::Json(st.drain(&id, req).await?))
}

async fn terminate(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<TerminateRequest>,
) -> JsonOut<powernode_proto::admin::InstanceActionResponse> {
    Ok(axum::Json(st.terminate(&id, req).await?))
}

async fn drift(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> JsonOut<powernode_proto::admin::DriftReport> {
    Ok(axum::Json(st.drift_report(&id)?))
}

async fn reboot(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<powernode_proto::admin::RebootRequest>,
) -> JsonOut<powernode_proto::admin::InstanceActionResponse> {
    let params = serde_json::json!({
        "reason": req.reason.unwrap_or_else(|| "operator".into()),
        "drain_timeout_seconds": req.drain_timeout_seconds,
        // The agent's name for the same budget.
        "timeout_seconds": req.drain_timeout_seconds,
    });
    Ok(axum::Json(
        st.node_task(&id, powernode_proto::TaskKind::Reboot, params)
            .await?,
    ))
}

async fn collect_diagnostics(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<powernode_proto::admin::CollectDiagnosticsRequest>,
) -> JsonOut<powernode_proto::admin::InstanceActionResponse> {
    let params = serde_json::json!({
        "log_lines": req.log_lines.min(10_000),
        "max_bytes": powernode_proto::admin::MAX_TASK_RESULT_BYTES,
    });
    Ok(axum::Json(
        st.node_task(&id, powernode_proto::TaskKind::CollectDiagnostics, params)
            .await?,
    ))
}

async fn module_update(
    State(st): State<AppState>,
    Path(id): Path<String>,
) -> JsonOut<powernode_proto::admin::InstanceActionResponse> {
    Ok(axum::Json(
        st.node_task(
            &id,
            powernode_proto::TaskKind::ModuleUpdate,
            serde_json::Value::Null,
        )
        .await?,
    ))
}

#[derive(Debug, Deserialize)]
struct AttributionQuery {
    lookback_hours: Option<u64>,
}

async fn attribute_failure(
    State(st): State<AppState>,
    Path(id): Path<String>,
    q: Result<Query<AttributionQuery>, QueryRejection>,
) -> JsonOut<powernode_proto::admin::FailureAttribution> {
    let Query(q) = q.map_err(|e| AppError::bad_request(e.body_text()))?;
    Ok(axum::Json(
        st.attribute_failure(&id, q.lookback_hours.unwrap_or(24))
            .await?,
    ))
}

async fn get_task(State(st): State<AppState>, Path(id): Path<String>) -> JsonOut<TaskResponse> {
    Ok(axum::Json(TaskResponse {
        task: st.get_task(&id)?,
    }))
}

async fn cancel_task(State(st): State<AppState>, Path(id): Path<String>) -> JsonOut<TaskResponse> {
    Ok(axum::Json(TaskResponse {
        task: st.cancel_task(&id).await?,
    }))
}

async fn recent_signals(
    State(st): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> JsonOut<SignalsResponse> {
    let (limit, instance) = list_query(q)?;
    Ok(axum::Json(SignalsResponse {
        signals: st.recent_signals(limit, instance).await?,
    }))
}

async fn recent_events(
    State(st): State<AppState>,
    q: Result<Query<ListQuery>, QueryRejection>,
) -> JsonOut<EventsResponse> {
    let (limit, instance) = list_query(q)?;
    Ok(axum::Json(EventsResponse {
        events: st.recent_events(limit, instance).await?,
    }))
}

// ----- admin: module publications -------------------------------------------------------

async fn list_module_publications(State(st): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(serde_json::json!({ "publications": st.module_publications() }))
}

async fn module_signing_key(State(st): State<AppState>) -> JsonOut<serde_json::Value> {
    Ok(axum::Json(
        serde_json::json!({"public_key_pem": st.module_signing_key()?}),
    ))
}

async fn module_trust(State(st): State<AppState>) -> axum::Json<serde_json::Value> {
    axum::Json(st.module_trust())
}

async fn sign_module(
    State(st): State<AppState>,
    Json(req): Json<SignRequest>,
) -> JsonOut<serde_json::Value> {
    Ok(axum::Json(st.sign_module(req)?))
}

async fn record_module_publication(
    State(st): State<AppState>,
    Json(req): Json<RecordRequest>,
) -> AppResult<(StatusCode, axum::Json<serde_json::Value>)> {
    let p = st.record_module_publication(req).await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(serde_json::json!({ "publication": p })),
    ))
}

async fn set_template_modules(
    State(st): State<AppState>,
    Path(id): Path<String>,
    Json(req): Json<SetTemplateModules>,
) -> JsonOut<serde_json::Value> {
    let template = st.set_template_modules(&id, req).await?;
    Ok(axum::Json(serde_json::json!({ "template": template })))
}

// ----- node handlers ----------------------------------------------------------------

async fn enroll(
    State(st): State<AppState>,
    Json(req): Json<EnrollmentRequest>,
) -> JsonOut<powernode_proto::node::EnrollmentResponse> {
    Ok(axum::Json(st.enroll(req).await?))
}

async fn boot_report(
    State(st): State<AppState>,
    Json(req): Json<powernode_proto::boot_report::BootReportRequest>,
) -> JsonOut<powernode_proto::boot_report::BootReportResponse> {
    Ok(axum::Json(st.boot_report(req).await?))
}

async fn handshake(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
    Json(req): Json<HandshakeRequest>,
) -> JsonOut<powernode_proto::node::HandshakeResponse> {
    let r = st.handshake(&id, req).await;
    Ok(axum::Json(
        st.note_node_error(&id, paths::HANDSHAKE, r).await?,
    ))
}

async fn heartbeat(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
    Json(req): Json<HeartbeatRequest>,
) -> JsonOut<powernode_proto::node::HeartbeatResponse> {
    let r = st.heartbeat(&id, req).await;
    Ok(axum::Json(
        st.note_node_error(&id, paths::HEARTBEAT, r).await?,
    ))
}

async fn desired_modules(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
) -> JsonOut<powernode_proto::node::DesiredModulesResponse> {
    let r = st.desired_modules(&id);
    Ok(axum::Json(
        st.note_node_error(&id, paths::DESIRED_MODULES, r).await?,
    ))
}

async fn renew_certificate(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
    Json(req): Json<RenewRequest>,
) -> JsonOut<powernode_proto::node::EnrollmentResponse> {
    let r = st.renew_certificate(&id, req).await;
    Ok(axum::Json(
        st.note_node_error(&id, paths::CERTIFICATE_RENEW, r).await?,
    ))
}

/// No client certificate needed: the body carries the expired one and a CSR signed
/// by its key.
async fn reissue_certificate(
    State(st): State<AppState>,
    Json(req): Json<ReissueRequest>,
) -> JsonOut<powernode_proto::node::EnrollmentResponse> {
    Ok(axum::Json(st.reissue_certificate(req).await?))
}

async fn lease(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
    Json(req): Json<LeaseRequest>,
) -> JsonOut<powernode_proto::node::LeaseResponse> {
    let r = st.lease(&id, req).await;
    Ok(axum::Json(
        st.note_node_error(&id, paths::TASK_LEASE, r).await?,
    ))
}

async fn renew_lease(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
    Path(task_id): Path<String>,
    Json(req): Json<RenewLeaseRequest>,
) -> JsonOut<powernode_proto::node::RenewLeaseResponse> {
    let r = st.renew_lease(&id, &task_id, req).await;
    Ok(axum::Json(
        st.note_node_error(&id, "worker_api/tasks/renew", r).await?,
    ))
}

async fn complete_task(
    State(st): State<AppState>,
    NodeCert(id): NodeCert,
    Path(task_id): Path<String>,
    Json(req): Json<CompleteTaskRequest>,
) -> JsonOut<powernode_proto::node::CompleteTaskResponse> {
    let r = st.complete_task(&id, &task_id, req).await;
    Ok(axum::Json(
        st.note_node_error(&id, "worker_api/tasks/complete", r)
            .await?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::body::Body;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn state() -> (tempfile::TempDir, AppState) {
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
        let ca = crate::ca::Ca::load_or_create(dir.path()).unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let st = AppState::new(
            cfg,
            "https://127.0.0.1:1".into(),
            crate::Clock::default(),
            ca,
            store,
            "admin-secret",
        )
        .unwrap();
        (dir, st)
    }

    async fn send(router: &Router, req: Request) -> (StatusCode, serde_json::Value) {
        let resp = router.clone().oneshot(req).await.unwrap();
        let status = resp.status();
        let body = resp.into_body().collect().await.unwrap().to_bytes();
        (status, serde_json::from_slice(&body).unwrap())
    }

    fn post(path: &str, body: &'static str, auth: bool) -> Request {
        let mut b = Request::post(path).header("content-type", "application/json");
        if auth {
            b = b.header("authorization", "Bearer admin-secret");
        }
        b.body(Body::from(body)).unwrap()
    }

    #[tokio::test]
    async fn errors_are_json_with_codes_in_process() {
        let (_dir, st) = state();
        let router = app(st);
        let (s, v) = send(&router, post(paths::ADMIN_NODES, "{nope", true)).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::BAD_REQUEST, Some("malformed_json"))
        );
        let (s, v) = send(&router, post(paths::ADMIN_NODES, "{}", false)).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("admin_token_missing"))
        );
        let (s, v) = send(
            &router,
            post(
                paths::ADMIN_NODES,
                r#"{"hostname":"a","lifecycle_class":"spot"}"#,
                true,
            ),
        )
        .await;
        assert_eq!(s, StatusCode::CREATED);
        assert_eq!(v["node"]["status"], "no_instance");
        let (s, v) = send(
            &router,
            Request::get(paths::ENROLLMENT).body(Body::empty()).unwrap(),
        )
        .await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::METHOD_NOT_ALLOWED, Some("bad_request"))
        );
    }

    #[tokio::test]
    async fn the_accept_loops_verdict_decides_node_calls() {
        let (_dir, st) = state();
        let router = app(st);
        let (s, v) = send(&router, post(paths::HEARTBEAT, "{}", false)).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (
                StatusCode::UNAUTHORIZED,
                Some("client_certificate_required")
            )
        );
        let mut req = post(paths::HEARTBEAT, "{}", false);
        req.extensions_mut()
            .insert(PeerAuth::Invalid("other CA".into()));
        let (s, v) = send(&router, req).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("client_certificate_invalid"))
        );
        // Verified at connect time, but expired since.
        let mut req = post(paths::HEARTBEAT, "{}", false);
        req.extensions_mut()
            .insert(PeerAuth::Verified(Arc::new(ClientIdentity {
                instance_id: "inst-x".into(),
                serial: "01".into(),
                not_before_ms: 0,
                not_after_ms: 1000,
                public_key: Vec::new(),
            })));
        let (s, v) = send(&router, req).await;
        // Its own code, one the node re-enrolls on (not a final refusal).
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("certificate_expired"))
        );
        // Valid, but not a serial this control plane issued.
        let mut req = post(
            paths::HEARTBEAT,
            r#"{"instance_id":"inst-x","phase":"ready","uptime_seconds":1,"agent_version":"t"}"#,
            false,
        );
        req.extensions_mut()
            .insert(PeerAuth::Verified(Arc::new(ClientIdentity {
                instance_id: "inst-x".into(),
                serial: "01".into(),
                not_before_ms: 0,
                not_after_ms: i64::MAX,
                public_key: Vec::new(),
            })));
        let (s, v) = send(&router, req).await;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (StatusCode::UNAUTHORIZED, Some("client_certificate_invalid"))
        );
    }

    /// Registry reads judge a node certificate as the node API does, and say why
    /// they refuse one: a terminated instance (even one whose certificate a crash
    /// left unrevoked), a revoked certificate, an expired one, a foreign one.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn registry_reads_judge_the_node_certificate_as_the_node_api_does() {
        use powernode_proto::admin::{CreateNodeRequest, ProvisionRequest};
        use powernode_proto::node::EnrollmentRequest;
        use powernode_proto::InstanceStatus;
        let dir = tempfile::tempdir().unwrap();
        let cfg = crate::Config::new(dir.path().to_path_buf(), "127.0.0.1:0".parse().unwrap());
        let st = AppState::with_provider(
            cfg,
            "https://127.0.0.1:1".into(),
            crate::Clock::default(),
            crate::ca::Ca::load_or_create(dir.path()).unwrap(),
            crate::store::Store::open(dir.path()).unwrap(),
            "admin-secret",
            Box::new(crate::provider::Recorder { image_base: None }),
        )
        .unwrap();
        let node = st
            .create_node(CreateNodeRequest {
                hostname: "reader".into(),
                template_id: crate::catalog::TEMPLATE_EDGE_BASE.into(),
                lifecycle_class: powernode_proto::LifecycleClass::Ephemeral,
                labels: Default::default(),
            })
            .await
            .unwrap();
        let inst = st
            .provision(&node.id, ProvisionRequest::default())
            .await
            .unwrap()
            .instance
            .id;
        let doc = st.instance_identity(&inst).await.unwrap();
        let (_key, csr) = crate::ca::tests::ed25519_csr(&inst);
        let enrolled = st
            .enroll(EnrollmentRequest {
                bootstrap_token: doc["bootstrap_token"].as_str().unwrap().into(),
                node_id: node.id.clone(),
                instance_id: inst.clone(),
                csr_pem: csr,
                identity_source: "file".into(),
                agent_version: "t".into(),
                provider: None,
            })
            .await
            .unwrap();
        let der = crate::ca::pem_certs(&enrolled.certificate_pem).remove(0);
        let ident = crate::ca::parse_client_leaf(&der).unwrap();
        let router = app(st.clone());
        // An unknown blob: 404 once the reader is let in, 401 (and why) otherwise.
        let read = |peer: Option<PeerAuth>| {
            let router = router.clone();
            async move {
                let mut req = Request::get(format!("/v2/m/x/blobs/sha256:{}", "0".repeat(64)))
                    .body(Body::empty())
                    .unwrap();
                if let Some(p) = peer {
                    req.extensions_mut().insert(p);
                }
                let (s, v) = send(&router, req).await;
                let msg = v["errors"][0]["message"].as_str().unwrap_or("").to_string();
                (s, msg)
            }
        };
        let verified = |id: &ClientIdentity| Some(PeerAuth::Verified(Arc::new(id.clone())));

        let (s, msg) = read(None).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(msg.starts_with("no credentials"), "{msg}");
        let (s, msg) = read(Some(PeerAuth::Anonymous)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED, "{msg}");
        let (s, msg) = read(verified(&ident)).await;
        assert_eq!(s, StatusCode::NOT_FOUND, "a live node reads: {msg}");

        let (s, msg) = read(Some(PeerAuth::Invalid("not issued by our CA".into()))).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(msg.contains("client_certificate_invalid"), "{msg}");
        let expired = ClientIdentity {
            not_after_ms: 1000,
            ..ident.clone()
        };
        let (s, msg) = read(verified(&expired)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(msg.contains("certificate_expired"), "{msg}");

        // The instance ended but its certificate stayed unrevoked (a crash between
        // the two writes): refused all the same, naming the instance.
        st.lock().instances.get_mut(&inst).unwrap().status = InstanceStatus::Terminated;
        let (s, msg) = read(verified(&ident)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(
            msg.contains("instance_terminated") && msg.contains(&inst),
            "{msg}"
        );
        st.lock().instances.get_mut(&inst).unwrap().status = InstanceStatus::Running;
        let (s, _) = read(verified(&ident)).await;
        assert_eq!(s, StatusCode::NOT_FOUND);
        st.lock().certs.get_mut(&ident.serial).unwrap().revoked = true;
        let (s, msg) = read(verified(&ident)).await;
        assert_eq!(s, StatusCode::UNAUTHORIZED);
        assert!(msg.contains("certificate_revoked"), "{msg}");
    }
}
