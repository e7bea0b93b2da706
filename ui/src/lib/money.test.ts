import { describe, expect, it } from "vitest";
import { decimal, formatHours, formatMoney, minorDigits, periodName } from "./money";

describe("money", () => {
  it("keeps minor units exact", () => {
    expect(decimal(1234, 2)).toBe("12.34");
    expect(decimal(5, 2)).toBe("0.05");
    expect(decimal(-50, 2)).toBe("-0.50");
    expect(decimal(500, 0)).toBe("500");
    expect(decimal(1, 3)).toBe("0.001");
    // Past what a double holds exactly.
    expect(decimal(900719925474099, 2)).toBe("9007199254740.99");
  });

  it("knows each currency's minor digits", () => {
    expect(minorDigits("USD")).toBe(2);
    expect(minorDigits("JPY")).toBe(0);
    expect(minorDigits("not a currency")).toBe(2);
  });

  it("formats for people", () => {
    expect(formatMoney(1234, "USD", "en-US")).toBe("$12.34");
    expect(formatMoney(500, "JPY", "en-US")).toBe("¥500");
    expect(formatMoney(0, "EUR", "en-US")).toBe("€0.00");
  });

  it("shows metered time in hours, rounded half up", () => {
    expect(formatHours(3_600_000_000)).toBe("1.00 h");
    expect(formatHours(5_400_000_000)).toBe("1.50 h");
    expect(formatHours(18_000_000)).toBe("0.01 h"); // half a hundredth rounds up
    expect(formatHours(17_999_999)).toBe("0.00 h");
  });

  it("names periods in UTC", () => {
    expect(periodName(new Date("2026-11-01T00:00:00Z"))).toBe("2026-11");
  });
});
