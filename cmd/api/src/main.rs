//! `api`: the Keel api binary.
//!
//! ```text
//! api [--config FILE] [serve]   run the api (migrates first by default)
//! api [--config FILE] migrate   apply migrations and exit
//! api [--config FILE] join-token [--ttl-secs N] [--node UUID]
//!                               create a one-time node join token (default 1 h);
//!                               with --node, one that re-enrols that node
//! api [--config FILE] keys rotate-task-signing [--overlap-secs N]
//!                               add a task-signing key that signs after N
//!                               seconds (default 3600, at least 600); the
//!                               others retire N seconds later
//! api [--config FILE] kms rotate
//!                               local KMS: add a master key for new envelopes
//! api [--config FILE] kms rewrap
//!                               re-seal every stored key under the current
//!                               master key (after a rotation)
//! api [--config FILE] kms status
//!                               which master keys sealed the stored keys
//! api [--config FILE] audit verify [--chain UUID]
//!                               verify the audit hash chains (all, or one
//!                               tenant's; the nil UUID is the platform's);
//!                               exits 1 if one is broken
//! api [--config FILE] operator create --email EMAIL [--role operator|read_only_operator]
//!                               create a platform operator; the password is
//!                               read from KEEL_OPERATOR_PASSWORD or stdin
//! api [--config FILE] billing reconcile [--tenant UUID]
//!                               check that every invoice adds up (total =
//!                               subtotal - credits + tax = its rated usage);
//!                               exits 1 on a discrepancy
//! api openapi                   print the OpenAPI document (used by make codegen)
//! ```

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{Context, bail};
use keel_api::{Config, telemetry};
use keel_auth::authz::PlatformRole;

enum Command {
    Serve,
    Migrate,
    Openapi,
    JoinToken {
        ttl_secs: i64,
        node: Option<uuid::Uuid>,
    },
    RotateTaskSigning {
        overlap_secs: i64,
    },
    KmsRotate,
    KmsRewrap,
    KmsStatus,
    AuditVerify {
        chain: Option<uuid::Uuid>,
    },
    OperatorCreate {
        email: Option<String>,
        role: PlatformRole,
    },
    BillingReconcile {
        tenant: Option<uuid::Uuid>,
    },
}

fn parse_args() -> anyhow::Result<(Command, Option<PathBuf>)> {
    let mut args = std::env::args().skip(1);
    let mut config = std::env::var_os("KEEL_CONFIG").map(PathBuf::from);
    let mut command = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" => config = Some(args.next().context("--config needs a file")?.into()),
            "serve" if command.is_none() => command = Some(Command::Serve),
            "migrate" if command.is_none() => command = Some(Command::Migrate),
            "openapi" if command.is_none() => command = Some(Command::Openapi),
            "join-token" if command.is_none() => {
                command = Some(Command::JoinToken {
                    ttl_secs: 3600,
                    node: None,
                })
            }
            "keys" if command.is_none() => match args.next().as_deref() {
                Some("rotate-task-signing") => {
                    command = Some(Command::RotateTaskSigning { overlap_secs: 3600 })
                }
                _ => bail!("usage: api keys rotate-task-signing [--overlap-secs N]"),
            },
            "kms" if command.is_none() => match args.next().as_deref() {
                Some("rotate") => command = Some(Command::KmsRotate),
                Some("rewrap") => command = Some(Command::KmsRewrap),
                Some("status") => command = Some(Command::KmsStatus),
                _ => bail!("usage: api kms rotate|rewrap|status"),
            },
            "--overlap-secs" => match (&mut command, args.next().map(|v| v.parse::<i64>())) {
                (Some(Command::RotateTaskSigning { overlap_secs }), Some(Ok(value)))
                    if (keel_inventory::trust::MIN_OVERLAP_SECS..=30 * 86_400).contains(&value) =>
                {
                    *overlap_secs = value
                }
                _ => {
                    bail!("--overlap-secs follows `keys rotate-task-signing` and takes 1..=2592000")
                }
            },
            "--node" => match (&mut command, args.next().map(|v| v.parse::<uuid::Uuid>())) {
                (Some(Command::JoinToken { node, .. }), Some(Ok(value))) => *node = Some(value),
                _ => bail!("--node follows `join-token` and takes a node id"),
            },
            "audit" if command.is_none() => match args.next().as_deref() {
                Some("verify") => command = Some(Command::AuditVerify { chain: None }),
                _ => bail!("usage: api audit verify [--chain UUID]"),
            },
            "billing" if command.is_none() => match args.next().as_deref() {
                Some("reconcile") => command = Some(Command::BillingReconcile { tenant: None }),
                _ => bail!("usage: api billing reconcile [--tenant UUID]"),
            },
            "--tenant" => match (&mut command, args.next().map(|v| v.parse::<uuid::Uuid>())) {
                (Some(Command::BillingReconcile { tenant }), Some(Ok(value))) => {
                    *tenant = Some(value)
                }
                _ => bail!("--tenant follows `billing reconcile` and takes a tenant id"),
            },
            "operator" if command.is_none() => match args.next().as_deref() {
                Some("create") => {
                    command = Some(Command::OperatorCreate {
                        email: None,
                        role: PlatformRole::Operator,
                    })
                }
                _ => bail!("usage: api operator create --email EMAIL [--role ROLE]"),
            },
            "--email" => match (&mut command, args.next()) {
                (Some(Command::OperatorCreate { email, .. }), Some(value)) => *email = Some(value),
                _ => bail!("--email follows `operator create` and takes an address"),
            },
            "--role" => match (
                &mut command,
                args.next().as_deref().and_then(PlatformRole::parse),
            ) {
                (Some(Command::OperatorCreate { role, .. }), Some(value)) => *role = value,
                _ => bail!("--role follows `operator create`: operator or read_only_operator"),
            },
            "--chain" => match (&mut command, args.next().map(|v| v.parse::<uuid::Uuid>())) {
                (Some(Command::AuditVerify { chain }), Some(Ok(value))) => *chain = Some(value),
                _ => bail!(
                    "--chain follows `audit verify` and takes a tenant id (nil: the platform)"
                ),
            },
            "--ttl-secs" => match (&mut command, args.next().map(|v| v.parse::<i64>())) {
                (Some(Command::JoinToken { ttl_secs, .. }), Some(Ok(value)))
                    if (60..=86_400).contains(&value) =>
                {
                    *ttl_secs = value
                }
                _ => bail!("--ttl-secs follows `join-token` and takes 60..=86400"),
            },
            other => bail!(
                "unexpected argument `{other}`; usage: api [--config FILE] [serve|migrate|openapi]"
            ),
        }
    }
    Ok((command.unwrap_or(Command::Serve), config))
}

