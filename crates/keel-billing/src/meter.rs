//! The billing worker's consumer: allocation events in, usage records out.
//!
//! A run opens with an `allocation.running` event (at the event's `at`, the
//! exact time of the change) and closes with the allocation's next event
//! whose `previous_state` is `running` — stopping, terminating, failed or
//! lost: a tenant pays while the workload runs. The closed run is cut at
//! period boundaries ([`crate::period`]) into usage records carrying the
//! flavor, region and project from the events, so nothing else is read.
//!
//! Exactly once per source event, whatever the delivery does: the outbox
//! runs a delivery at least once (a worker killed between this effect and
//! the inbox write runs it again, and two workers may run it at once), so
//! every row names the event that made it (`opened_by`, `closed_by`,
//! `source_event_id`) under a unique constraint, and a close locks the
//! allocation's open run. The relay releases one allocation's events one
//! at a time, so a close normally finds the run its `running` event
//! opened; a close that arrives late (a second copy of an older delivery)
//! leaves a run that began after it alone, and an open that finds another
//! run still open (its close never reached billing) fails, to end as a
//! dead letter rather than bill time it should not.

use futures::future::BoxFuture;
use keel_db::Db;
use keel_outbox::{Consumer, DeliveredEvent, HandlerError};
use serde::Deserialize;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::period;

/// The consumer's name: its apalis queue and `outbox_deliveries.consumer`.
pub const CONSUMER: &str = "billing";
/// The meter of allocation run time, in microseconds.
pub const RUN_METER: &str = "allocation.run";
/// Batches whose one transaction failed, so that their events were metered
/// one by one (the worker's logs say why; tests check the set-based path
/// ran).
static BATCH_FALLBACKS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

/// How many batches fell back to metering their events one by one in this
/// process.
pub fn batch_fallbacks() -> u64 {
    BATCH_FALLBACKS.load(std::sync::atomic::Ordering::Relaxed)
}

/// The part of an allocation event metering reads.
#[derive(Debug, Deserialize)]
struct AllocationEvent {
    allocation_id: Uuid,
    tenant_id: Uuid,
    project_id: Uuid,
    state: String,
    previous_state: Option<String>,
    flavor: String,
    region: String,
    #[serde(with = "time::serde::rfc3339")]
    at: OffsetDateTime,
}

/// Meters allocation run time.
#[derive(Clone, Debug)]
pub struct MeteringConsumer {
    db: Db,
    batch_size: usize,
}

impl MeteringConsumer {
    /// Takes one event per delivery job until [`Self::in_batches_of`] says
    /// otherwise.
    pub fn new(db: Db) -> Self {
        Self { db, batch_size: 1 }
    }

    /// Takes up to `size` events per delivery job (`[billing]
    /// meter_batch_size`).
    pub fn in_batches_of(mut self, size: usize) -> Self {
        self.batch_size = size.max(1);
        self
    }

    async fn on_event(&self, event: &DeliveredEvent) -> Result<(), HandlerError> {
        let payload: AllocationEvent = serde_json::from_value(event.payload.clone())
            .map_err(|error| HandlerError(format!("not an allocation event: {error}")))?;
        let event_id = event.id.as_uuid();
        let mut tx = self
            .db
            .begin_bookkeeping()
            .await
            .map_err(HandlerError::new)?;
        if payload.previous_state.as_deref() == Some("running") {
            close_run(&mut tx, event_id, &payload).await?;
        }
        if payload.state == "running" {
            open_run(&mut tx, event_id, &payload).await?;
        }
        tx.commit().await.map_err(HandlerError::new)
    }
}

async fn open_run(
    tx: &mut keel_db::PgTransaction,
    event_id: Uuid,
    event: &AllocationEvent,
) -> Result<(), HandlerError> {
    let opened = sqlx::query(
        "INSERT INTO meter_runs (opened_by, allocation_id, tenant_id, project_id, flavor, region, started_at)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         ON CONFLICT DO NOTHING",
    )
    .bind(event_id)
    .bind(event.allocation_id)
    .bind(event.tenant_id)
    .bind(event.project_id)
    .bind(&event.flavor)
    .bind(&event.region)
    .bind(event.at)
    .execute(&mut **tx)
    .await
    .map_err(HandlerError::new)?
    .rows_affected();
    if opened == 0 {
        // This event's run exists already (a redelivery), or, which the
        // per-allocation order rules out, another run is still open.
        let ours: bool =
            sqlx::query_scalar("SELECT EXISTS (SELECT FROM meter_runs WHERE opened_by = $1)")
                .bind(event_id)
                .fetch_one(&mut **tx)
                .await
                .map_err(HandlerError::new)?;
        if !ours {
            // A close never reached billing (a dead delivery, or an event
            // fanned out by a worker that did not know this consumer).
            // Closing the old run here would bill the time in between;
            // dropping this one would bill nothing. Neither is ours to
            // decide: the delivery fails, and after its retries it is a
            // dead letter an operator sees.
            return Err(unclosed_run(event.allocation_id));
        }
    }
    Ok(())
}

