//! The one error type of the API and the one place where errors become HTTP status codes.

use std::error::Error as StdError;

/// An API call that did not succeed. Handlers return it; the server turns it into a status code and
/// Cloud Hypervisor's error body: a JSON array of the messages of the error and its sources,
/// outermost first ([`error_messages`]).
///
/// Messages say what went wrong and, where the caller can act, what to do.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The request is malformed or asks for something impossible (400).
    #[error("{reason}")]
    BadRequest { reason: String },
    /// A request body that did not parse into the endpoint's type (400).
    #[error("invalid body for {endpoint} (schema {schema} in api/openapi.yaml)")]
    InvalidBody {
        endpoint: &'static str,
        schema: &'static str,
        #[source]
        source: serde_json::Error,
    },
    /// No endpoint at this path (404).
    #[error("no endpoint {path}: see api/openapi.yaml for the endpoints under /api/v1/")]
    NotFound { path: String },
    /// The endpoint exists but not with this method (405).
    #[error("{path} does not accept {method}: use {allowed}")]
    MethodNotAllowed {
        path: String,
        method: String,
        allowed: &'static str,
    },
    /// The VMM has no VM for an operation that needs one (409).
    #[error("no VM in this VMM: boot one, or receive one with vm.receive-migration")]
    NoVm,
    /// A migration is already in flight (409).
    #[error("a migration is already running: watch it with GET vm.migration or stop it with vm.migration-cancel")]
    MigrationRunning,
    /// `vm.migration-cancel` without a migration in flight (409).
    #[error("no migration is running: there is nothing to cancel")]
    NoMigrationRunning,
    /// The VM is in a state that does not allow the operation (409).
    #[error("cannot {operation} while the VM is {state}")]
    InvalidState {
        operation: &'static str,
        state: String,
    },
    /// Any other conflict with the VMM's current state (409).
    #[error("{reason}")]
    Conflict { reason: String },
    /// The request body is larger than the server accepts (413).
    #[error("request body exceeds {limit_bytes} bytes: API bodies are small JSON objects")]
    PayloadTooLarge { limit_bytes: usize },
    /// The VMM failed while doing what was asked (500).
    #[error("{reason}")]
    Internal { reason: String },
    /// The VMM cannot answer right now, e.g. it did not answer within the server's deadline (503).
    #[error("{reason}")]
    Unavailable { reason: String },
}

impl ApiError {
    /// The HTTP status code for this error: the only mapping from errors to statuses in tern.
    pub fn status_code(&self) -> u16 {
        match self {
            ApiError::BadRequest { .. } | ApiError::InvalidBody { .. } => 400,
            ApiError::NotFound { .. } => 404,
            ApiError::MethodNotAllowed { .. } => 405,
            ApiError::NoVm
            | ApiError::MigrationRunning
            | ApiError::NoMigrationRunning
            | ApiError::InvalidState { .. }
            | ApiError::Conflict { .. } => 409,
            ApiError::PayloadTooLarge { .. } => 413,
            ApiError::Internal { .. } => 500,
            ApiError::Unavailable { .. } => 503,
        }
    }

    /// An internal error whose text is the whole chain of `err`, for handlers that wrap a VMM error.
    pub fn internal(err: &(dyn StdError + 'static)) -> Self {
        ApiError::Internal {
            reason: error_chain(err),
        }
    }

    /// The JSON body sent for this error, as Cloud Hypervisor's server writes it (its
    /// `vmm/src/api/http/mod.rs` `error_response`): an array of each error's message from the
    /// outermost to the root cause, e.g. `["invalid body for vm.send-migration (...)", "unknown
    /// field `speed`, expected ..."]`. CH's `api_client` hands this text to the user as it is.
    pub fn to_body(&self) -> serde_json::Value {
        serde_json::Value::from(error_messages(self))
    }
}

/// The message of `err` and of each of its sources, outermost first.
pub fn error_messages(err: &(dyn StdError + 'static)) -> Vec<String> {
    let mut messages = vec![err.to_string()];
    let mut source = err.source();
    while let Some(e) = source {
        messages.push(e.to_string());
        source = e.source();
    }
    messages
}

/// `err` and its sources joined by `": "`. Error messages do not interpolate their source, so this is
/// how the whole story reaches the user (once, at the edge).
pub fn error_chain(err: &(dyn StdError + 'static)) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(e) = source {
        text.push_str(": ");
        text.push_str(&e.to_string());
        source = e.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_codes_cover_each_class() {
        let bad_json = serde_json::from_str::<u32>("x").unwrap_err();
        let cases: Vec<(ApiError, u16)> = vec![
            (ApiError::BadRequest { reason: "r".into() }, 400),
            (
                ApiError::InvalidBody {
                    endpoint: "vm.x",
                    schema: "X",
                    source: bad_json,
                },
                400,
            ),
            (ApiError::NotFound { path: "/p".into() }, 404),
            (
                ApiError::MethodNotAllowed {
                    path: "/p".into(),
                    method: "GET".into(),
                    allowed: "PUT",
                },
                405,
            ),
            (ApiError::NoVm, 409),
            (ApiError::MigrationRunning, 409),
            (ApiError::NoMigrationRunning, 409),
            (
                ApiError::InvalidState {
                    operation: "pause",
                    state: "paused".into(),
                },
                409,
            ),
            (ApiError::Conflict { reason: "c".into() }, 409),
            (ApiError::PayloadTooLarge { limit_bytes: 1 }, 413),
            (ApiError::Internal { reason: "i".into() }, 500),
            (ApiError::Unavailable { reason: "u".into() }, 503),
        ];
        for (err, code) in cases {
            assert_eq!(err.status_code(), code, "{err:?}");
        }
    }

    #[test]
    fn body_carries_the_source_chain() {
        let source = serde_json::from_str::<u32>("\"x\"").unwrap_err();
        let err = ApiError::InvalidBody {
            endpoint: "vm.send-migration",
            schema: "VmSendMigrationData",
            source,
        };
        let body = err.to_body();
        let messages: Vec<&str> = body
            .as_array()
            .expect("an array")
            .iter()
            .map(|m| m.as_str().expect("a string"))
            .collect();
        assert_eq!(messages.len(), 2, "{body}");
        assert_eq!(
            messages[0],
            "invalid body for vm.send-migration (schema VmSendMigrationData in api/openapi.yaml)"
        );
        assert!(messages[1].starts_with("invalid type"), "{body}");
    }
}
