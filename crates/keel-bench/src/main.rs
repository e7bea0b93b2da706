//! `keel-bench`: drives the api (or the scheduler) with N concurrent
//! clients and prints one JSON line: requests, errors, requests per
//! second, p50 and p99 latency. `scripts/bench.sh` and
//! `scripts/bench-lifecycle.sh` run it against a release build.
//!
//! ```text
//! keel-bench get    --url URL --token T --project P [--clients N] [--seconds D]
//! keel-bench create --url URL --token T --project P [--clients N] [--seconds D]
//! keel-bench list   --url URL --token T --project P [--clients N] [--seconds D]
//! keel-bench launch --url URL --token T --project P [--clients N] [--launches M]
//! keel-bench place  --database-url URL [--clients N] [--seconds D]
//! ```
//!
//! `get` reads the project; `create` creates an allocation with a fresh
//! `Idempotency-Key` per request (so every request does the full write:
//! idempotency row, allocation, placement, audit, outbox, one transaction);
//! `list` pages through the project's allocations (50 a page, following
//! `next_cursor`, from the start again at the end); `launch` has each
//! client create an allocation, poll it (every 10 ms × clients) until it runs, and
//! terminate it, M times (the latency is create request → `running` seen);
//! `place` calls the scheduler (`capacity_reserve`) in its own transaction
//! back to back, without the HTTP and authorisation around it.

use std::time::{Duration, Instant};

use anyhow::{Context, bail};

const SCENARIOS: [&str; 5] = ["get", "create", "list", "launch", "place"];

struct Args {
    scenario: String,
    url: String,
    token: String,
    project: String,
    database_url: String,
    clients: usize,
    seconds: u64,
    launches: usize,
}

