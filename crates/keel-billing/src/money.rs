//! Money: integer minor units of an ISO 4217 currency, and the one place
//! amounts are rounded. No floating point anywhere (the
//! `no_floats_in_money_paths` test keeps it so).

use serde::{Deserialize, Serialize};
use std::fmt;

/// Largest amount accepted from outside (a price, a grant, a checkout): 10¹²
/// minor units — ten billion dollars — far above anything real, far below
/// where sums of them could overflow an `i64`.
pub const MAX_AMOUNT: i64 = 1_000_000_000_000;

/// An ISO 4217 currency code (`USD`, `EUR`, `JPY`…).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Currency(iso_currency::Currency);

impl Currency {
    pub const USD: Currency = Currency(iso_currency::Currency::USD);

    /// The code, if it is an ISO 4217 currency (upper case, as ISO writes it).
    pub fn parse(code: &str) -> Option<Self> {
        iso_currency::Currency::from_code(code).map(Self)
    }

    pub fn code(&self) -> &'static str {
        self.0.code()
    }

    /// Digits after the decimal point (2 for USD, 0 for JPY, 3 for BHD).
    pub fn exponent(&self) -> u16 {
        self.0.exponent().unwrap_or(0)
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.code())
    }
}

impl Serialize for Currency {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.code())
    }
}

impl<'de> Deserialize<'de> for Currency {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        let code = String::deserialize(deserializer)?;
        Currency::parse(&code).ok_or_else(|| {
            serde::de::Error::custom(format!("{code:?} is not an ISO 4217 currency"))
        })
    }
}

/// What a price is per: a length of run time.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum PriceUnit {
    Second,
    Minute,
    Hour,
}

impl PriceUnit {
    pub fn as_str(self) -> &'static str {
        match self {
            PriceUnit::Second => "second",
            PriceUnit::Minute => "minute",
            PriceUnit::Hour => "hour",
        }
    }

    pub fn parse(value: &str) -> Option<Self> {
        match value {
            "second" => Some(PriceUnit::Second),
            "minute" => Some(PriceUnit::Minute),
            "hour" => Some(PriceUnit::Hour),
            _ => None,
        }
    }

    /// The unit in microseconds (run time is metered in microseconds).
    pub fn micros(self) -> i128 {
        match self {
            PriceUnit::Second => 1_000_000,
            PriceUnit::Minute => 60_000_000,
            PriceUnit::Hour => 3_600_000_000,
        }
    }
}

/// `numerator / denominator`, rounded half up (away from zero for the
/// non-negative values money has here). `None` if the result does not fit an
/// `i64` or the inputs are negative.
fn div_half_up(numerator: i128, denominator: i128) -> Option<i64> {
    if numerator < 0 || denominator <= 0 {
        return None;
    }
    let quotient = numerator / denominator;
    let remainder = numerator % denominator;
    let rounded = if remainder * 2 >= denominator {
        quotient + 1
    } else {
        quotient
    };
    i64::try_from(rounded).ok()
}

/// The amount of one invoice line: `quantity` microseconds at `unit_price`
/// minor units per `unit`, rounded half up to a whole minor unit — once per
/// line, never per usage record (doc/billing.md, "Rounding").
pub fn line_amount(quantity_micros: i64, unit_price: i64, unit: PriceUnit) -> Option<i64> {
    div_half_up(
        i128::from(quantity_micros).checked_mul(i128::from(unit_price))?,
        unit.micros(),
    )
}

/// Tax at `rate_bp` basis points (1/100 of a percent) of `base`, rounded
/// half up.
pub fn tax(base: i64, rate_bp: i32) -> Option<i64> {
    div_half_up(i128::from(base).checked_mul(i128::from(rate_bp))?, 10_000)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_round_half_up_once() {
        // One hour at 250 per hour.
        assert_eq!(line_amount(3_600_000_000, 250, PriceUnit::Hour), Some(250));
        // Half a minor unit rounds up; just under it rounds down.
        assert_eq!(line_amount(1_800_000_000, 1, PriceUnit::Hour), Some(1));
        assert_eq!(line_amount(1_799_999_999, 1, PriceUnit::Hour), Some(0));
        // Per second, microseconds are fractions of the price.
        assert_eq!(line_amount(1_500_000, 3, PriceUnit::Second), Some(5));
        assert_eq!(line_amount(0, 9_999, PriceUnit::Minute), Some(0));
        // A month at the highest price fits; absurd products do not.
        assert_eq!(
            line_amount(31 * 86_400 * 1_000_000, MAX_AMOUNT, PriceUnit::Hour),
            Some(744 * MAX_AMOUNT)
        );
        assert_eq!(line_amount(i64::MAX, MAX_AMOUNT, PriceUnit::Second), None);
        assert_eq!(line_amount(-1, 5, PriceUnit::Second), None);
    }

    #[test]
    fn tax_in_basis_points() {
        assert_eq!(tax(10_000, 0), Some(0));
        assert_eq!(tax(10_000, 2_000), Some(2_000));
        assert_eq!(tax(333, 1_950), Some(65)); // 64.935 → 65
        assert_eq!(tax(1, 4_999), Some(0));
        assert_eq!(tax(1, 5_000), Some(1));
    }

    #[test]
    fn currencies_are_iso_4217() {
        let usd = Currency::parse("USD").expect("USD");
        assert_eq!((usd.code(), usd.exponent()), ("USD", 2));
        assert_eq!(Currency::parse("JPY").map(|c| c.exponent()), Some(0));
        assert_eq!(Currency::parse("BHD").map(|c| c.exponent()), Some(3));
        assert!(Currency::parse("usd").is_none());
        assert!(Currency::parse("XYZ").is_none());
        assert!(serde_json::from_str::<Currency>("\"DOGE\"").is_err());
    }
}
