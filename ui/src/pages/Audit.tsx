import { useInfiniteQuery } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { api } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { TableWrap } from "../components/TableWrap";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { UpdatedAt } from "../components/UpdatedAt";

interface Filters {
  action: string;
  actor: string;
  resource: string;
  since: string;
  until: string;
}

const EMPTY: Filters = { action: "", actor: "", resource: "", since: "", until: "" };

/** A `datetime-local` value as a Date, or nothing. */
function instant(value: string): Date | undefined {
  const date = value ? new Date(value) : undefined;
  return date && !Number.isNaN(date.getTime()) ? date : undefined;
}

/** The organisation's audit log (owners and admins), oldest first, with
 * filters. */
export function AuditPage() {
  const [draft, setDraft] = useState<Filters>(EMPTY);
  const [filters, setFilters] = useState<Filters>(EMPTY);
  const entries = useInfiniteQuery({
    queryKey: ["audit", filters],
    queryFn: ({ pageParam }) =>
      api.audit.auditList({
        action: filters.action.trim() || undefined,
        actor: filters.actor.trim() || undefined,
        resource: filters.resource.trim() || undefined,
        since: instant(filters.since),
        until: instant(filters.until),
        limit: 100,
        cursor: pageParam,
      }),
    initialPageParam: undefined as string | undefined,
    getNextPageParam: (page) => page.nextCursor ?? undefined,
  });
  const set = (field: keyof Filters) => (event: { target: { value: string } }) =>
    setDraft((current) => ({ ...current, [field]: event.target.value }));
  const submit = (event: FormEvent) => {
    event.preventDefault();
    setFilters(draft);
  };
  const items = entries.data?.pages.flatMap((page) => page.items) ?? [];
  return (
    <>
      <PageHeading>Audit log</PageHeading>
      <p className="hint">Every change in this organisation: who, what, when, and the request it came from.</p>
      <form className="filters" onSubmit={submit} aria-label="Filter the audit log">
        <label>
          Action
          <input name="action" placeholder="allocation.create" maxLength={200} value={draft.action} onChange={set("action")} />
        </label>
        <label>
          Actor
          <input name="actor" placeholder="user:…" maxLength={200} value={draft.actor} onChange={set("actor")} />
        </label>
        <label>
          Resource starts with
          <input name="resource" placeholder="krn:keel:…" maxLength={500} value={draft.resource} onChange={set("resource")} />
        </label>
        <label>
          Since
          <input name="since" type="datetime-local" value={draft.since} onChange={set("since")} />
        </label>
        <label>
          Until
          <input name="until" type="datetime-local" value={draft.until} onChange={set("until")} />
        </label>
        <div className="actions">
          <button type="submit" className="button">
            Apply filters
          </button>
          <button
            type="button"
            className="button secondary"
            onClick={() => {
              setDraft(EMPTY);
              setFilters(EMPTY);
            }}
          >
            Clear
          </button>
        </div>
      </form>
      <UpdatedAt at={entries.dataUpdatedAt} fetching={entries.isFetching} />
      {entries.isPending && <Loading what="the audit log" />}
      {entries.error && <ErrorNotice error={entries.error} title="The audit log could not be loaded" />}
      {entries.data && items.length === 0 && <p className="empty">No entries match.</p>}
      {items.length > 0 && (
        <TableWrap label="Audit entries">
          <table>
            <caption className="visually-hidden">Audit entries, oldest first</caption>
            <thead>
              <tr>
                <th scope="col">When</th>
                <th scope="col">Actor</th>
                <th scope="col">Action</th>
                <th scope="col">Outcome</th>
                <th scope="col">Resource</th>
                <th scope="col">Request id</th>
              </tr>
            </thead>
            <tbody>
              {items.map((entry) => (
                <tr key={entry.id}>
                  <td>
                    <time dateTime={entry.occurredAt.toISOString()}>{entry.occurredAt.toLocaleString()}</time>
                  </td>
                  <td>
                    <code>{entry.actor}</code>
                  </td>
                  <td>{entry.action}</td>
                  <td>{entry.outcome}</td>
                  <td>
                    <code>{entry.resource}</code>
                  </td>
                  <td>
                    <code>{entry.requestId}</code>
                  </td>
                </tr>
              ))}
            </tbody>
          </table>
        </TableWrap>
      )}
      {entries.hasNextPage && (
        <div className="actions">
          <button
            type="button"
            className="button secondary"
            disabled={entries.isFetchingNextPage}
            onClick={() => void entries.fetchNextPage()}
          >
            {entries.isFetchingNextPage ? "Loading…" : "Load more"}
          </button>
        </div>
      )}
    </>
  );
}
