//! (method, path) → endpoint → handler call. Knows nothing of HTTP libraries, so it is tested alone.

use serde::de::DeserializeOwned;
use serde::Serialize;

use crate::error::ApiError;
use crate::handler::ApiHandler;

/// Every endpoint lives under this prefix.
pub const API_PREFIX: &str = "/api/v1/";

/// HTTP methods the API uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum HttpMethod {
    Get,
    Put,
}

impl HttpMethod {
    pub fn as_str(self) -> &'static str {
        match self {
            HttpMethod::Get => "GET",
            HttpMethod::Put => "PUT",
        }
    }
}

/// One API endpoint. [`Endpoint::ALL`] is the route table the spec test compares with openapi.yaml.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Endpoint {
    VmmPing,
    VmmShutdown,
    VmCreate,
    VmBoot,
    VmDelete,
    VmReboot,
    VmInfo,
    VmPause,
    VmResume,
    VmShutdown,
    VmSendMigration,
    VmReceiveMigration,
    VmMigration,
    VmMigrationCancel,
}

impl Endpoint {
    pub const ALL: [Endpoint; 14] = [
        Endpoint::VmmPing,
        Endpoint::VmmShutdown,
        Endpoint::VmCreate,
        Endpoint::VmBoot,
        Endpoint::VmDelete,
        Endpoint::VmReboot,
        Endpoint::VmInfo,
        Endpoint::VmPause,
        Endpoint::VmResume,
        Endpoint::VmShutdown,
        Endpoint::VmSendMigration,
        Endpoint::VmReceiveMigration,
        Endpoint::VmMigration,
        Endpoint::VmMigrationCancel,
    ];

    /// The Cloud Hypervisor-style name, e.g. `vm.send-migration`.
    pub fn name(self) -> &'static str {
        match self {
            Endpoint::VmmPing => "vmm.ping",
            Endpoint::VmmShutdown => "vmm.shutdown",
            Endpoint::VmCreate => "vm.create",
            Endpoint::VmBoot => "vm.boot",
            Endpoint::VmDelete => "vm.delete",
            Endpoint::VmReboot => "vm.reboot",
            Endpoint::VmInfo => "vm.info",
            Endpoint::VmPause => "vm.pause",
            Endpoint::VmResume => "vm.resume",
            Endpoint::VmShutdown => "vm.shutdown",
            Endpoint::VmSendMigration => "vm.send-migration",
            Endpoint::VmReceiveMigration => "vm.receive-migration",
            Endpoint::VmMigration => "vm.migration",
            Endpoint::VmMigrationCancel => "vm.migration-cancel",
        }
    }

    /// The full request path, e.g. `/api/v1/vm.info`.
    pub fn path(self) -> String {
        format!("{API_PREFIX}{}", self.name())
    }

    pub fn method(self) -> HttpMethod {
        match self {
            Endpoint::VmmPing | Endpoint::VmInfo | Endpoint::VmMigration => HttpMethod::Get,
            _ => HttpMethod::Put,
        }
    }

    /// Name of the request body's schema (in openapi.yaml and in [`crate::types`]), if it takes one.
    pub fn request_schema(self) -> Option<&'static str> {
        match self {
            Endpoint::VmCreate => Some("VmConfig"),
            Endpoint::VmSendMigration => Some("VmSendMigrationData"),
            Endpoint::VmReceiveMigration => Some("VmReceiveMigrationData"),
            _ => None,
        }
    }

    /// Name of the 200 response body's schema; `None` means the endpoint answers 204 No Content.
    pub fn response_schema(self) -> Option<&'static str> {
        match self {
            Endpoint::VmmPing => Some("VmmPingResponse"),
            Endpoint::VmInfo => Some("VmInfo"),
            Endpoint::VmMigration => Some("MigrationStatus"),
            _ => None,
        }
    }

    fn from_name(name: &str) -> Option<Endpoint> {
        Endpoint::ALL.into_iter().find(|e| e.name() == name)
    }
}

/// Finds the endpoint for a request: [`ApiError::NotFound`] for an unknown path,
/// [`ApiError::MethodNotAllowed`] (with the allowed method) for a known path with another method.
pub fn route(method: &str, path: &str) -> Result<Endpoint, ApiError> {
    let endpoint = path
        .strip_prefix(API_PREFIX)
        .and_then(Endpoint::from_name)
        .ok_or_else(|| ApiError::NotFound {
            path: path.to_owned(),
        })?;
    let allowed = endpoint.method().as_str();
    if method != allowed {
        return Err(ApiError::MethodNotAllowed {
            path: path.to_owned(),
            method: method.to_owned(),
            allowed,
        });
    }
    Ok(endpoint)
}

