//! Enrolment: trading a join token and a CSR for a node certificate, once.
//!
//! The host makes its own key pair ([`keel_pki::make_csr`]); only the CSR
//! travels. The control plane answers with the node's id and epoch, its
//! certificate, both CA certificates, the task-signing keys and the URL where
//! reports go. All of it is checked before anything is written — the
//! certificate must name the node, each signing key must match its key id,
//! the report URL must be HTTPS, the TLS configurations must build — and then
//! saved in the state directory ([`crate::state`]).
//!
//! The enrolment request itself goes over plain HTTP, so its answer is not
//! authenticated by the transport. The operator closes that gap with
//! `--ca-fingerprint`, the SHA-256 of the control-plane CA certificate that
//! was delivered together with the join token: the control-plane CA is the
//! one root the agent will ever trust for its peers, so pinning it means a
//! man in the middle can at worst make enrolment fail, never make the agent
//! obey someone else. Without a pin the agent enrols anyway but says loudly
//! that it trusted whatever came back. A re-enrolment (`--reenrol`) pins
//! the control-plane CA the node already trusts unless another pin is given
//! (a CA rotation), and keeps the task-signing keys it learned.
//!
//! Everything that can be checked without the network (the URL, the pin's
//! syntax, the node name, whether the directory is usable and not already
//! enrolled) is checked *before* the single-use token is spent.

use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use sha2::{Digest as _, Sha256};
use time::OffsetDateTime;
use uuid::Uuid;

use crate::state::{
    AgentState, NodeRecord, StateError, create_private_dir, install_reenrolment, read_node_record,
    read_trust,
};

/// The path of the enrolment endpoint below the api's base URL.
pub const ENROL_PATH: &str = "/v1/nodes/enrol";

/// How long the whole enrolment request may take.
const ENROL_REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

/// How much of an unexpected response body goes into an error message.
const MAX_ERROR_BODY_CHARS: usize = 300;

/// What `keel-agent enrol` was asked to do.
#[derive(Clone, PartialEq, Eq)]
pub struct EnrolOptions {
    /// The api's base URL, `http://host:port`.
    pub api_url: String,
    /// The single-use join token, `ID.SECRET`.
    pub join_token: String,
    /// Where to save the enrolment.
    pub state_dir: PathBuf,
    /// The address the agent will serve on.
    pub listen: SocketAddr,
    /// The node's human-readable name.
    pub name: String,
    /// The expected SHA-256 (hex) of the control-plane CA certificate.
    pub ca_fingerprint: Option<String>,
    /// The URL the control plane should reach the agent at; defaults to
    /// `https://{listen}`.
    pub agent_url: Option<String>,
    /// Replace the enrolment in `state_dir` with a re-enrolment of the same
    /// node (a token from `api join-token --node ID`), keeping the task
    /// ledger and the workloads.
    pub reenrol: bool,
}

impl fmt::Debug for EnrolOptions {
    /// Leaves the join token's secret out, so options can be logged.
    fn fmt(&self, formatter: &mut fmt::Formatter<'_>) -> fmt::Result {
        let token_id = self.join_token.split('.').next().unwrap_or_default();
        formatter
            .debug_struct("EnrolOptions")
            .field("api_url", &self.api_url)
            .field("join_token", &format_args!("{token_id}.<redacted>"))
            .field("state_dir", &self.state_dir)
            .field("listen", &self.listen)
            .field("name", &self.name)
            .field("ca_fingerprint", &self.ca_fingerprint)
            .field("agent_url", &self.agent_url)
            .field("reenrol", &self.reenrol)
            .finish()
    }
}

impl EnrolOptions {
    /// The URL the control plane is told to reach the agent at.
    pub fn effective_agent_url(&self) -> String {
        self.agent_url
            .clone()
            .unwrap_or_else(|| format!("https://{}", self.listen))
    }
}

pub use crate::inventory::Capacity;

