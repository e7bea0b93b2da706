import { useQuery } from "@tanstack/react-query";
import { Link, useParams } from "react-router";
import { api } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { TableWrap } from "../components/TableWrap";
import { decimal, formatHours, formatMoney, periodName } from "../lib/money";

/** One invoice: its lines and how the total adds up. */
export function InvoiceDetailPage() {
  const { invoiceId = "" } = useParams();
  const invoice = useQuery({
    queryKey: ["billing", "invoice", invoiceId],
    queryFn: () => api.billing.invoiceGet({ invoiceId }),
  });
  const account = useQuery({
    queryKey: ["billing", "account"],
    queryFn: () => api.billing.billingAccountGet(),
  });
  const data = invoice.data;
  // The currency's ISO digits as the API counts minor units.
  const digits = account.data?.currencyDigits ?? 2;
  return (
    <>
      <p>
        <Link to="/billing">← Billing</Link>
      </p>
      <PageHeading>Invoice{data ? ` for ${periodName(data.periodStart)}` : ""}</PageHeading>
      {invoice.isPending && <Loading what="the invoice" />}
      {invoice.error && <ErrorNotice error={invoice.error} title="The invoice could not be loaded" />}
      {data && (
        <>
          <dl className="details">
            <dt>State</dt>
            <dd>{data.state}</dd>
            <dt>Invoice</dt>
            <dd>
              <code>{data.id}</code>
            </dd>
          </dl>
          <TableWrap label="Invoice lines">
            <table>
              <caption className="visually-hidden">Lines of the invoice</caption>
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
                {data.lines.map((line) => (
                  <tr key={line.lineNo}>
                    <th scope="row">{line.flavor}</th>
                    <td>{line.region}</td>
                    <td>{formatHours(line.quantity)}</td>
                    <td>{line.rateCardId ? `${formatMoney(line.unitPrice, data.currency, digits)} / ${line.unit}` : "no price"}</td>
                    <td>{formatMoney(line.amount, data.currency, digits)}</td>
                  </tr>
                ))}
              </tbody>
            </table>
          </TableWrap>
          <dl className="details">
            <dt>Subtotal</dt>
            <dd>{formatMoney(data.subtotal, data.currency, digits)}</dd>
            <dt>Credit applied</dt>
            <dd>{formatMoney(-data.credits, data.currency, digits)}</dd>
            <dt>Tax ({decimal(data.taxRateBp, 2)} %)</dt>
            <dd>{formatMoney(data.tax, data.currency, digits)}</dd>
            <dt>Total due</dt>
            <dd>
              <strong>{formatMoney(data.total, data.currency, digits)}</strong>
            </dd>
          </dl>
        </>
      )}
    </>
  );
}
