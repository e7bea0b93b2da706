import { useInfiniteQuery, useMutation, useQuery } from "@tanstack/react-query";
import { useState } from "react";
import { Link } from "react-router";
import { api } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { TableWrap } from "../components/TableWrap";
import { UpdatedAt } from "../components/UpdatedAt";
import { acceptedMonth, formatHours, formatMoney, periodName } from "../lib/money";

/** Saves `text` as a file the browser downloads. */
function saveFile(name: string, text: string) {
  const url = URL.createObjectURL(new Blob([text], { type: "text/csv;charset=utf-8" }));
  const link = document.createElement("a");
  link.href = url;
  link.download = name;
  link.click();
  // Some browsers read the blob after the click returns.
  setTimeout(() => URL.revokeObjectURL(url), 60_000);
}

/** This month, as `<input type="month">` writes it. */
function thisMonth(): string {
  const now = new Date();
  return `${now.getFullYear()}-${String(now.getMonth() + 1).padStart(2, "0")}`;
}

const STANDING: Record<string, string> = {
  active: "Active",
  warned: "Credit used up: add credit to keep launching",
  launches_stopped: "Credit used up: launches and starts are held",
  suspended: "Credit used up: allocations were stopped",
};

/** The organisation's billing (owners and admins): its account and credit,
 * this month's usage so far, invoices, prices, and CSV exports. */