/// The body of the enrolment request.
#[derive(Debug, Serialize)]
struct EnrolRequest<'a> {
    join_token: &'a str,
    csr_pem: &'a str,
    name: &'a str,
    agent_url: &'a str,
    capacity: &'a Capacity,
}

/// The body of a successful enrolment response.
#[derive(Debug, Deserialize)]
struct EnrolResponse {
    node_id: Uuid,
    enrolment_epoch: u64,
    certificate_pem: String,
    node_ca_pem: String,
    control_plane_ca_pem: String,
    task_signing_keys: Vec<crate::keyring::PublishedKey>,
    agent_api_url: String,
}

/// The api's error body.
#[derive(Debug, Deserialize)]
struct ApiErrorBody {
    code: String,
    message: String,
    #[serde(default)]
    request_id: Option<String>,
}

/// The result of a successful enrolment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EnrolledNode {
    /// The id the control plane gave this node.
    pub node_id: Uuid,
    /// The enrolment epoch.
    pub enrolment_epoch: u64,
    /// Where the enrolment was saved.
    pub state_dir: PathBuf,
}

/// Why enrolment failed. Nothing is saved in any of these cases.
#[derive(Debug, thiserror::Error)]
pub enum EnrolError {
    /// The api URL is not a plain `http://` URL.
    #[error(
        "the api URL must start with http:// (enrolment over https is not supported yet, \
         because the agent has no trusted root before it enrols): {url:?}"
    )]
    UnsupportedApiUrl {
        /// The URL given.
        url: String,
    },

    /// The pinned fingerprint is not 64 hex digits.
    #[error("--ca-fingerprint must be 64 hex digits (a SHA-256), got {given:?}")]
    InvalidFingerprint {
        /// What was given.
        given: String,
    },

    /// The node name cannot go in a CSR.
    #[error("invalid node name {name:?}: {source}")]
    InvalidName {
        /// The name given.
        name: String,
        /// The PKI library's explanation.
        #[source]
        source: keel_pki::PkiError,
    },

    /// The machine's resources could not be determined.
    #[error("could not detect this machine's capacity: {0}")]
    Capacity(String),

    /// The state directory is unusable or already enrolled.
    #[error(transparent)]
    State(#[from] StateError),

    /// The HTTP client could not be built.
    #[error("could not build the HTTP client: {0}")]
    Client(#[source] reqwest::Error),

    /// The TLS library refused to build a client configuration.
    #[error("could not set up TLS for the HTTP client: {0}")]
    Tls(#[source] rustls::Error),

    /// The api could not be reached or did not answer in time.
    #[error("could not reach the api at {url}: {source}")]
    Unreachable {
        /// The enrolment URL.
        url: String,
        /// The HTTP client's error.
        #[source]
        source: reqwest::Error,
    },

    /// The api refused the enrolment with a structured error.
    #[error("the api refused the enrolment ({status}, {code}): {message}{}", request_id_suffix(.request_id))]
    Refused {
        /// The HTTP status.
        status: u16,
        /// The api's error code, e.g. `invalid_join_token`.
        code: String,
        /// The api's explanation.
        message: String,
        /// The api's request id, for its logs.
        request_id: Option<String>,
    },

    /// The api answered with something that is not the agreed format.
    #[error("unexpected response from the api ({status}): {body}")]
    UnexpectedResponse {
        /// The HTTP status.
        status: u16,
        /// The start of the body.
        body: String,
    },

    /// A re-enrolment without a pin found no usable control-plane CA saved.
    #[error(
        "the control-plane CA saved in {dir} is not one readable certificate; \
         re-enrol with --ca-fingerprint"
    )]
    SavedControlPlaneCa {
        /// The state directory.
        dir: std::path::PathBuf,
    },

    /// The control-plane CA in the response is not the pinned one.
    #[error(
        "the control-plane CA certificate has fingerprint {actual}, but {expected} was pinned; \
         nothing was saved"
    )]
    FingerprintMismatch {
        /// The pinned fingerprint (lowercase).
        expected: String,
        /// The fingerprint of what came back.
        actual: String,
    },

    /// The control-plane CA in the response is not exactly one certificate.
    #[error("the response must carry exactly one control-plane CA certificate, it has {count}")]
    ControlPlaneCaCount {
        /// How many certificates it carried.
        count: usize,
    },

    /// The response parsed but its contents do not fit together.
    #[error("the api's response is unusable: {0}")]
    InvalidResponse(#[source] StateError),

    /// A re-enrolment token made this machine another node.
    #[error(
        "the join token enrolled node {got}, but this state directory is node {expected}: \
         nothing was saved; create a token with `api join-token --node {expected}`"
    )]
    OtherNode {
        /// The node this directory holds.
        expected: Uuid,
        /// The node the token made.
        got: Uuid,
    },
}

