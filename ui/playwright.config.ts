import { defineConfig } from "@playwright/test";

// Runs against a Keel that scripts/ui-e2e.sh started, in Debian's Chromium
// (never a downloaded browser).
export default defineConfig({
  testDir: "e2e",
  outputDir: "build/test-results",
  fullyParallel: false,
  workers: 1,
  retries: 0,
  timeout: 90_000,
  expect: { timeout: 30_000 },
  reporter: [["list"]],
  use: {
    baseURL: process.env.KEEL_CONSOLE_URL ?? "http://127.0.0.1:8080",
    viewport: { width: 1280, height: 800 },
    trace: "retain-on-failure",
    screenshot: "only-on-failure",
    launchOptions: {
      executablePath: process.env.KEEL_CHROMIUM ?? "/usr/bin/chromium",
      args: [
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
      ],
    },
  },
});
