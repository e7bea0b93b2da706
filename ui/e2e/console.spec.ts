// The console end to end, in Chromium, against a real local Keel (api,
// worker, node agent, Postgres) that scripts/ui-e2e.sh started. Elements
// are found by role and label; waits are on what the page shows.

import AxeBuilder from "@axe-core/playwright";
import { expect, test, type Page } from "@playwright/test";

const PASSWORD = "a long enough password";

function uniqueEmail(who: string): string {
  return `${who}-${Date.now()}-${Math.floor(Math.random() * 1e6)}@example.com`;
}

/** Fails on any serious or critical accessibility violation. */
async function audit(page: Page, name: string): Promise<void> {
  const results = await new AxeBuilder({ page }).analyze();
  const serious = results.violations
    .filter((violation) => violation.impact === "serious" || violation.impact === "critical")
    .map((violation) => `${violation.id}: ${violation.help} (${violation.nodes.length} elements)`);
  expect(serious, `accessibility of ${name}`).toEqual([]);
  await page.screenshot({ path: `build/screenshots/${name}.png`, fullPage: true });
}

/** Watches for console errors the page logs. */
function collectConsoleErrors(page: Page): string[] {
  const errors: string[] = [];
  page.on("console", (message) => {
    if (message.type() === "error") {
      errors.push(message.text());
    }
  });
  page.on("pageerror", (error) => errors.push(error.message));
  return errors;
}

/** Signs up on the sign-up page: opened afresh, or (`reload: false`) the
 * one the browser is on, so the app's memory carries over as it would
 * for a user. */
async function signUp(page: Page, email: string, organisation: string, reload = true): Promise<void> {
  if (reload) {
    await page.goto("/signup");
  }
  await expect(page.getByRole("heading", { name: "Create your Keel account" })).toBeFocused();
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByLabel("Organisation name").fill(organisation);
  await page.getByRole("button", { name: "Create account" }).click();
  await expect(page.getByRole("heading", { name: "Allocations" })).toBeVisible();
}

async function launch(page: Page, name: string, flavor?: string): Promise<void> {
  await page.getByRole("link", { name: "Launch allocation", exact: true }).click();
  await expect(page.getByRole("heading", { name: "Launch an allocation" })).toBeVisible();
  await page.getByLabel("Name").fill(name);
  if (flavor) {
    await page.getByLabel("Flavor").selectOption(flavor);
  }
  await page.getByRole("button", { name: "Launch", exact: true }).click();
}

test("sign up, launch an allocation, see it running, terminate it", async ({ page }) => {
  const errors = collectConsoleErrors(page);
  await page.goto("/signup");
  await audit(page, "signup");
  await signUp(page, uniqueEmail("first"), "First Org");
  await expect(page.getByText("No allocations in this project yet.")).toBeVisible();
  await audit(page, "allocations-empty");

  await page.getByRole("link", { name: "Launch allocation", exact: true }).click();
  await expect(page.getByRole("heading", { name: "Launch an allocation" })).toBeFocused();
  // Client-side validation keeps the input and says what is wrong.
  await page.getByLabel("Name").fill("Not A Valid Name");
  await page.getByRole("button", { name: "Launch", exact: true }).click();
  await expect(page.getByText("Use lowercase letters, digits and hyphens", { exact: false })).toBeVisible();
  await expect(page.getByLabel("Name")).toHaveValue("Not A Valid Name");
  await audit(page, "launch");
  await page.getByLabel("Name").fill("web-1");
  await page.getByRole("button", { name: "Launch", exact: true }).click();

  await expect(page.getByRole("heading", { name: "web-1" })).toBeVisible();
  await expect(page.getByText("Running", { exact: true })).toBeVisible();
  await expect(page.getByRole("button", { name: "Stop" })).toBeVisible();
  await expect(page.getByRole("button", { name: "Start" })).toHaveCount(0);
  await audit(page, "allocation-running");

  // A terminal into the workload: a shell that runs what is typed.
  await page.getByRole("link", { name: "Open terminal" }).click();
  await expect(page.getByRole("status").filter({ hasText: /^Connected/ })).toBeVisible();
  await page.keyboard.type("echo keel-$((6*7))\n");
  const terminal = page.getByRole("region", { name: "Terminal of web-1" });
  await expect(terminal).toContainText("keel-42");
  await audit(page, "terminal");
  await page.getByRole("button", { name: "Disconnect" }).click();
  await expect(page.getByRole("status").filter({ hasText: /^Disconnected/ })).toBeVisible();
  await page.getByRole("button", { name: "Reconnect" }).click();
  await expect(page.getByRole("status").filter({ hasText: /^Connected/ })).toBeVisible();
  // The scrollback survived the reconnect, and the new session works.
  await expect(terminal).toContainText("keel-42");
  await page.keyboard.type("echo again-$((6*8))\n");
  await expect(terminal).toContainText("again-48");
  await page.getByRole("link", { name: "web-1" }).click();
  await expect(page.getByRole("heading", { name: "web-1" })).toBeVisible();

  await page.getByRole("link", { name: "Allocations", exact: true }).first().click();
  await expect(page.getByRole("link", { name: "web-1" })).toBeVisible();
  await expect(page.getByRole("row", { name: /web-1.*Running/ })).toBeVisible();
  await audit(page, "allocations");

  await page.getByRole("link", { name: "web-1" }).click();
  await page.getByRole("button", { name: "Terminate" }).click();
  const dialog = page.getByRole("dialog", { name: "Terminate" });
  await expect(dialog).toBeVisible();
  await dialog.getByRole("button", { name: "Terminate allocation" }).click();
  await expect(page.getByText("Terminated", { exact: true })).toBeVisible();
  await expect(page.getByRole("button", { name: "Terminate" })).toHaveCount(0);

  // Terminated allocations leave the list.
  await page.getByRole("link", { name: "Allocations", exact: true }).first().click();
  await expect(page.getByText("No allocations in this project yet.")).toBeVisible();

  await page.getByRole("link", { name: "Flavors" }).click();
  await expect(page.getByRole("row", { name: /cpu\.small/ })).toBeVisible();
  await audit(page, "flavors");
  expect(errors).toEqual([]);
});