fn request_id_suffix(request_id: &Option<String>) -> String {
    request_id
        .as_deref()
        .map(|id| format!(" (request id {id})"))
        .unwrap_or_default()
}

/// Enrols this machine and saves the result in `options.state_dir`.
pub async fn enrol(options: &EnrolOptions) -> Result<EnrolledNode, EnrolError> {
    if !options.api_url.starts_with("http://") {
        return Err(EnrolError::UnsupportedApiUrl {
            url: options.api_url.clone(),
        });
    }
    let pinned_fingerprint = options
        .ca_fingerprint
        .as_deref()
        .map(normalise_fingerprint)
        .transpose()?;
    let enrolled = AgentState::is_enrolled(&options.state_dir);
    if enrolled && !options.reenrol {
        return Err(StateError::AlreadyEnrolled {
            dir: options.state_dir.clone(),
        }
        .into());
    }
    if options.reenrol && !enrolled {
        return Err(StateError::NotEnrolled {
            dir: options.state_dir.clone(),
        }
        .into());
    }
    let current_node = if options.reenrol {
        Some(read_node_record(&options.state_dir)?)
    } else {
        None
    };
    // A re-enrolment trusts the control-plane CA the node trusts already
    // unless the operator pins another one, and keeps what the node learned
    // about task-signing keys (a retirement it saw must not be undone by an
    // answer that lists the key as it was first published).
    // With an explicit pin, damaged trust files do not stand in the way
    // (that is the recovery case): the node starts over with what the
    // pinned CA vouches for.
    let current_trust = match (options.reenrol, &pinned_fingerprint) {
        (false, _) => None,
        (true, None) => Some(read_trust(&options.state_dir)?),
        (true, Some(_)) => read_trust(&options.state_dir)
            .inspect_err(|error| {
                tracing::warn!(%error, "the saved trust is unreadable; starting over with the pinned CA");
            })
            .ok(),
    };
    let current_ca_fingerprint = match &current_trust {
        None => None,
        Some((ca_pem, _)) => match single_certificate_fingerprint(ca_pem) {
            Ok(fingerprint) => Some(fingerprint),
            Err(_) if pinned_fingerprint.is_some() => None,
            Err(_) => {
                return Err(EnrolError::SavedControlPlaneCa {
                    dir: options.state_dir.clone(),
                });
            }
        },
    };
    let pinned_fingerprint = pinned_fingerprint.or_else(|| current_ca_fingerprint.clone());
    // Created now, so that an unusable directory is found before the join
    // token is spent.
    create_private_dir(&options.state_dir)?;
    let capacity = crate::inventory::detect(&options.state_dir)
        .await
        .map_err(EnrolError::Capacity)?;
    let (csr_pem, key_pem) =
        keel_pki::make_csr(&options.name).map_err(|source| EnrolError::InvalidName {
            name: options.name.clone(),
            source,
        })?;
    if pinned_fingerprint.is_none() {
        tracing::warn!(
            "no --ca-fingerprint given: the control-plane CA received in the answer will be \
             trusted without any check"
        );
    }

    let agent_url = options.effective_agent_url();
    let request = EnrolRequest {
        join_token: &options.join_token,
        csr_pem: &csr_pem,
        name: &options.name,
        agent_url: &agent_url,
        capacity: &capacity,
    };
    let response = post_enrolment(&options.api_url, &request).await?;

    check_control_plane_ca(
        &response.control_plane_ca_pem,
        pinned_fingerprint.as_deref(),
    )?;
    if let Some(current) = &current_node
        && current.node_id != response.node_id
    {
        return Err(EnrolError::OtherNode {
            expected: current.node_id,
            got: response.node_id,
        });
    }
    // Only keys the (pinned) control-plane CA vouches for.
    let control_plane_ca_der = keel_pki::certs_from_pem(&response.control_plane_ca_pem)
        .ok()
        .and_then(|certs| certs.into_iter().next())
        .map(|der| der.as_ref().to_vec())
        .unwrap_or_default();
    let same_ca = current_ca_fingerprint.as_deref()
        == Some(single_certificate_fingerprint(&response.control_plane_ca_pem)?.as_str());
    let known = match current_trust {
        Some((_, keys)) if same_ca => keys,
        _ => Vec::new(),
    };
    let keys = crate::keyring::merge(&known, &response.task_signing_keys, &control_plane_ca_der);
    for (key_id, reason) in &keys.refused {
        tracing::warn!(%key_id, reason, "refused a task-signing key in the enrolment answer");
    }
    let state = AgentState {
        dir: options.state_dir.clone(),
        node: NodeRecord {
            node_id: response.node_id,
            enrolment_epoch: response.enrolment_epoch,
            name: options.name.clone(),
            listen: options.listen,
            agent_url,
            agent_api_url: response.agent_api_url,
            enrolled_at: OffsetDateTime::now_utc(),
        },
        key_pem,
        cert_pem: response.certificate_pem,
        node_ca_pem: response.node_ca_pem,
        control_plane_ca_pem: response.control_plane_ca_pem,
        signing_keys: keys.records,
    };
    state.validate().map_err(EnrolError::InvalidResponse)?;
    if current_node.is_some() {
        install_reenrolment(&state)?;
    } else {
        state.save()?;
    }
    tracing::info!(
        node_id = %state.node.node_id,
        enrolment_epoch = state.node.enrolment_epoch,
        state_dir = %state.dir.display(),
        "enrolled"
    );
    Ok(EnrolledNode {
        node_id: state.node.node_id,
        enrolment_epoch: state.node.enrolment_epoch,
        state_dir: state.dir,
    })
}

