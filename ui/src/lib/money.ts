// Money and metered time as the API gives them: integer minor units of an
// ISO 4217 currency, and run time in microseconds. Formatting stays in
// integers (BigInt) until the string, like the API's own rule of no
// floating point for money.

/** `1234` USD → the decimal string "12.34" (exact). */
export function decimal(minor: number, digits: number): string {
  const value = BigInt(minor);
  const negative = value < 0n;
  const magnitude = negative ? -value : value;
  if (digits === 0) {
    return `${negative ? "-" : ""}${magnitude}`;
  }
  const scale = 10n ** BigInt(digits);
  const whole = magnitude / scale;
  const fraction = (magnitude % scale).toString().padStart(digits, "0");
  return `${negative ? "-" : ""}${whole}.${fraction}`;
}

/** An amount for people: "$12.34", "¥500", "-€0.50". `digits` is the
 * currency's ISO 4217 exponent as the API states it (`currency_digits`):
 * browsers' own tables (CLDR) differ from ISO for a few currencies, and
 * minor units must be read the way the API counted them. */
export function formatMoney(minor: number, currency: string, digits: number, locale?: string): string {
  const text = decimal(minor, digits);
  try {
    // Intl formats a decimal string exactly (no float in between).
    const format = new Intl.NumberFormat(locale, {
      style: "currency",
      currency,
      minimumFractionDigits: digits,
      maximumFractionDigits: digits,
    }) as unknown as {
      format(value: string): string;
    };
    return format.format(text);
  } catch {
    return `${text} ${currency}`;
  }
}

const MICROS_PER_HOUR = 3_600_000_000n;

/** Run time in microseconds as hours with two decimals, rounded half up:
 * "1.50 h". */
export function formatHours(micros: number): string {
  const hundredths = (BigInt(micros) * 100n * 2n + MICROS_PER_HOUR) / (2n * MICROS_PER_HOUR);
  return `${decimal(Number(hundredths), 2)} h`;
}

/** A billing period's name from its first day: "2026-11". The API's dates
 * (`YYYY-MM-DD`) arrive from the generated client as local midnight, so
 * they are read in local time. */
export function periodName(start: Date): string {
  return `${start.getFullYear()}-${String(start.getMonth() + 1).padStart(2, "0")}`;
}

/** The month a `<input type="month">` holds, if it is a whole month from
 * 2000 to `latest` (the API bills no other). */
export function acceptedMonth(value: string, latest: string): string | undefined {
  return /^\d{4}-\d{2}$/.test(value) && value >= "2000-01" && value <= latest ? value : undefined;
}
