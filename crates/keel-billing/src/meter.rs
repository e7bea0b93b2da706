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
}

impl MeteringConsumer {
    pub fn new(db: Db) -> Self {
        Self { db }
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
            return Err(HandlerError(format!(
                "allocation {} has an open run that no event closed; this run is not metered",
                event.allocation_id
            )));
        }
    }
    Ok(())
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
    let mut ids = Vec::with_capacity(pieces.len());
    let (mut periods, mut starts, mut ends, mut quantities) =
        (Vec::new(), Vec::new(), Vec::new(), Vec::new());
    for piece in pieces {
        ids.push(Uuid::now_v7());
        periods.push(piece.period);
        starts.push(piece.start);
        ends.push(piece.end);
        let micros = (piece.end - piece.start).whole_microseconds();
        quantities.push(i64::try_from(micros).unwrap_or(i64::MAX));
    }
    sqlx::query(
        "INSERT INTO usage_records (id, tenant_id, project_id, allocation_id, meter, flavor, region,
                                    period_start, started_at, ended_at, quantity, source_event_id)
         SELECT id, $2, $3, $4, $5, $6, $7, period, started, ended, quantity, $8
         FROM unnest($1::uuid[], $9::date[], $10::timestamptz[], $11::timestamptz[], $12::bigint[])
              AS piece(id, period, started, ended, quantity)
         ON CONFLICT (source_event_id, period_start) DO NOTHING",
    )
    .bind(&ids)
    .bind(run.tenant_id)
    .bind(run.project_id)
    .bind(run.allocation_id)
    .bind(RUN_METER)
    .bind(&run.flavor)
    .bind(&run.region)
    .bind(source_event_id)
    .bind(&periods)
    .bind(&starts)
    .bind(&ends)
    .bind(&quantities)
    .execute(conn)
    .await?;
    Ok(())
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
}
