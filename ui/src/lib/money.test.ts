import { describe, expect, it } from "vitest";
import { acceptedMonth, decimal, formatHours, formatMoney, periodName } from "./money";

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

  it("formats for people with the API's digits", () => {
    expect(formatMoney(1234, "USD", 2, "en-US")).toBe("$12.34");
    expect(formatMoney(500, "JPY", 0, "en-US")).toBe("¥500");
    expect(formatMoney(0, "EUR", 2, "en-US")).toBe("€0.00");
    // ISO 4217 gives RSD two digits where browsers' tables may say none:
    // 10000 minor units are 100 dinars, not 10000.
    expect(formatMoney(10000, "RSD", 2, "en-US")).toContain("100.00");
    expect(formatMoney(1, "BHD", 3, "en-US")).toContain("0.001");
  });

  it("shows metered time in hours, rounded half up", () => {
    expect(formatHours(3_600_000_000)).toBe("1.00 h");
    expect(formatHours(5_400_000_000)).toBe("1.50 h");
    expect(formatHours(18_000_000)).toBe("0.01 h"); // half a hundredth rounds up
    expect(formatHours(17_999_999)).toBe("0.00 h");
  });

  it("names periods from the client's dates (local midnight)", () => {
    // What the generated client's parseDate makes of "2026-11-01".
    expect(periodName(new Date(2026, 10, 1))).toBe("2026-11");
    expect(periodName(new Date(2026, 0, 1))).toBe("2026-01");
  });

  it("accepts only whole months the API bills", () => {
    expect(acceptedMonth("2026-11", "2026-12")).toBe("2026-11");
    expect(acceptedMonth("2027-01", "2026-12")).toBeUndefined();
    expect(acceptedMonth("0202-01", "2026-12")).toBeUndefined();
    expect(acceptedMonth("", "2026-12")).toBeUndefined();
  });
});