/// Lowercase hex without separators, or an error if it is not a SHA-256.
/// Colons are accepted because that is how `openssl x509 -fingerprint`
/// prints fingerprints.
fn normalise_fingerprint(given: &str) -> Result<String, EnrolError> {
    let normalised: String = given
        .trim()
        .chars()
        .filter(|character| *character != ':')
        .collect::<String>()
        .to_ascii_lowercase();
    let is_sha256_hex = normalised.len() == 64
        && normalised
            .chars()
            .all(|character| character.is_ascii_hexdigit());
    if is_sha256_hex {
        Ok(normalised)
    } else {
        Err(EnrolError::InvalidFingerprint {
            given: given.to_owned(),
        })
    }
}

/// The control-plane CA must be exactly one certificate (a second one would
/// become a trust root the pin does not cover) and, if pinned, the pinned one.
fn check_control_plane_ca(
    control_plane_ca_pem: &str,
    pinned_fingerprint: Option<&str>,
) -> Result<(), EnrolError> {
    let actual = single_certificate_fingerprint(control_plane_ca_pem)?;
    if let Some(expected) = pinned_fingerprint
        && actual != expected
    {
        return Err(EnrolError::FingerprintMismatch {
            expected: expected.to_owned(),
            actual,
        });
    }
    Ok(())
}

/// The SHA-256 (lowercase hex) of the one certificate in `pem`.
fn single_certificate_fingerprint(pem: &str) -> Result<String, EnrolError> {
    let certificates = keel_pki::certs_from_pem(pem).map_err(|source| {
        EnrolError::InvalidResponse(StateError::Tls {
            what: "control-plane CA certificate",
            source,
        })
    })?;
    let [certificate] = certificates.as_slice() else {
        return Err(EnrolError::ControlPlaneCaCount {
            count: certificates.len(),
        });
    };
    Ok(hex::encode(Sha256::digest(certificate.as_ref())))
}

