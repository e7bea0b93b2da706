//! `keel-bench`: drives one api endpoint with N concurrent keep-alive
//! clients for D seconds and prints one JSON line: requests, errors,
//! requests per second, p50 and p99 latency. `scripts/bench.sh` runs it
//! against a release api and compares with pgbench.
//!
//! ```text
//! keel-bench get    --url URL --token T --project P [--clients N] [--seconds D]
//! keel-bench create --url URL --token T --project P [--clients N] [--seconds D]
//! ```
//!
//! `get` reads the project; `create` creates an allocation with a fresh
//! `Idempotency-Key` per request (so every request does the full write:
//! idempotency row, allocation, placement, audit, outbox, one transaction).

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

struct Args {
    scenario: String,
    url: String,
    token: String,
    project: String,
    clients: usize,
    seconds: u64,
}

fn args() -> anyhow::Result<Args> {
    let mut raw = std::env::args().skip(1);
    let scenario = raw
        .next()
        .context("usage: keel-bench get|create --url … --token … --project …")?;
    let (mut url, mut token, mut project) = (None, None, None);
    let (mut clients, mut seconds) = (32, 10);
    while let Some(flag) = raw.next() {
        let value = raw
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--token" => token = Some(value),
            "--project" => project = Some(value),
            "--clients" => clients = value.parse().context("--clients")?,
            "--seconds" => seconds = value.parse().context("--seconds")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if !matches!(scenario.as_str(), "get" | "create") {
        bail!("scenario must be get or create");
    }
    Ok(Args {
        scenario,
        url: url.context("--url")?,
        token: token.context("--token")?,
        project: project.context("--project")?,
        clients,
        seconds,
    })
}

/// One client: requests back to back until the deadline; returns the
/// latencies of successful requests and the number of failures.
async fn client(
    http: reqwest::Client,
    args: std::sync::Arc<Args>,
    deadline: Instant,
) -> (Vec<Duration>, u64) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    let project_url = format!("{}/v1/projects/{}", args.url, args.project);
    let create_url = format!("{project_url}/allocations");
    while Instant::now() < deadline {
        let started = Instant::now();
        let request = if args.scenario == "get" {
            http.get(&project_url)
        } else {
            http.post(&create_url)
                .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                .header("content-type", "application/json")
                .body(r#"{"name":"bench","flavor":"cpu.small"}"#)
        };
        match request.bearer_auth(&args.token).send().await {
            Ok(response) if response.status().is_success() => {
                // Read the body: a real client does.
                if response.bytes().await.is_ok() {
                    latencies.push(started.elapsed());
                } else {
                    errors += 1;
                }
            }
            _ => errors += 1,
        }
    }
    (latencies, errors)
}

fn percentile(sorted: &[Duration], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)].as_secs_f64() * 1000.0
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(args()?);
    // The api is plain HTTP here, but the client is built with our TLS
    // stack (ring, no roots) as everywhere else: reqwest needs one.
    let tls = rustls::ClientConfig::builder_with_provider(std::sync::Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_root_certificates(rustls::RootCertStore::empty())
    .with_no_client_auth();
    let http = reqwest::Client::builder()
        .use_preconfigured_tls(tls)
        .pool_max_idle_per_host(args.clients)
        .build()?;
    // Warm the connections and the api's caches for a second, uncounted.
    let warm_until = Instant::now() + Duration::from_secs(1);
    let warm: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(http.clone(), args.clone(), warm_until)))
        .collect();
    for task in warm {
        task.await?;
    }
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(client(http.clone(), args.clone(), deadline)))
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (mut some, failed) = task.await?;
        latencies.append(&mut some);
        errors += failed;
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    println!(
        "{}",
        serde_json::json!({
            "scenario": args.scenario,
            "clients": args.clients,
            "requests": latencies.len(),
            "errors": errors,
            "seconds": elapsed,
            "rps": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(&latencies, 50.0),
            "p99_ms": percentile(&latencies, 99.0),
        })
    );
    Ok(())
}