fn unclosed_run(allocation_id: Uuid) -> HandlerError {
    HandlerError(format!(
        "allocation {allocation_id} has an open run that no event closed; this run is not metered"
    ))
}

async fn close_run(
    tx: &mut keel_db::PgTransaction,
    event_id: Uuid,
    event: &AllocationEvent,
) -> Result<(), HandlerError> {
    let open: Option<OpenRun> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM meter_runs
         WHERE allocation_id = $1 AND ended_at IS NULL FOR UPDATE"
    )))
    .bind(event.allocation_id)
    .fetch_optional(&mut **tx)
    .await
    .map_err(HandlerError::new)?;
    // Read after the lock: a concurrent run of this delivery that closed
    // the run first is visible now.
    let closed_already: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT FROM meter_runs WHERE closed_by = $1)")
            .bind(event_id)
            .fetch_one(&mut **tx)
            .await
            .map_err(HandlerError::new)?;
    let open = open.filter(|run| run.started_at <= event.at);
    let (Some(run), false) = (open, closed_already) else {
        // This event closed its run already (a redelivery); or the open run
        // began after this event (a late copy of an older close); or the run
        // began before billing was deployed: nothing to meter.
        return Ok(());
    };
    let ended_at = event.at;
    sqlx::query("UPDATE meter_runs SET ended_at = $2, closed_by = $3 WHERE opened_by = $1")
        .bind(run.opened_by)
        .bind(ended_at)
        .bind(event_id)
        .execute(&mut **tx)
        .await
        .map_err(HandlerError::new)?;
    let from = run.billed_until.unwrap_or(run.started_at);
    if ended_at < from {
        // The run was cut at a period end it never reached: `cut_open_runs`
        // waits for billing to have every event of the allocation, so only
        // an event that was dead when the cut ran gets here.
        tracing::warn!(
            allocation_id = %event.allocation_id,
            billed_until = %from,
            %ended_at,
            "a run ended before the period end it was billed until"
        );
        return Ok(());
    }
    insert_pieces(tx, &run, event_id, &period::split(from, ended_at))
        .await
        .map_err(HandlerError::new)
}

/// An open run as the meter reads it.
#[derive(Debug, sqlx::FromRow)]
struct OpenRun {
    opened_by: Uuid,
    allocation_id: Uuid,
    tenant_id: Uuid,
    project_id: Uuid,
    flavor: String,
    region: String,
    started_at: OffsetDateTime,
    billed_until: Option<OffsetDateTime>,
}

const RUN_COLUMNS: &str =
    "opened_by, allocation_id, tenant_id, project_id, flavor, region, started_at, billed_until";

/// Writes a run's pieces as usage records made by `source_event_id`; a
/// piece recorded already (same event, same period) is left alone.
async fn insert_pieces(
    conn: &mut sqlx::PgConnection,
    run: &OpenRun,
    source_event_id: Uuid,
    pieces: &[period::Piece],
) -> Result<(), sqlx::Error> {
    let mut records = Records::default();
    records.add(run, source_event_id, pieces);
    records.insert(conn).await
}

/// Usage records to write in one statement, column by column.
#[derive(Default)]
struct Records {
    ids: Vec<Uuid>,
    tenants: Vec<Uuid>,
    projects: Vec<Uuid>,
    allocations: Vec<Uuid>,
    flavors: Vec<String>,
    regions: Vec<String>,
    sources: Vec<Uuid>,
    periods: Vec<time::Date>,
    starts: Vec<OffsetDateTime>,
    ends: Vec<OffsetDateTime>,
    quantities: Vec<i64>,
}