async fn run() -> anyhow::Result<()> {
    let (command, config_file) = parse_args()?;
    if let Command::Openapi = command {
        print!("{}", keel_api::openapi::document_json());
        return Ok(());
    }
    let config = Config::load(config_file.as_deref())?;
    // Held until `run` returns: dropping it sends the last spans.
    let _telemetry = telemetry::init("keel-api", &config.log, &config.tracing)?;
    match command {
        Command::Migrate => {
            keel_db::migrate(&config.database)
                .await
                .context("applying migrations")?;
            tracing::info!("migrations applied");
            Ok(())
        }
        Command::JoinToken { ttl_secs, node } => {
            let db = connect(&config).await?;
            let kms = keel_api::keys::kms(&config, false)?;
            let keys = keel_api::keys::ControlPlaneKeys::load(&db, &kms).await?;
            let channel = keel_api::node_channel(&keys, &config)?;
            let token = keel_inventory::enrol::join_token_create(
                &db,
                cli_meta(),
                &channel,
                keel_core::DEFAULT_REGION,
                time::Duration::seconds(ttl_secs),
                node.map(keel_core::ids::HostId::from),
            )
            .await
            .context("creating a join token")?;
            println!("{}", token.token);
            eprintln!(
                "expires at {}; control-plane CA fingerprint {}",
                token.expires_at, token.ca_fingerprint
            );
            Ok(())
        }
        Command::RotateTaskSigning { overlap_secs } => {
            let db = connect(&config).await?;
            let kms = keel_api::keys::kms(&config, false)?;
            let keys = keel_api::keys::ControlPlaneKeys::load(&db, &kms).await?;
            let key = keel_inventory::trust::rotate_signing_key(
                &db,
                &kms,
                &keys.control_plane_ca,
                cli_meta(),
                time::Duration::seconds(overlap_secs),
            )
            .await
            .context("rotating the task-signing key")?;
            println!("{}", serde_json::to_string(&key)?);
            Ok(())
        }
        Command::KmsRotate => match keel_api::keys::kms(&config, false)? {
            keel_kms::AnyKms::Local(mut local) => {
                let id = local.rotate().context("rotating the local master key")?;
                println!("{id}");
                eprintln!(
                    "new envelopes now use master key {id}; run `api kms rewrap` to re-seal the stored keys under it"
                );
                Ok(())
            }
            keel_kms::AnyKms::Aws(_) => bail!(
                "AWS KMS keys rotate in AWS: enable automatic rotation on the key, or set kms.key_id to a new key and list the old one in kms.retired_key_ids, then run `api kms rewrap`"
            ),
        },
        Command::KmsRewrap => {
            let db = connect(&config).await?;
            let kms = keel_api::keys::kms(&config, false)?;
            let count = keel_inventory::trust::rewrap(&db, &kms, cli_meta())
                .await
                .context("re-sealing the stored keys")?;
            println!("re-sealed {count} keys");
            Ok(())
        }
        Command::KmsStatus => {
            let db = connect(&config).await?;
            for (master_key, count) in keel_inventory::trust::master_key_usage(&db).await? {
                println!("{master_key}\t{count}");
            }
            Ok(())
        }
        Command::AuditVerify { chain } => audit_verify(&config, chain).await,
        Command::OperatorCreate { email, role } => {
            let email = email.context("operator create needs --email")?;
            operator_create(&config, email, role).await
        }
        Command::BillingReconcile { tenant } => billing_reconcile(&config, tenant).await,
        Command::Serve | Command::Openapi => keel_api::serve(config).await,
    }
}