async fn post_enrolment(
    api_url: &str,
    request: &EnrolRequest<'_>,
) -> Result<EnrolResponse, EnrolError> {
    let url = format!("{}{ENROL_PATH}", api_url.trim_end_matches('/'));
    let response = plain_http_client()?
        .post(&url)
        .json(request)
        .send()
        .await
        .map_err(|source| EnrolError::Unreachable {
            url: url.clone(),
            source,
        })?;
    let status = response.status();
    let body = response
        .bytes()
        .await
        .map_err(|source| EnrolError::Unreachable {
            url: url.clone(),
            source,
        })?;

    if status.is_success() {
        return serde_json::from_slice(&body).map_err(|_| unexpected(status, &body));
    }
    match serde_json::from_slice::<ApiErrorBody>(&body) {
        Ok(error) => Err(EnrolError::Refused {
            status: status.as_u16(),
            code: error.code,
            message: error.message,
            request_id: error.request_id,
        }),
        Err(_) => Err(unexpected(status, &body)),
    }
}

fn unexpected(status: reqwest::StatusCode, body: &[u8]) -> EnrolError {
    let text = String::from_utf8_lossy(body);
    EnrolError::UnexpectedResponse {
        status: status.as_u16(),
        body: text
            .chars()
            .take(MAX_ERROR_BODY_CHARS)
            .collect::<String>()
            .escape_debug()
            .to_string(),
    }
}

/// An HTTP client for the plain-HTTP enrolment call.
///
/// reqwest is built without a default TLS provider, and building a client
/// without TLS configuration would look for a process-wide one and panic. It
/// is therefore given a TLS configuration that trusts no root at all: TLS is
/// never used here (only `http://` URLs get this far), and if it ever were,
/// every server would be refused.
fn plain_http_client() -> Result<reqwest::Client, EnrolError> {
    let trust_nothing = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(EnrolError::Tls)?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    reqwest::Client::builder()
        .use_preconfigured_tls(trust_nothing)
        .timeout(ENROL_REQUEST_TIMEOUT)
        // A redirect could carry the join token to another host.
        .redirect(reqwest::redirect::Policy::none())
        .build()
        .map_err(EnrolError::Client)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_are_compared_case_insensitively_and_may_contain_colons() {
        let lower = "ab".repeat(32);
        assert_eq!(normalise_fingerprint(&"AB".repeat(32)).unwrap(), lower);
        let with_colons = vec!["AB"; 32].join(":");
        assert_eq!(normalise_fingerprint(&with_colons).unwrap(), lower);
        assert!(normalise_fingerprint("abc").is_err());
        assert!(normalise_fingerprint(&"zz".repeat(32)).is_err());
    }

    #[test]
    fn the_join_token_secret_never_appears_in_debug_output() {
        let options = EnrolOptions {
            api_url: "http://127.0.0.1:8080".to_owned(),
            join_token: "token-id.very-secret".to_owned(),
            state_dir: PathBuf::from("/tmp/x"),
            listen: "127.0.0.1:7443".parse().unwrap(),
            name: "node-a".to_owned(),
            ca_fingerprint: None,
            agent_url: None,
            reenrol: false,
        };
        let debug = format!("{options:?}");
        assert!(debug.contains("token-id"));
        assert!(!debug.contains("very-secret"));
    }

    #[test]
    fn the_agent_url_defaults_to_https_on_the_listen_address() {
        let options = EnrolOptions {
            api_url: String::new(),
            join_token: String::new(),
            state_dir: PathBuf::new(),
            listen: "127.0.0.1:7443".parse().unwrap(),
            name: String::new(),
            ca_fingerprint: None,
            agent_url: None,
            reenrol: false,
        };
        assert_eq!(options.effective_agent_url(), "https://127.0.0.1:7443");
    }
}