impl Records {
    /// A run's pieces, made by `source_event_id`.
    fn add(&mut self, run: &OpenRun, source_event_id: Uuid, pieces: &[period::Piece]) {
        for piece in pieces {
            self.ids.push(Uuid::now_v7());
            self.tenants.push(run.tenant_id);
            self.projects.push(run.project_id);
            self.allocations.push(run.allocation_id);
            self.flavors.push(run.flavor.clone());
            self.regions.push(run.region.clone());
            self.sources.push(source_event_id);
            self.periods.push(piece.period);
            self.starts.push(piece.start);
            self.ends.push(piece.end);
            let micros = (piece.end - piece.start).whole_microseconds();
            self.quantities
                .push(i64::try_from(micros).unwrap_or(i64::MAX));
        }
    }

    /// Writes them; a piece recorded already (same event, same period) is
    /// left alone.
    async fn insert(&self, conn: &mut sqlx::PgConnection) -> Result<(), sqlx::Error> {
        if self.ids.is_empty() {
            return Ok(());
        }
        sqlx::query(
            "INSERT INTO usage_records (id, tenant_id, project_id, allocation_id, meter, flavor, region,
                                        period_start, started_at, ended_at, quantity, source_event_id)
             SELECT id, tenant, project, allocation, $1, flavor, region, period, started, ended,
                    quantity, source
             FROM unnest($2::uuid[], $3::uuid[], $4::uuid[], $5::uuid[], $6::text[], $7::text[],
                         $8::uuid[], $9::date[], $10::timestamptz[], $11::timestamptz[], $12::bigint[])
                  AS piece(id, tenant, project, allocation, flavor, region, source, period, started,
                           ended, quantity)
             ON CONFLICT (source_event_id, period_start) DO NOTHING",
        )
        .bind(RUN_METER)
        .bind(&self.ids)
        .bind(&self.tenants)
        .bind(&self.projects)
        .bind(&self.allocations)
        .bind(&self.flavors)
        .bind(&self.regions)
        .bind(&self.sources)
        .bind(&self.periods)
        .bind(&self.starts)
        .bind(&self.ends)
        .bind(&self.quantities)
        .execute(conn)
        .await?;
        Ok(())
    }
}

/// How long after a period end its open runs may be cut: an event whose
/// change happened before the end is committed and fanned out by then.
pub const CUT_GRACE: time::Duration = time::Duration::minutes(5);

/// Cuts a tenant's open runs at the end of `period` (at least
/// [`CUT_GRACE`] ago): the time each ran before it becomes usage records
/// (made by the run's opening event), and the run goes on from there, so
/// an invoice sees a run that spans its period end. A run is cut only when
/// billing has every event of its allocation (none waiting to be fanned
/// out, queued or dead): otherwise the change that ended it may be among
/// them, and the cut would bill time after it. Such a run is cut by a
/// later call, or metered whole when its close arrives (as late usage on
/// the next invoice). Returns how many runs were cut.
pub async fn cut_open_runs(
    db: &Db,
    tenant_id: Uuid,
    period: period::Period,
) -> Result<u64, crate::BillingError> {
    let boundary = period.end();
    let mut tx = db.begin_bookkeeping().await?;
    let now: OffsetDateTime = sqlx::query_scalar("SELECT now()")
        .fetch_one(&mut *tx)
        .await?;
    if boundary > now - CUT_GRACE {
        return Err(crate::BillingError::PeriodNotEnded);
    }
    let runs: Vec<OpenRun> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM meter_runs r
          WHERE r.tenant_id = $1 AND r.ended_at IS NULL
            AND coalesce(r.billed_until, r.started_at) < $2
            AND NOT EXISTS (SELECT FROM outbox_deliveries d
                             WHERE d.consumer = $3 AND d.aggregate_id = r.allocation_id
                               AND d.status IN ('pending', 'queued', 'dead'))
            AND NOT EXISTS (SELECT FROM outbox o
                             WHERE o.fanned_out_at IS NULL AND o.aggregate_id = r.allocation_id)
          ORDER BY r.opened_by
          FOR UPDATE OF r"
    )))
    .bind(tenant_id)
    .bind(boundary)
    .bind(CONSUMER)
    .fetch_all(&mut *tx)
    .await?;
    for run in &runs {
        let from = run.billed_until.unwrap_or(run.started_at);
        insert_pieces(&mut tx, run, run.opened_by, &period::split(from, boundary)).await?;
        sqlx::query("UPDATE meter_runs SET billed_until = $2 WHERE opened_by = $1")
            .bind(run.opened_by)
            .bind(boundary)
            .execute(&mut *tx)
            .await?;
    }
    tx.commit().await?;
    Ok(runs.len() as u64)
}