fn args() -> anyhow::Result<Args> {
    let mut raw = std::env::args().skip(1);
    let scenario = raw
        .next()
        .context("usage: keel-bench get|create|list|launch|place --url … --token … --project …")?;
    let (mut url, mut token, mut project, mut database_url) = (None, None, None, None);
    let (mut clients, mut seconds, mut launches) = (32, 10, 10);
    while let Some(flag) = raw.next() {
        let value = raw
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        match flag.as_str() {
            "--url" => url = Some(value),
            "--token" => token = Some(value),
            "--project" => project = Some(value),
            "--database-url" => database_url = Some(value),
            "--clients" => clients = value.parse().context("--clients")?,
            "--seconds" => seconds = value.parse().context("--seconds")?,
            "--launches" => launches = value.parse().context("--launches")?,
            other => bail!("unknown flag {other}"),
        }
    }
    if !SCENARIOS.contains(&scenario.as_str()) {
        bail!("scenario must be one of {SCENARIOS:?}");
    }
    let place = scenario == "place";
    Ok(Args {
        scenario,
        url: if place {
            url.unwrap_or_default()
        } else {
            url.context("--url")?
        },
        token: if place {
            token.unwrap_or_default()
        } else {
            token.context("--token")?
        },
        project: if place {
            project.unwrap_or_default()
        } else {
            project.context("--project")?
        },
        database_url: if place {
            database_url.context("--database-url")?
        } else {
            String::new()
        },
        clients,
        seconds,
        launches,
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
    let mut cursor: Option<String> = None;
    while Instant::now() < deadline {
        let started = Instant::now();
        let request = if args.scenario == "get" {
            http.get(&project_url)
        } else if args.scenario == "list" {
            let mut request = http.get(&create_url).query(&[("limit", "50")]);
            if let Some(cursor) = &cursor {
                request = request.query(&[("cursor", cursor)]);
            }
            request
        } else {
            http.post(&create_url)
                .header("idempotency-key", uuid::Uuid::new_v4().to_string())
                .header("content-type", "application/json")
                .body(r#"{"name":"bench","flavor":"cpu.small"}"#)
        };
        match request.bearer_auth(&args.token).send().await {
            Ok(response) if response.status().is_success() => {
                // Read the body: a real client does.
                match response.bytes().await {
                    Ok(body) => {
                        latencies.push(started.elapsed());
                        if args.scenario == "list" {
                            cursor = serde_json::from_slice::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|page| page["next_cursor"].as_str().map(str::to_owned));
                        }
                    }
                    Err(_) => errors += 1,
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

/// One launching client: create, wait for `running`, terminate, M times;
/// returns the create → running latencies and the number of failures.
async fn launcher(http: reqwest::Client, args: std::sync::Arc<Args>) -> (Vec<Duration>, u64) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    let create_url = format!("{}/v1/projects/{}/allocations", args.url, args.project);
    // About 100 polls a second in all, whatever the concurrency, so the
    // polling does not become the load being measured (the control plane's
    // own timestamps, in `bench-lifecycle.sh`, have no such granularity).
    let poll = Duration::from_millis(10 * u64::try_from(args.clients).unwrap_or(1).max(1));
    for _ in 0..args.launches {
        let started = Instant::now();
        let created = http
            .post(&create_url)
            .bearer_auth(&args.token)
            .header("content-type", "application/json")
            .body(r#"{"name":"bench","flavor":"cpu.small"}"#)
            .send()
            .await;
        let id = match created {
            Ok(response) if response.status().is_success() => response
                .json::<serde_json::Value>()
                .await
                .ok()
                .and_then(|body| body["id"].as_str().map(str::to_owned)),
            _ => None,
        };
        let Some(id) = id else {
            errors += 1;
            continue;
        };
        let allocation_url = format!("{create_url}/{id}");
        let give_up = started + Duration::from_secs(60);
        let ran = loop {
            let state = match http
                .get(&allocation_url)
                .bearer_auth(&args.token)
                .send()
                .await
            {
                Ok(response) => response
                    .json::<serde_json::Value>()
                    .await
                    .ok()
                    .and_then(|body| body["state"].as_str().map(str::to_owned)),
                Err(_) => None,
            };
            match state.as_deref() {
                Some("running") => break true,
                Some("failed") => break false,
                _ if Instant::now() > give_up => break false,
                _ => tokio::time::sleep(poll).await,
            }
        };
        if ran {
            latencies.push(started.elapsed());
        } else {
            errors += 1;
        }
        let _ = http
            .post(format!("{allocation_url}/terminate"))
            .bearer_auth(&args.token)
            .send()
            .await;
    }
    (latencies, errors)
}

/// One scheduling client: `capacity_reserve` in its own transaction, back
/// to back until the deadline.
async fn placer(
    pool: sqlx::PgPool,
    flavor: keel_inventory::model::Flavor,
    deadline: Instant,
) -> (Vec<Duration>, u64) {
    let (mut latencies, mut errors) = (Vec::new(), 0);
    while Instant::now() < deadline {
        let started = Instant::now();
        let placed = async {
            let mut tx = pool.begin().await?;
            let host = keel_inventory::service::capacity_reserve(&mut tx, "local-1", &flavor)
                .await
                .map_err(|error| anyhow::anyhow!("{error}"))?;
            tx.commit().await?;
            anyhow::Ok(host)
        };
        match placed.await {
            Ok(Some(_)) => latencies.push(started.elapsed()),
            _ => errors += 1,
        }
    }
    (latencies, errors)
}

/// Runs `place` (no HTTP).
async fn place(args: &Args) -> anyhow::Result<(Vec<Duration>, u64, f64)> {
    let pool = sqlx::postgres::PgPoolOptions::new()
        .max_connections(u32::try_from(args.clients).unwrap_or(u32::MAX))
        .connect(&args.database_url)
        .await
        .context("connecting to the database")?;
    let flavor = {
        let mut conn = pool.acquire().await?;
        keel_inventory::service::flavor_any(&mut conn, "cpu.small")
            .await
            .map_err(|error| anyhow::anyhow!("{error}"))?
    };
    let started = Instant::now();
    let deadline = started + Duration::from_secs(args.seconds);
    let tasks: Vec<_> = (0..args.clients)
        .map(|_| tokio::spawn(placer(pool.clone(), flavor.clone(), deadline)))
        .collect();
    let (mut latencies, mut errors) = (Vec::new(), 0);
    for task in tasks {
        let (mut some, failed) = task.await?;
        latencies.append(&mut some);
        errors += failed;
    }
    Ok((latencies, errors, started.elapsed().as_secs_f64()))
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let args = std::sync::Arc::new(args()?);
    if args.scenario == "place" {
        let (mut latencies, errors, elapsed) = place(&args).await?;
        latencies.sort_unstable();
        report(&args, &latencies, errors, elapsed);
        return Ok(());
    }
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
    if args.scenario == "launch" {
        let started = Instant::now();
        let tasks: Vec<_> = (0..args.clients)
            .map(|_| tokio::spawn(launcher(http.clone(), args.clone())))
            .collect();
        let (mut latencies, mut errors) = (Vec::new(), 0);
        for task in tasks {
            let (mut some, failed) = task.await?;
            latencies.append(&mut some);
            errors += failed;
        }
        latencies.sort_unstable();
        report(&args, &latencies, errors, started.elapsed().as_secs_f64());
        return Ok(());
    }
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
    report(&args, &latencies, errors, elapsed);
    Ok(())
}

/// Prints the JSON line.
fn report(args: &Args, latencies: &[Duration], errors: u64, elapsed: f64) {
    println!(
        "{}",
        serde_json::json!({
            "scenario": args.scenario,
            "clients": args.clients,
            "requests": latencies.len(),
            "errors": errors,
            "seconds": elapsed,
            "rps": latencies.len() as f64 / elapsed,
            "p50_ms": percentile(latencies, 50.0),
            "p99_ms": percentile(latencies, 99.0),
        })
    );
}