fn cli_meta() -> keel_db::RequestMeta {
    keel_db::RequestMeta::system("cli", uuid::Uuid::now_v7().simple().to_string())
}

async fn connect(config: &Config) -> anyhow::Result<keel_db::Db> {
    keel_db::Db::connect(&config.database)
        .await
        .context("connecting to Postgres")
}

/// Creates an operator, audited as `system:cli`.
async fn operator_create(config: &Config, email: String, role: PlatformRole) -> anyhow::Result<()> {
    let password = match std::env::var("KEEL_OPERATOR_PASSWORD") {
        Ok(password) => password,
        Err(_) => {
            eprintln!("password for {email} (one line on stdin):");
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from stdin")?;
            line.trim_end_matches(['\r', '\n']).to_owned()
        }
    };
    let db = keel_db::Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    let meta = keel_db::RequestMeta::system("cli", uuid::Uuid::now_v7().simple().to_string());
    let tx = db.begin_system(meta).await?;
    let request = keel_auth::admin::OperatorRequest {
        email,
        password,
        role,
    };
    match keel_auth::admin::operator_create(tx, request, None).await {
        Ok(operator) => {
            println!("{}", serde_json::to_string(&operator)?);
            Ok(())
        }
        Err(keel_auth::AuthError::Validation(fields)) => {
            let reasons: Vec<String> = fields
                .iter()
                .map(|field| format!("{}: {}", field.field, field.message))
                .collect();
            bail!("invalid operator: {}", reasons.join("; "))
        }
        Err(error) => Err(error.into()),
    }
}

/// Prints one JSON line per chain; fails if any chain is broken.
async fn audit_verify(config: &Config, chain: Option<uuid::Uuid>) -> anyhow::Result<()> {
    let db = keel_db::Db::connect(&config.database)
        .await
        .context("connecting to Postgres")?;
    let meta = keel_db::RequestMeta::system("cli", uuid::Uuid::now_v7().simple().to_string());
    // Read-only: the transaction is dropped, never committed.
    let mut tx = db.begin_system(meta).await?;
    let chains = match chain {
        Some(chain) => vec![chain],
        None => keel_auth::audit_chain::chains(tx.conn()).await?,
    };
    let mut broken = 0;
    for chain in chains {
        let report = keel_auth::audit_chain::verify(tx.conn(), chain).await?;
        if !report.valid {
            broken += 1;
        }
        println!("{}", serde_json::to_string(&report)?);
    }
    if broken > 0 {
        bail!("{broken} audit chain(s) broken");
    }
    Ok(())
}

/// The billing reconciliation (`keel_billing::invoice::reconcile`): prints
/// one JSON line per discrepancy and a summary; fails if there is any.
async fn billing_reconcile(config: &Config, tenant: Option<uuid::Uuid>) -> anyhow::Result<()> {
    let db = connect(config).await?;
    // Every invoice, line and ledger entry as of one instant.
    let mut snapshot = db.begin_snapshot().await?;
    let (checked, discrepancies) =
        keel_billing::invoice::reconcile(&mut snapshot, tenant.map(keel_core::ids::TenantId))
            .await
            .context("reconciling invoices")?;
    for discrepancy in &discrepancies {
        println!("{}", serde_json::to_string(discrepancy)?);
    }
    println!(
        "{}",
        serde_json::json!({ "checked": checked, "discrepancies": discrepancies.len() })
    );
    if !discrepancies.is_empty() {
        bail!("{} invoice discrepancies", discrepancies.len());
    }
    Ok(())
}

#[tokio::main]
async fn main() -> ExitCode {
    match run().await {
        Ok(()) => ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("api: {error:#}");
            ExitCode::FAILURE
        }
    }
}