test("a launch the API refuses shows its message and request id", async ({ page }) => {
  await signUp(page, uniqueEmail("refused"), "Refused Org");
  // No host here has a GPU: the API refuses the GPU flavor.
  await launch(page, "gpu-1", "gpu.a100.1");
  const alert = page.getByRole("alert");
  await expect(alert).toContainText("The allocation was not launched");
  await expect(alert).toContainText("Request id");
  await expect(page.getByRole("button", { name: "Copy request id" })).toBeVisible();
  // Nothing was created, and the form kept its input.
  await expect(page.getByLabel("Name")).toHaveValue("gpu-1");
  await page.getByRole("link", { name: "Cancel" }).click();
  await expect(page.getByText("No allocations in this project yet.")).toBeVisible();
});

test("a second tenant cannot see the first one's allocations", async ({ page }) => {
  await signUp(page, uniqueEmail("owner"), "Owner Org");
  await launch(page, "private-1");
  await expect(page.getByRole("heading", { name: "private-1" })).toBeVisible();
  const privateUrl = page.url();
  const projectOf = (url: string) => new URL(url).pathname.split("/")[2];

  await page.getByRole("button", { name: "Sign out" }).click();
  await expect(page.getByRole("heading", { name: "Log in to Keel" })).toBeVisible();
  await audit(page, "login");

  // In the same page, without a reload: nothing the first user saw may
  // carry over.
  await page.getByRole("link", { name: "Create an account" }).click();
  await signUp(page, uniqueEmail("other"), "Other Org", false);
  await expect(page.getByText("No allocations in this project yet.")).toBeVisible();
  // Its own project, not the first tenant's (nothing of theirs cached).
  expect(projectOf(page.url())).not.toBe(projectOf(privateUrl));
  await expect(page.getByText("private-1")).toHaveCount(0);
  await page.goto(privateUrl);
  await expect(page.getByRole("heading", { name: "Not found" })).toBeVisible();
  await expect(page.getByText("private-1")).toHaveCount(0);
  await audit(page, "not-found");
});

test("a page opened without a session asks to log in and returns to it", async ({ page }) => {
  const email = uniqueEmail("returning");
  await signUp(page, email, "Returning Org");
  const flavorsUrl = new URL(page.url());
  flavorsUrl.pathname = flavorsUrl.pathname.replace(/allocations$/, "flavors");
  await page.getByRole("button", { name: "Sign out" }).click();
  await page.goto(flavorsUrl.pathname);
  await expect(page.getByRole("heading", { name: "Log in to Keel" })).toBeVisible();
  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill("the wrong password");
  await page.getByRole("button", { name: "Log in" }).click();
  await expect(page.getByRole("alert")).toContainText("Login failed");
  await page.getByLabel("Password").fill(PASSWORD);
  await page.getByRole("button", { name: "Log in" }).click();
  await expect(page.getByRole("heading", { name: "Flavors and availability" })).toBeVisible();
});
