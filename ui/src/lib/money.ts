// Money and metered time as the API gives them: integer minor units of an
// ISO 4217 currency, and run time in microseconds. Formatting stays in
// integers (BigInt) until the string, like the API's own rule of no
// floating point for money.

/** Digits after the decimal point of `currency` (2 for USD, 0 for JPY). */
export function minorDigits(currency: string): number {
  try {
    return new Intl.NumberFormat("en", { style: "currency", currency }).resolvedOptions().maximumFractionDigits ?? 2;
  } catch {
    return 2;
  }
}

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

/** An amount for people: "$12.34", "¥500", "-€0.50". */
export function formatMoney(minor: number, currency: string, locale?: string): string {
  const text = decimal(minor, minorDigits(currency));
  try {
    // Intl formats a decimal string exactly (no float in between).
    const format = new Intl.NumberFormat(locale, { style: "currency", currency }) as unknown as {
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

/** A billing period's name from its first day (a UTC date): "2026-11". */
export function periodName(start: Date): string {
  return `${start.getUTCFullYear()}-${String(start.getUTCMonth() + 1).padStart(2, "0")}`;
}
