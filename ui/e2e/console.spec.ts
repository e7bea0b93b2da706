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

/** Errors the console logs, per page. The browser's own line for a
 * response it got as an error status ("Failed to load resource") is not
 * the console's doing: 404s and refused calls are part of the tests. */
const consoleErrors = new WeakMap<Page, string[]>();

test.beforeEach(({ page }) => {
  const errors: string[] = [];
  consoleErrors.set(page, errors);
  page.on("console", (message) => {
    if (message.type() === "error" && !message.text().startsWith("Failed to load resource")) {
      errors.push(message.text());
    }
  });
  page.on("pageerror", (error) => errors.push(error.message));
});

test.afterEach(({ page }) => {
  expect(consoleErrors.get(page), "errors in the browser console").toEqual([]);
});

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
  await page.goto("/signup");
  await audit(page, "signup");
  await signUp(page, uniqueEmail("first"), "First Org");
  await expect(page.getByText("No allocations in this project yet.")).toBeVisible();
  await audit(page, "allocations-empty");

  await page.getByRole("link", { name: "Launch allocation", exact: true }).click();
  await expect(page.getByRole("heading", { name: "Launch an allocation" })).toBeFocused();
  // Client-side validation keeps the input and says what is wrong.
  await page.getByRole("button", { name: "Launch", exact: true }).click();
  await expect(page.getByText("Enter a name.")).toBeVisible();
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

test("an owner invites a user, who joins and switches to that organisation", async ({ page, browser }) => {
  const ownerEmail = uniqueEmail("inviter");
  await signUp(page, ownerEmail, "Inviting Org");
  await page.getByRole("link", { name: "Members" }).click();
  await expect(page.getByRole("heading", { name: "Members" })).toBeVisible();
  await expect(page.getByRole("rowheader", { name: ownerEmail })).toBeVisible();

  const inviteeEmail = uniqueEmail("invitee");
  await page.getByLabel("Email to invite").fill(inviteeEmail);
  await page.getByLabel("Role", { exact: true }).selectOption("member");
  await page.getByRole("button", { name: "Invite", exact: true }).click();
  const secret = page.getByRole("region", { name: `Invitation token for ${inviteeEmail}` });
  await expect(secret).toContainText("kit_");
  const token = ((await secret.locator("code").textContent()) ?? "").trim();
  await expect(page.getByRole("rowheader", { name: inviteeEmail })).toBeVisible();
  await audit(page, "members");
  await page.getByRole("button", { name: "Done" }).click();
  await expect(secret).toHaveCount(0);

  // The invitee, in a browser of their own, signs up and accepts.
  const other = await browser.newContext();
  const invitee = await other.newPage();
  await signUp(invitee, inviteeEmail, "Invitee Home");
  await expect(invitee.getByText("Invitee Home")).toBeVisible();
  await invitee.getByRole("link", { name: "Members" }).click();
  await invitee.getByLabel("Invitation token").fill(token);
  await invitee.getByRole("button", { name: "Accept invitation" }).click();
  await expect(invitee.getByRole("status").filter({ hasText: "You joined" })).toBeVisible();

  // Two organisations now: switch to the one that invited them.
  const switcher = invitee.getByLabel("Organisation", { exact: true });
  await expect(switcher).toBeVisible();
  await switcher.selectOption({ label: "Inviting Org" });
  await expect(invitee.getByRole("heading", { name: "Allocations" })).toBeVisible();
  await expect
    .poll(() => switcher.evaluate((select: HTMLSelectElement) => select.selectedOptions[0]?.text))
    .toBe("Inviting Org");
  await expect(invitee.getByText(`${inviteeEmail} · member`)).toBeVisible();
  await other.close();

  // The owner sees the new member.
  await page.reload();
  await expect(page.getByRole("rowheader", { name: inviteeEmail })).toBeVisible();
});

test("a service account gets a key shown once, and the audit log shows it", async ({ page }) => {
  await signUp(page, uniqueEmail("robots"), "Robot Org");
  await page.getByRole("link", { name: "Service accounts" }).click();
  await expect(page.getByRole("heading", { name: "Service accounts" })).toBeVisible();
  await expect(page.getByText("No service accounts in this project yet.")).toBeVisible();
  await page.getByLabel("Name").fill("ci-deployer");
  await page.getByRole("button", { name: "Create service account" }).click();
  await expect(page.getByRole("heading", { name: /ci-deployer/ })).toBeVisible();
  await page.getByRole("button", { name: "New key" }).click();
  const secret = page.getByRole("region", { name: "New key for ci-deployer" });
  await expect(secret).toContainText("ksa_");
  await expect(page.getByRole("button", { name: "Copy", exact: true })).toBeVisible();
  await audit(page, "service-accounts");
  await page.getByRole("button", { name: "Done" }).click();
  await expect(secret).toHaveCount(0);

  await page.getByRole("link", { name: "Audit log" }).click();
  await expect(page.getByRole("heading", { name: "Audit log" })).toBeVisible();
  await page.getByLabel("Action").fill("service_account.create");
  await page.getByRole("button", { name: "Apply filters" }).click();
  await expect(page.getByRole("row", { name: /service_account\.create/ })).toHaveCount(1);
  await expect(page.getByRole("row", { name: /tenant\.register|session\.create/ })).toHaveCount(0);
  await audit(page, "audit-log");
});

