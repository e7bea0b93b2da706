//! Rate cards: what run time costs, per flavor and region, over time.
//!
//! A card prices one flavor in one region from `effective_from` until the
//! next card of the pair takes over. Operators add cards; a card never
//! changes, except that adding a later card ends the one before it (a price
//! change). A card takes effect now or later, never in the past, so what
//! was metered keeps the price it ran at; two cards of a pair never overlap
//! (the database's exclusion constraint, `rate_cards_no_overlap`).

use keel_core::ResourceName;
use keel_core::ids::RateCardId;
use keel_db::{Audit, NewEvent, WriteTx};
use keel_http::FieldError;
use serde::{Deserialize, Serialize};
use sqlx::PgConnection;
use time::OffsetDateTime;

use crate::BillingError;
use crate::money::{Currency, MAX_AMOUNT, PriceUnit};

/// `POST /v1/admin/rate-cards`
#[derive(Clone, Debug, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct NewRateCard {
    #[schema(example = "gpu.h100.8")]
    pub flavor: String,
    #[schema(example = "local-1")]
    pub region: String,
    /// ISO 4217; must be the platform's billing currency (`[billing]
    /// currency`).
    #[schema(example = "USD")]
    pub currency: String,
    pub unit: PriceUnit,
    /// Minor units of `currency` per `unit` (cents per hour, say): an
    /// integer from 0 to 10¹².
    #[schema(example = 250)]
    pub unit_price: i64,
    /// When the price takes effect: now (the default) or later.
    #[serde(default, with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub effective_from: Option<OffsetDateTime>,
}

/// A rate card.
#[derive(Clone, Debug, PartialEq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct RateCardView {
    pub id: RateCardId,
    pub flavor: String,
    pub region: String,
    #[schema(example = "USD")]
    pub currency: String,
    #[schema(value_type = PriceUnit)]
    pub unit: String,
    /// Minor units of `currency` per `unit`.
    pub unit_price: i64,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub effective_from: OffsetDateTime,
    /// When the next card of this flavor and region took over; none while
    /// this one is the latest.
    #[serde(with = "time::serde::rfc3339::option")]
    #[schema(value_type = Option<String>, format = DateTime)]
    pub effective_until: Option<OffsetDateTime>,
    #[serde(with = "time::serde::rfc3339")]
    #[schema(value_type = String, format = DateTime)]
    pub created_at: OffsetDateTime,
}

const COLUMNS: &str =
    "id, flavor, region, currency, unit, unit_price, effective_from, effective_until, created_at";

fn resource(card: &RateCardView) -> ResourceName {
    ResourceName::new(Some(&card.region), None, None, "rate-card", card.id)
}

/// Which cards to list.
#[derive(Clone, Debug, Default, Deserialize, utoipa::IntoParams)]
#[serde(deny_unknown_fields)]
#[into_params(parameter_in = Query)]
pub struct RateCardFilter {
    pub flavor: Option<String>,
    pub region: Option<String>,
}

/// Every card (past ones too), by flavor, region and time.
pub async fn list(
    conn: &mut PgConnection,
    filter: &RateCardFilter,
) -> Result<Vec<RateCardView>, BillingError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rate_cards
          WHERE ($1::text IS NULL OR flavor = $1) AND ($2::text IS NULL OR region = $2)
          ORDER BY flavor, region, effective_from"
    )))
    .bind(&filter.flavor)
    .bind(&filter.region)
    .fetch_all(conn)
    .await?)
}

/// The prices in effect now and those scheduled, for tenants.
pub async fn current(conn: &mut PgConnection) -> Result<Vec<RateCardView>, BillingError> {
    Ok(sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "SELECT {COLUMNS} FROM rate_cards
          WHERE effective_until IS NULL OR effective_until > now()
          ORDER BY flavor, region, effective_from"
    )))
    .fetch_all(conn)
    .await?)
}

