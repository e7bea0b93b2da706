//! Billing periods: calendar months in UTC. A run that crosses a month's
//! end is cut there, so every usage record lies in exactly one period and
//! the pieces of a run add up to the whole run.

use time::{Date, Month, OffsetDateTime, Time, UtcOffset};

/// The first day of the month `at` falls in (UTC).
pub fn period_of(at: OffsetDateTime) -> Date {
    let at = at.to_offset(UtcOffset::UTC);
    // Day 1 exists in every month.
    Date::from_calendar_date(at.year(), at.month(), 1).unwrap_or(at.date())
}

/// The first instant of `period`.
pub fn period_start(period: Date) -> OffsetDateTime {
    period.with_time(Time::MIDNIGHT).assume_utc()
}

/// The first instant of the month after `period` (for the last month
/// `time` can name, the last instant it can).
pub fn period_end(period: Date) -> OffsetDateTime {
    let (year, month) = match period.month() {
        Month::December => (period.year() + 1, Month::January),
        month => (period.year(), month.next()),
    };
    match Date::from_calendar_date(year, month, 1) {
        Ok(next) => next.with_time(Time::MIDNIGHT).assume_utc(),
        Err(_) => time::PrimitiveDateTime::MAX.assume_utc(),
    }
}

/// One period's share of a run: `[start, end)` within `period`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub period: Date,
    pub start: OffsetDateTime,
    pub end: OffsetDateTime,
}

/// Cuts `[start, end)` at every period boundary. An empty or backwards
/// run has no pieces.
pub fn split(start: OffsetDateTime, end: OffsetDateTime) -> Vec<Piece> {
    let mut pieces = Vec::new();
    let mut from = start.to_offset(UtcOffset::UTC);
    let end = end.to_offset(UtcOffset::UTC);
    while from < end {
        let period = period_of(from);
        let until = period_end(period).min(end);
        pieces.push(Piece {
            period,
            start: from,
            end: until,
        });
        from = until;
    }
    pieces
}

/// The years a [`Period`] may name.
pub const FIRST_YEAR: i32 = 2000;
pub const LAST_YEAR: i32 = 9998;

/// A billing period as the API names it: `YYYY-MM`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Period(pub Date);

impl Period {
    pub fn parse(text: &str) -> Option<Self> {
        let (year, month) = text.split_once('-')?;
        if year.len() != 4 || month.len() != 2 {
            return None;
        }
        let year: i32 = year.parse().ok()?;
        // Keel bills real months: far-away years are typing errors (and the
        // end of the last month `time` can name would overflow).
        if !(FIRST_YEAR..=LAST_YEAR).contains(&year) {
            return None;
        }
        let month: u8 = month.parse().ok()?;
        let month = time::Month::try_from(month).ok()?;
        Date::from_calendar_date(year, month, 1).ok().map(Self)
    }

    /// The period before the one `at` lies in.
    pub fn before(at: OffsetDateTime) -> Self {
        let this = period_of(at);
        Self(period_of(period_start(this) - time::Duration::days(1)))
    }

    pub fn start(self) -> OffsetDateTime {
        period_start(self.0)
    }

    pub fn end(self) -> OffsetDateTime {
        period_end(self.0)
    }
}

impl<'de> serde::Deserialize<'de> for Period {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let text = <String as serde::Deserialize>::deserialize(deserializer)?;
        Period::parse(&text)
            .ok_or_else(|| serde::de::Error::custom("a period is a month written YYYY-MM"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use time::macros::{date, datetime};

    #[test]
    fn a_run_inside_one_month_is_one_piece() {
        let pieces = split(
            datetime!(2026-03-10 08:00:00.5 UTC),
            datetime!(2026-03-10 09:30:00 UTC),
        );
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].period, date!(2026 - 03 - 01));
    }

    #[test]
    fn a_run_is_cut_at_each_month_end_and_the_pieces_add_up() {
        let (start, end) = (
            datetime!(2027-12-31 23:00:00 UTC),
            datetime!(2028-03-01 00:00:01 UTC),
        );
        let pieces = split(start, end);
        let periods: Vec<Date> = pieces.iter().map(|p| p.period).collect();
        assert_eq!(
            periods,
            [
                date!(2027 - 12 - 01),
                date!(2028 - 01 - 01),
                date!(2028 - 02 - 01),
                date!(2028 - 03 - 01)
            ]
        );
        // A leap February, whole.
        assert_eq!(pieces[2].end - pieces[2].start, time::Duration::days(29));
        let total: time::Duration = pieces.iter().map(|p| p.end - p.start).sum();
        assert_eq!(total, end - start);
        for pair in pieces.windows(2) {
            assert_eq!(pair[0].end, pair[1].start, "no gap, no overlap");
        }
    }

    #[test]
    fn a_run_ending_exactly_at_midnight_stays_in_its_month() {
        let pieces = split(
            datetime!(2026-04-30 22:00:00 UTC),
            datetime!(2026-05-01 00:00:00 UTC),
        );
        assert_eq!(pieces.len(), 1);
        assert_eq!(pieces[0].period, date!(2026 - 04 - 01));
    }

    #[test]
    fn the_last_month_time_can_name_ends_without_looping() {
        let start = datetime!(9999-12-31 23:00 UTC);
        let pieces = split(start, datetime!(9999-12-31 23:30 UTC));
        assert_eq!(pieces.len(), 1);
        assert!(period_end(date!(9999 - 12 - 01)) > start);
    }

    #[test]
    fn other_offsets_are_read_in_utc_and_empty_runs_have_no_pieces() {
        let start = datetime!(2026-05-01 01:30:00 +02:00); // 2026-04-30 23:30 UTC
        let pieces = split(start, datetime!(2026-05-01 00:30:00 UTC));
        assert_eq!(pieces.len(), 2);
        assert_eq!(pieces[0].period, date!(2026 - 04 - 01));
        assert!(split(start, start).is_empty());
        assert!(split(datetime!(2026-05-02 0:00 UTC), start).is_empty());
    }
}