impl MeteringConsumer {
    /// Meters a batch of events of distinct allocations in one
    /// transaction: every statement takes all of them at once. Only an
    /// event that cannot be metered fails (an unreadable payload, an open
    /// over a run no event closed); if the batch's transaction itself
    /// fails, each event is metered alone, so that one cannot hold back
    /// the others.
    async fn on_batch(&self, events: &[DeliveredEvent]) -> Vec<Result<(), HandlerError>> {
        let parsed: Vec<Result<AllocationEvent, HandlerError>> = events
            .iter()
            .map(|event| {
                serde_json::from_value(event.payload.clone())
                    .map_err(|error| HandlerError(format!("not an allocation event: {error}")))
            })
            .collect();
        let mut allocations = std::collections::HashSet::new();
        let distinct = parsed
            .iter()
            .flatten()
            .all(|event| allocations.insert(event.allocation_id));
        if distinct {
            match self.meter_together(events, &parsed).await {
                Ok(results) => return results,
                Err(error) => {
                    BATCH_FALLBACKS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    tracing::warn!(%error, count = events.len(), "metering a batch failed; metering its events one by one");
                }
            }
        }
        let mut results = Vec::with_capacity(events.len());
        for event in events {
            results.push(self.on_event(event).await);
        }
        results
    }

    async fn meter_together(
        &self,
        events: &[DeliveredEvent],
        parsed: &[Result<AllocationEvent, HandlerError>],
    ) -> Result<Vec<Result<(), HandlerError>>, sqlx::Error> {
        let mut results: Vec<Result<(), HandlerError>> = parsed
            .iter()
            .map(|event| match event {
                Ok(_) => Ok(()),
                Err(error) => Err(HandlerError(error.0.clone())),
            })
            .collect();
        let readable: Vec<(usize, Uuid, &AllocationEvent)> = parsed
            .iter()
            .enumerate()
            .filter_map(|(n, event)| {
                event
                    .as_ref()
                    .ok()
                    .map(|event| (n, events[n].id.as_uuid(), event))
            })
            .collect();
        let mut tx = self.db.begin_bookkeeping().await.map_err(db_error)?;
        let closes: Vec<&(usize, Uuid, &AllocationEvent)> = readable
            .iter()
            .filter(|(_, _, event)| event.previous_state.as_deref() == Some("running"))
            .collect();
        if !closes.is_empty() {
            close_runs(&mut tx, &closes).await?;
        }
        let opens: Vec<&(usize, Uuid, &AllocationEvent)> = readable
            .iter()
            .filter(|(_, _, event)| event.state == "running")
            .collect();
        if !opens.is_empty() {
            for (n, error) in open_runs(&mut tx, &opens).await? {
                results[n] = Err(error);
            }
        }
        tx.commit().await?;
        Ok(results)
    }
}

fn db_error(error: keel_db::DbError) -> sqlx::Error {
    match error {
        keel_db::DbError::Sqlx(error) => error,
        other => sqlx::Error::Protocol(other.to_string()),
    }
}