/// Adds a card (`rate_card.created`). If the latest card of the pair began
/// earlier and has no end, it ends where this one begins (a price change,
/// audited on both cards). Any other overlap is refused.
pub async fn create(
    mut tx: WriteTx,
    billing_currency: Currency,
    new: NewRateCard,
) -> Result<RateCardView, BillingError> {
    let mut errors = Vec::new();
    let currency = Currency::parse(&new.currency);
    if currency.is_none() {
        errors.push(FieldError {
            field: "currency".into(),
            code: "invalid".into(),
            message: "an ISO 4217 currency code, such as USD".into(),
        });
    }
    if !(0..=MAX_AMOUNT).contains(&new.unit_price) {
        errors.push(FieldError {
            field: "unit_price".into(),
            code: "invalid".into(),
            message: format!("minor units from 0 to {MAX_AMOUNT}"),
        });
    }
    if !errors.is_empty() {
        return Err(BillingError::Validation(errors));
    }
    if currency != Some(billing_currency) {
        return Err(BillingError::CurrencyMismatch {
            given: new.currency,
            billing: billing_currency.to_string(),
        });
    }
    let known: (bool, bool) = sqlx::query_as(
        "SELECT EXISTS (SELECT FROM flavors WHERE name = $1),
                EXISTS (SELECT FROM regions WHERE name = $2)",
    )
    .bind(&new.flavor)
    .bind(&new.region)
    .fetch_one(tx.conn())
    .await?;
    match known {
        (false, _) => return Err(BillingError::UnknownFlavor),
        (_, false) => return Err(BillingError::UnknownRegion),
        _ => {}
    }
    // One writer per pair at a time; the exclusion constraint is the
    // backstop.
    sqlx::query(
        "SELECT pg_advisory_xact_lock(hashtextextended('keel.rate_card:' || $1 || '/' || $2, 0))",
    )
    .bind(&new.flavor)
    .bind(&new.region)
    .execute(tx.conn())
    .await?;
    let now: OffsetDateTime = sqlx::query_scalar("SELECT now()")
        .fetch_one(tx.conn())
        .await?;
    let effective_from = new.effective_from.unwrap_or(now);
    if effective_from < now {
        return Err(BillingError::EffectiveFromInPast);
    }
    // The latest card, if it began earlier and is open-ended, ends here.
    let ended: Option<RateCardView> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "UPDATE rate_cards SET effective_until = $3
          WHERE flavor = $1 AND region = $2 AND effective_until IS NULL AND effective_from < $3
          RETURNING {COLUMNS}"
    )))
    .bind(&new.flavor)
    .bind(&new.region)
    .bind(effective_from)
    .fetch_optional(tx.conn())
    .await?;
    let created: Result<RateCardView, sqlx::Error> = sqlx::query_as(sqlx::AssertSqlSafe(format!(
        "INSERT INTO rate_cards (id, flavor, region, currency, unit, unit_price, effective_from)
         VALUES ($1, $2, $3, $4, $5, $6, $7)
         RETURNING {COLUMNS}"
    )))
    .bind(RateCardId::new())
    .bind(&new.flavor)
    .bind(&new.region)
    .bind(billing_currency.code())
    .bind(new.unit.as_str())
    .bind(new.unit_price)
    .bind(effective_from)
    .fetch_one(tx.conn())
    .await;
    let created = match created {
        Ok(card) => card,
        Err(error) if is_exclusion_violation(&error, "rate_cards_no_overlap") => {
            return Err(BillingError::RateCardOverlap);
        }
        Err(error) => return Err(error.into()),
    };
    if let Some(ended) = &ended {
        tx.audit(
            Audit::new("rate_card.end", None, resource(ended)).with_details(serde_json::json!({
                "card": ended,
                "succeeded_by": created.id,
            })),
        );
    }
    let resource = resource(&created);
    tx.emit(NewEvent::new(
        "rate_card.created",
        "rate_card",
        created.id.as_uuid(),
        1,
        None,
        resource.clone(),
        &created,
    ));
    tx.commit(Audit::new("rate_card.create", None, resource).with_details(&created))
        .await?;
    Ok(created)
}

fn is_exclusion_violation(error: &sqlx::Error, constraint: &str) -> bool {
    matches!(error, sqlx::Error::Database(db)
        if db.code().as_deref() == Some("23P01") && db.constraint() == Some(constraint))
}