export function BillingPage() {
  // The month shown (empty: this month) and the one being typed.
  const [period, setPeriod] = useState<string>("");
  const [typed, setTyped] = useState<string | undefined>(undefined);
  const account = useQuery({
    queryKey: ["billing", "account"],
    queryFn: () => api.billing.billingAccountGet(),
    refetchInterval: 60_000,
  });
  const usage = useQuery({
    queryKey: ["billing", "usage", period],
    queryFn: () => api.billing.usageGet({ period: period || undefined }),
    refetchInterval: 60_000,
  });
  const invoices = useInfiniteQuery({
    queryKey: ["billing", "invoices"],
    queryFn: ({ pageParam }) => api.billing.invoiceList({ limit: 50, cursor: pageParam }),
    initialPageParam: undefined as string | undefined,
    getNextPageParam: (page) => page.nextCursor ?? undefined,
  });
  const credit = useQuery({
    queryKey: ["billing", "credit"],
    queryFn: () => api.billing.creditGet({ limit: 200 }),
  });
  const prices = useQuery({ queryKey: ["billing", "prices"], queryFn: () => api.billing.priceList() });
  const shownPeriod = usage.data ? periodName(usage.data.periodStart) : period;
  const exportUsage = useMutation({
    mutationFn: () => api.billing.usageCsv({ period: period || undefined }),
    onSuccess: (text) => saveFile(`usage-${shownPeriod}.csv`, text),
  });
  const exportInvoices = useMutation({
    mutationFn: () => api.billing.invoicesCsv(),
    onSuccess: (text) => saveFile("invoices.csv", text),
  });
  const invoiceItems = invoices.data?.pages.flatMap((page) => page.items) ?? [];
  const currency = account.data?.currency ?? usage.data?.currency ?? "USD";
  // The currency's ISO digits as the API counts minor units.
  const digits = account.data?.currencyDigits ?? 2;
  const money = (minor: number) => formatMoney(minor, currency, digits);

  return (
    <>
      <PageHeading>Billing</PageHeading>
      {account.isPending && <Loading what="the billing account" />}
      {account.error && <ErrorNotice error={account.error} title="The billing account could not be loaded" />}
      {account.data && (
        <section aria-labelledby="account-heading">
          <h2 id="account-heading">Account</h2>
          <dl className="details">
            <dt>Pays by</dt>
            <dd>{account.data.mode === "prepaid" ? "Prepaid credit" : "Invoice"}</dd>
            <dt>Credit balance</dt>
            <dd>{money(account.data.balance)}</dd>
            <dt>Owed, not yet paid</dt>
            <dd>{money(account.data.outstanding)}</dd>
            {account.data.mode === "prepaid" && (
              <>
                <dt>Available credit</dt>
                <dd>{money(account.data.available)}</dd>
                <dt>Standing</dt>
                <dd>
                  <span className={account.data.standing === "active" ? "" : "warning"}>
                    {STANDING[account.data.standing] ?? account.data.standing}
                  </span>
                </dd>
              </>
            )}
          </dl>
        </section>
      )}

      <section aria-labelledby="usage-heading">
        <h2 id="usage-heading">Usage {shownPeriod ? `in ${shownPeriod}` : "this month"}</h2>
        <form className="filters" aria-label="Choose the month" onSubmit={(event) => event.preventDefault()}>
          <label>
            Month
            <input
              type="month"
              name="period"
              min="2000-01"
              max={thisMonth()}
              value={typed ?? shownPeriod}
              onChange={(event) => {
                // Only a whole month the API bills is asked for; a part
                // being typed stays in the field.
                setTyped(event.target.value);
                const month = acceptedMonth(event.target.value, thisMonth());
                if (month) {
                  setPeriod(month);
                  setTyped(undefined);
                }
              }}
              onBlur={() => setTyped(undefined)}
            />
          </label>
          <div className="actions">
            <button
              type="button"
              className="button secondary"
              disabled={exportUsage.isPending}
              onClick={() => exportUsage.mutate()}
            >
              Download usage (CSV)
            </button>
          </div>
        </form>
        {exportUsage.error && <ErrorNotice error={exportUsage.error} title="The usage could not be exported" />}
        <UpdatedAt at={usage.dataUpdatedAt} fetching={usage.isFetching} />
        {usage.isPending && <Loading what="usage" />}
        {usage.error && <ErrorNotice error={usage.error} title="Usage could not be loaded" />}
        {usage.data && usage.data.lines.length === 0 && <p className="empty">Nothing has run this month.</p>}
        {usage.data && usage.data.lines.length > 0 && (
          <>
            <TableWrap label="Usage by flavor">
              <table>
                <caption className="visually-hidden">Run time by flavor and price, so far</caption>
                <thead>
                  <tr>
                    <th scope="col">Flavor</th>
                    <th scope="col">Region</th>
                    <th scope="col">Run time</th>
                    <th scope="col">Price</th>
                    <th scope="col">Amount</th>
                  </tr>
                </thead>
                <tbody>
                  {usage.data.lines.map((line) => (
                    <tr key={line.lineNo}>
                      <th scope="row">{line.flavor}</th>
                      <td>{line.region}</td>
                      <td>{formatHours(line.quantity)}</td>
                      <td>
                        {line.rateCardId
                          ? `${money(line.unitPrice)} / ${line.unit}`
                          : "no price"}
                      </td>
                      <td>{money(line.amount)}</td>
                    </tr>
                  ))}
                </tbody>
              </table>
            </TableWrap>
            <p>
              Estimated so far, before tax and credit:{" "}
              <strong>{money(usage.data.subtotal)}</strong>
            </p>
          </>
        )}
      </section>

      <section aria-labelledby="invoices-heading">
        <div className="page-head">
          <h2 id="invoices-heading">Invoices</h2>
          <button
            type="button"
            className="button secondary"
            disabled={exportInvoices.isPending}
            onClick={() => exportInvoices.mutate()}
          >
            Download invoices (CSV)
          </button>
        </div>
        {exportInvoices.error && (
          <ErrorNotice error={exportInvoices.error} title="The invoices could not be exported" />
        )}
        {invoices.isPending && <Loading what="invoices" />}
        {invoices.error && <ErrorNotice error={invoices.error} title="Invoices could not be loaded" />}
        {invoices.data && invoiceItems.length === 0 && <p className="empty">No invoices yet.</p>}
        {invoiceItems.length > 0 && (
          <TableWrap label="Invoices">
            <table>
              <caption className="visually-hidden">Invoices, oldest first</caption>
              <thead>
                <tr>
                  <th scope="col">Month</th>
                  <th scope="col">State</th>
                  <th scope="col">Total due</th>
                </tr>
              </thead>
              <tbody>
                {invoiceItems.map((invoice) => (
                  <tr key={invoice.id}>
                    <th scope="row">
                      <Link to={`/billing/invoices/${invoice.id}`}>{periodName(invoice.periodStart)}</Link>
                    </th>
                    <td>{invoice.state}</td>
                    <td>{money(invoice.total)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </TableWrap>
        )}
        {invoices.hasNextPage && (
          <div className="actions">
            <button type="button" className="button secondary" onClick={() => void invoices.fetchNextPage()}>
              Load more
            </button>
          </div>
        )}
      </section>

      <section aria-labelledby="credit-heading">
        <h2 id="credit-heading">Credit</h2>
        {credit.error && <ErrorNotice error={credit.error} title="Credit could not be loaded" />}
        {credit.data && credit.data.entries.items.length === 0 && <p className="empty">No credit entries.</p>}
        {credit.data && credit.data.entries.items.length > 0 && (
          <TableWrap label="Credit ledger">
            <table>
              <caption className="visually-hidden">Credit ledger, oldest first</caption>
              <thead>
                <tr>
                  <th scope="col">When</th>
                  <th scope="col">Kind</th>
                  <th scope="col">Amount</th>
                  <th scope="col">Note</th>
                </tr>
              </thead>
              <tbody>
                {credit.data.entries.items.map((entry) => (
                  <tr key={entry.id}>
                    <td>
                      <time dateTime={entry.createdAt.toISOString()}>{entry.createdAt.toLocaleString()}</time>
                    </td>
                    <td>{entry.kind}</td>
                    <td>{money(entry.amount)}</td>
                    <td>{entry.note}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </TableWrap>
        )}
      </section>

      <section aria-labelledby="prices-heading">
        <h2 id="prices-heading">Prices</h2>
        {prices.error && <ErrorNotice error={prices.error} title="Prices could not be loaded" />}
        {prices.data && prices.data.length === 0 && <p className="empty">No prices are set yet.</p>}
        {prices.data && prices.data.length > 0 && (
          <TableWrap label="Prices">
            <table>
              <caption className="visually-hidden">Prices in effect and scheduled</caption>
              <thead>
                <tr>
                  <th scope="col">Flavor</th>
                  <th scope="col">Region</th>
                  <th scope="col">Price</th>
                  <th scope="col">From</th>
                  <th scope="col">Until</th>
                </tr>
              </thead>
              <tbody>
                {prices.data.map((card) => (
                  <tr key={card.id}>
                    <th scope="row">{card.flavor}</th>
                    <td>{card.region}</td>
                    <td>
                      {money(card.unitPrice)} / {card.unit}
                    </td>
                    <td>{card.effectiveFrom.toLocaleString()}</td>
                    <td>{card.effectiveUntil ? card.effectiveUntil.toLocaleString() : "—"}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </TableWrap>
        )}
      </section>
    </>
  );
}