/// [`close_run`] for many allocations: one lock of their open runs, one
/// read of the events that closed runs already, one update, one insert of
/// every piece.
async fn close_runs(
    tx: &mut keel_db::PgTransaction,
    closes: &[&(usize, Uuid, &AllocationEvent)],
) -> Result<(), sqlx::Error> {
    let allocations: Vec<Uuid> = closes
        .iter()
        .map(|(_, _, event)| event.allocation_id)
        .collect();
    let event_ids: Vec<Uuid> = closes.iter().map(|(_, id, _)| *id).collect();
    let open: Vec<OpenRun> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {RUN_COLUMNS} FROM meter_runs
         WHERE allocation_id = ANY($1) AND ended_at IS NULL
         ORDER BY opened_by FOR UPDATE"
    )))
    .bind(&allocations)
    .fetch_all(&mut **tx)
    .await?;
    // Read after the lock, as in `close_run`.
    let closed_already: std::collections::HashSet<Uuid> =
        sqlx::query_scalar("SELECT closed_by FROM meter_runs WHERE closed_by = ANY($1)")
            .bind(&event_ids)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    let open: std::collections::HashMap<Uuid, OpenRun> = open
        .into_iter()
        .map(|run| (run.allocation_id, run))
        .collect();
    let (mut runs, mut ends, mut closers) = (Vec::new(), Vec::new(), Vec::new());
    let mut records = Records::default();
    for (_, event_id, event) in closes {
        let Some(run) = open
            .get(&event.allocation_id)
            .filter(|run| run.started_at <= event.at && !closed_already.contains(event_id))
        else {
            continue;
        };
        runs.push(run.opened_by);
        ends.push(event.at);
        closers.push(*event_id);
        let from = run.billed_until.unwrap_or(run.started_at);
        if event.at < from {
            tracing::warn!(
                allocation_id = %event.allocation_id,
                billed_until = %from,
                ended_at = %event.at,
                "a run ended before the period end it was billed until"
            );
            continue;
        }
        records.add(run, *event_id, &period::split(from, event.at));
    }
    if !runs.is_empty() {
        sqlx::query(
            "UPDATE meter_runs m SET ended_at = c.ended_at, closed_by = c.closed_by
               FROM unnest($1::uuid[], $2::timestamptz[], $3::uuid[]) AS c(opened_by, ended_at, closed_by)
              WHERE m.opened_by = c.opened_by",
        )
        .bind(&runs)
        .bind(&ends)
        .bind(&closers)
        .execute(&mut **tx)
        .await?;
    }
    records.insert(tx).await
}

/// [`open_run`] for many allocations: one insert; the events whose run was
/// not opened and is not theirs come back with their error.
async fn open_runs(
    tx: &mut keel_db::PgTransaction,
    opens: &[&(usize, Uuid, &AllocationEvent)],
) -> Result<Vec<(usize, HandlerError)>, sqlx::Error> {
    let mut columns = (
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
        Vec::new(),
    );
    for (_, event_id, event) in opens {
        columns.0.push(*event_id);
        columns.1.push(event.allocation_id);
        columns.2.push(event.tenant_id);
        columns.3.push(event.project_id);
        columns.4.push(event.flavor.clone());
        columns.5.push(event.region.clone());
        columns.6.push(event.at);
    }
    sqlx::query(
        "INSERT INTO meter_runs (opened_by, allocation_id, tenant_id, project_id, flavor, region, started_at)
         SELECT * FROM unnest($1::uuid[], $2::uuid[], $3::uuid[], $4::uuid[], $5::text[], $6::text[],
                              $7::timestamptz[])
         ON CONFLICT DO NOTHING",
    )
    .bind(&columns.0)
    .bind(&columns.1)
    .bind(&columns.2)
    .bind(&columns.3)
    .bind(&columns.4)
    .bind(&columns.5)
    .bind(&columns.6)
    .execute(&mut **tx)
    .await?;
    // Every event's run exists now, unless another run of its allocation
    // was open (see `open_run`).
    let ours: std::collections::HashSet<Uuid> =
        sqlx::query_scalar("SELECT opened_by FROM meter_runs WHERE opened_by = ANY($1)")
            .bind(&columns.0)
            .fetch_all(&mut **tx)
            .await?
            .into_iter()
            .collect();
    Ok(opens
        .iter()
        .filter(|(_, event_id, _)| !ours.contains(event_id))
        .map(|(n, _, event)| (*n, unclosed_run(event.allocation_id)))
        .collect())
}

impl Consumer for MeteringConsumer {
    fn name(&self) -> &'static str {
        CONSUMER
    }

    /// The events that start a run, and those that can end one (what
    /// `running` may become).
    fn wants(&self, event_type: &str) -> bool {
        matches!(
            event_type,
            "allocation.running"
                | "allocation.stopping"
                | "allocation.terminating"
                | "allocation.failed"
                | "allocation.lost"
        )
    }

    fn handle<'a>(&'a self, event: &'a DeliveredEvent) -> BoxFuture<'a, Result<(), HandlerError>> {
        Box::pin(self.on_event(event))
    }

    fn batch_size(&self) -> usize {
        self.batch_size
    }

    fn handle_batch<'a>(
        &'a self,
        events: &'a [DeliveredEvent],
    ) -> BoxFuture<'a, Vec<Result<(), HandlerError>>> {
        Box::pin(self.on_batch(events))
    }
}