test("double-clicking Launch makes one allocation", async ({ page }) => {
  await signUp(page, uniqueEmail("double"), "Double Org");
  await page.getByRole("link", { name: "Launch allocation", exact: true }).click();
  await page.getByLabel("Name").fill("once-1");
  await page.getByRole("button", { name: "Launch", exact: true }).dblclick();
  await expect(page.getByRole("heading", { name: "once-1" })).toBeVisible();
  await page.getByRole("link", { name: "Allocations", exact: true }).first().click();
  await expect(page.getByRole("link", { name: "once-1" })).toHaveCount(1);
  // Give a second create every chance to show up: the list is polled.
  await page.reload();
  await expect(page.getByRole("link", { name: "once-1" })).toHaveCount(1);
  await page.getByRole("link", { name: "once-1" }).click();
  await page.getByRole("button", { name: "Terminate" }).click();
  await page.getByRole("dialog", { name: "Terminate" }).getByRole("button", { name: "Terminate allocation" }).click();
  await expect(page.getByText("Terminated", { exact: true })).toBeVisible();
});

test("when Keel is unreachable the page says so and recovers by itself", async ({ page }) => {
  await signUp(page, uniqueEmail("outage"), "Outage Org");
  await page.getByRole("link", { name: "Flavors" }).click();
  await expect(page.getByRole("row", { name: /cpu\.small/ })).toBeVisible();
  // The api goes away (as the browser sees a stopped server).
  await page.route("**/v1/**", (route) => route.abort("connectionrefused"));
  await page.reload();
  await expect(page.getByRole("alert").first()).toContainText("Keel is unreachable");
  // It is back: the page recovers without the user doing anything.
  await page.unroute("**/v1/**");
  await expect(page.getByRole("row", { name: /cpu\.small/ })).toBeVisible();
  await expect(page.getByRole("alert")).toHaveCount(0);
});

test("an expired session is renewed mid-action, and a dead one returns to login", async ({ page }) => {
  await signUp(page, uniqueEmail("expiry"), "Expiry Org");
  await page.getByRole("link", { name: "Flavors" }).click();
  await expect(page.getByRole("heading", { name: "Flavors and availability" })).toBeVisible();
  const flavorsPath = new URL(page.url()).pathname;
  // The access token stops working (as at its expiry); the refresh token
  // still does: the next action renews the session silently.
  await page.evaluate(() => {
    const session = JSON.parse(localStorage.getItem("keel.session") ?? "{}");
    session.accessToken = "expired.access.token";
    localStorage.setItem("keel.session", JSON.stringify(session));
  });
  await page.reload();
  await expect(page.getByRole("row", { name: /cpu\.small/ })).toBeVisible();
  await page.getByRole("link", { name: "Launch allocation", exact: true }).click();
  await page.getByLabel("Name").fill("renewed-1");
  await page.getByRole("button", { name: "Launch", exact: true }).click();
  await expect(page.getByRole("heading", { name: "renewed-1" })).toBeVisible();
  await page.getByRole("button", { name: "Terminate" }).click();
  await page.getByRole("dialog", { name: "Terminate" }).getByRole("button", { name: "Terminate allocation" }).click();
  await expect(page.getByText("Terminated", { exact: true })).toBeVisible();

  // Both tokens dead (the session was revoked): back to login, keeping
  // the page, then back to it.
  await page.goto(flavorsPath);
  await expect(page.getByRole("heading", { name: "Flavors and availability" })).toBeVisible();
  await page.evaluate(() => {
    localStorage.setItem(
      "keel.session",
      JSON.stringify({ accessToken: "dead.access.token", refreshToken: "krt_dead", tenantId: null, audience: "tenant" }),
    );
  });
  await page.reload();
  await expect(page.getByRole("heading", { name: "Log in to Keel" })).toBeVisible();
  await expect(page.getByRole("status").filter({ hasText: "Your session has ended" })).toBeVisible();
  expect(new URL(page.url()).searchParams.get("next")).toBe(flavorsPath);
});