/// What a successful call answers.
#[derive(Debug, Clone, PartialEq)]
pub enum Reply {
    /// 204 No Content.
    NoContent,
    /// 200 with this JSON body.
    Json(serde_json::Value),
}

/// Parses `body` for `endpoint` (bodies of endpoints that take none are ignored) and calls the handler.
pub fn dispatch(
    endpoint: Endpoint,
    body: &[u8],
    handler: &dyn ApiHandler,
) -> Result<Reply, ApiError> {
    match endpoint {
        Endpoint::VmmPing => json(handler.vmm_ping()?),
        Endpoint::VmmShutdown => handler.vmm_shutdown().map(|()| Reply::NoContent),
        Endpoint::VmCreate => handler
            .vm_create(parse_body(endpoint, body)?)
            .map(|()| Reply::NoContent),
        Endpoint::VmBoot => handler.vm_boot().map(|()| Reply::NoContent),
        Endpoint::VmDelete => handler.vm_delete().map(|()| Reply::NoContent),
        Endpoint::VmReboot => handler.vm_reboot().map(|()| Reply::NoContent),
        Endpoint::VmInfo => json(handler.vm_info()?),
        Endpoint::VmPause => handler.vm_pause().map(|()| Reply::NoContent),
        Endpoint::VmResume => handler.vm_resume().map(|()| Reply::NoContent),
        Endpoint::VmShutdown => handler.vm_shutdown().map(|()| Reply::NoContent),
        Endpoint::VmSendMigration => handler
            .vm_send_migration(parse_body(endpoint, body)?)
            .map(|()| Reply::NoContent),
        Endpoint::VmReceiveMigration => handler
            .vm_receive_migration(parse_body(endpoint, body)?)
            .map(|()| Reply::NoContent),
        Endpoint::VmMigration => json(handler.vm_migration_status()?),
        Endpoint::VmMigrationCancel => handler.vm_migration_cancel().map(|()| Reply::NoContent),
    }
}

fn parse_body<T: DeserializeOwned>(endpoint: Endpoint, body: &[u8]) -> Result<T, ApiError> {
    let schema = endpoint.request_schema().unwrap_or("request");
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(ApiError::BadRequest {
            reason: format!(
                "{} needs a JSON body: see its {schema} schema in api/openapi.yaml",
                endpoint.name(),
            ),
        });
    }
    let invalid = |source| ApiError::InvalidBody {
        endpoint: endpoint.name(),
        schema,
        source,
    };
    // Two steps: syntax errors keep their line and column, and only an object is accepted (serde
    // would also take a struct as a positional array, which no client means to send).
    let value: serde_json::Value = serde_json::from_slice(body).map_err(invalid)?;
    if !value.is_object() {
        return Err(ApiError::BadRequest {
            reason: format!(
                "{} body must be a JSON object, not {}: see its {schema} schema in api/openapi.yaml",
                endpoint.name(),
                json_kind(&value)
            ),
        });
    }
    serde_json::from_value(value).map_err(invalid)
}

fn json_kind(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

fn json<T: Serialize>(value: T) -> Result<Reply, ApiError> {
    serde_json::to_value(value)
        .map(Reply::Json)
        .map_err(|e| ApiError::internal(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn route_finds_every_endpoint_by_its_own_method_and_path() {
        for e in Endpoint::ALL {
            assert_eq!(route(e.method().as_str(), &e.path()).unwrap(), e);
        }
    }

    #[test]
    fn route_rejects_unknown_paths_with_404() {
        for path in [
            "/",
            "/api/v1/",
            "/api/v1/vm.infos",
            "/api/v2/vm.info",
            "/api/v1/vm.info/",
            "api/v1/vm.info",
            "/api/v1/VM.INFO",
        ] {
            let err = route("GET", path).unwrap_err();
            assert_eq!(err.status_code(), 404, "{path}");
        }
    }

    #[test]
    fn route_rejects_wrong_method_with_405_naming_the_allowed_one() {
        for e in Endpoint::ALL {
            let wrong = match e.method() {
                HttpMethod::Get => "PUT",
                HttpMethod::Put => "GET",
            };
            for method in [wrong, "POST", "DELETE", "HEAD"] {
                match route(method, &e.path()) {
                    Err(ApiError::MethodNotAllowed { allowed, .. }) => {
                        assert_eq!(allowed, e.method().as_str())
                    }
                    other => panic!("{method} {}: {other:?}", e.path()),
                }
            }
        }
    }

    #[test]
    fn endpoint_names_are_unique() {
        let mut names: Vec<_> = Endpoint::ALL.iter().map(|e| e.name()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Endpoint::ALL.len());
    }
}