test("the console is usable at a phone's width", async ({ page }) => {
  await page.setViewportSize({ width: 390, height: 844 });
  await signUp(page, uniqueEmail("phone"), "Phone Org");
  await launch(page, "pocket-1");
  await expect(page.getByRole("heading", { name: "pocket-1" })).toBeVisible();
  await expect(page.getByText("Running", { exact: true })).toBeVisible();
  for (const [name, path] of [
    ["phone-allocation", null],
    ["phone-allocations", "allocations"],
    ["phone-flavors", "flavors"],
  ] as const) {
    if (path) {
      await page.getByRole("link", { name: path === "flavors" ? "Flavors" : "Allocations", exact: true }).first().click();
    }
    // Nothing wider than the screen but the tables, which scroll inside
    // their own box.
    const overflow = await page.evaluate(() => document.documentElement.scrollWidth - window.innerWidth);
    expect(overflow, name).toBeLessThanOrEqual(0);
    await audit(page, name);
  }
  await page.getByRole("link", { name: "Allocations", exact: true }).first().click();
  await page.getByRole("link", { name: "pocket-1" }).click();
  await page.getByRole("button", { name: "Terminate" }).click();
  await page.getByRole("dialog", { name: "Terminate" }).getByRole("button", { name: "Terminate allocation" }).click();
  await expect(page.getByText("Terminated", { exact: true })).toBeVisible();
});

// Last: it cordons the suite's only host for a moment.
test("an operator sees hosts and tenants and cordons a host", async ({ page }) => {
  const email = process.env.KEEL_E2E_OPERATOR_EMAIL ?? "";
  const password = process.env.KEEL_E2E_OPERATOR_PASSWORD ?? "";
  expect(email, "scripts/ui-e2e.sh creates the operator").not.toBe("");

  // A tenant's session does not open the operator console.
  await signUp(page, uniqueEmail("curious"), "Curious Org");
  await page.goto("/operator/hosts");
  await expect(page.getByRole("heading", { name: "Keel operations" })).toBeVisible();
  await audit(page, "operator-login");

  await page.getByLabel("Email").fill(email);
  await page.getByLabel("Password").fill(password);
  await page.getByRole("button", { name: "Log in" }).click();
  await expect(page.getByRole("heading", { name: "Hosts" })).toBeVisible();
  const host = page.getByRole("row", { name: /local-agent/ });
  await expect(host).toContainText("ready");
  await audit(page, "operator-hosts");

  await host.getByRole("button", { name: "Cordon local-agent", exact: true }).click();
  await page
    .getByRole("dialog", { name: "Cordon local-agent", exact: true })
    .getByRole("button", { name: "Cordon", exact: true })
    .click();
  await expect(host).toContainText("cordoned");
  await expect(host.getByRole("button", { name: "Cordon local-agent", exact: true })).toHaveCount(0);
  await host.getByRole("button", { name: "Uncordon local-agent", exact: true }).click();
  await page
    .getByRole("dialog", { name: "Uncordon local-agent", exact: true })
    .getByRole("button", { name: "Uncordon", exact: true })
    .click();
  await expect(host).toContainText("ready");

  await page.getByRole("link", { name: "Tenants" }).click();
  await expect(page.getByRole("rowheader", { name: "Curious Org" }).first()).toBeVisible();
  await audit(page, "operator-tenants");
});

test("an owner sees this month's usage, prices and account, and downloads it as CSV", async ({ page }) => {
  await signUp(page, uniqueEmail("billing"), "Billing Org");
  await launch(page, "metered");
  await expect(page.getByText("Running", { exact: true })).toBeVisible();
  await page.getByRole("link", { name: "Billing" }).click();
  await expect(page.getByRole("heading", { name: "Billing" })).toBeFocused();
  await expect(page.getByText("Pays by")).toBeVisible();
  await expect(page.getByText("No invoices yet.")).toBeVisible();
  // The billing worker meters the run within moments; the page counts it
  // up to now (reloaded rather than waiting for its one-minute poll).
  await expect(async () => {
    await page.reload();
    await expect(page.getByRole("row", { name: /cpu\.small/ }).first()).toBeVisible({ timeout: 2_000 });
  }).toPass({ timeout: 30_000 });
  await audit(page, "billing");
  const download = page.waitForEvent("download");
  await page.getByRole("button", { name: "Download usage (CSV)" }).click();
  const file = await download;
  expect(file.suggestedFilename()).toMatch(/^usage-\d{4}-\d{2}\.csv$/);
  const path = await file.path();
  const text = (await import("node:fs")).readFileSync(path, "utf8");
  expect(text.split("\n")[0]).toBe(
    "allocation_id,project_id,flavor,region,started_at,ended_at,quantity_us,status,invoice_id",
  );
  expect(text).toContain(",cpu.small,local-1,");
  expect(text).toContain(",open,");
});
