import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { Link, useParams } from "react-router";
import { api, toApiError, type AllocationView } from "../api";
import { ConfirmButton } from "../components/ConfirmButton";
import { ErrorNotice } from "../components/ErrorNotice";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { StateBadge } from "../components/StateBadge";
import { UpdatedAt } from "../components/UpdatedAt";
import { allowedActions, refreshInterval, stateLabel } from "../lib/allocations";
import { UNREACHABLE_RETRY_MS } from "../queryClient";
import { NotFoundPage } from "./NotFound";

type Action = "stop" | "start" | "terminate";

export function AllocationDetailPage() {
  const { projectId = "", allocationId = "" } = useParams();
  const queryClient = useQueryClient();
  const key = ["allocation", projectId, allocationId];
  const allocation = useQuery({
    queryKey: key,
    queryFn: () => api.allocations.allocationGet({ projectId, allocationId }),
    refetchInterval: (query) =>
      query.state.data
        ? refreshInterval([query.state.data.state])
        : query.state.error && toApiError(query.state.error).status === 0
          ? UNREACHABLE_RETRY_MS
          : false,
  });
  const act = useMutation({
    mutationFn: (action: Action) => {
      const request = { projectId, allocationId };
      switch (action) {
        case "stop":
          return api.allocations.allocationStop(request);
        case "start":
          return api.allocations.allocationStart(request);
        case "terminate":
          return api.allocations.allocationTerminate(request);
      }
    },
    onSuccess: (updated: AllocationView) => {
      queryClient.setQueryData(key, updated);
      void queryClient.invalidateQueries({ queryKey: ["allocations", projectId] });
      void queryClient.invalidateQueries({ queryKey: ["history", allocationId] });
    },
  });

  if (allocation.error && toApiError(allocation.error).status === 404) {
    return <NotFoundPage what="This allocation" />;
  }
  const data = allocation.data;
  const actions = data ? allowedActions(data.state) : new Set();
  return (
    <>
      <p className="breadcrumb">
        <Link to={`/projects/${projectId}/allocations`}>Allocations</Link>
      </p>
      <PageHeading>{data ? data.name : "Allocation"}</PageHeading>
      <UpdatedAt at={allocation.dataUpdatedAt} fetching={allocation.isFetching} />
      {allocation.isPending && <Loading what="the allocation" />}
      {allocation.error && <ErrorNotice error={allocation.error} title="The allocation could not be loaded" />}
      {data && (
        <>
          <div className="actions" aria-label="Actions" role="group">
            {actions.has("terminal") && (
              <Link className="button secondary" to={`/projects/${projectId}/allocations/${allocationId}/terminal`}>
                Open terminal
              </Link>
            )}
            {actions.has("stop") && (
              <ConfirmButton
                label="Stop"
                question={`Stop ${data.name}? Its process ends; its host keeps its place.`}
                confirmLabel="Stop allocation"
                disabled={act.isPending}
                onConfirm={() => act.mutate("stop")}
              />
            )}
            {actions.has("start") && (
              <ConfirmButton
                label="Start"
                question={`Start ${data.name} again?`}
                confirmLabel="Start allocation"
                disabled={act.isPending}
                onConfirm={() => act.mutate("start")}
              />
            )}
            {actions.has("terminate") && (
              <ConfirmButton
                label="Terminate"
                question={`Terminate ${data.name}? This cannot be undone: its process and files are removed.`}
                confirmLabel="Terminate allocation"
                danger
                disabled={act.isPending}
                onConfirm={() => act.mutate("terminate")}
              />
            )}
          </div>
          {act.error && <ErrorNotice error={act.error} title="The action was refused" />}
          <dl className="details">
            <dt>State</dt>
            <dd>
              <StateBadge state={data.state} />
            </dd>
            {data.failureReason && (
              <>
                <dt>Failure reason</dt>
                <dd className="failure">{data.failureReason}</dd>
              </>
            )}
            <dt>Flavor</dt>
            <dd>{data.flavor}</dd>
            <dt>Region</dt>
            <dd>{data.region}</dd>
            <dt>Command</dt>
            <dd>
              <code>{data.command.join(" ")}</code>
            </dd>
            <dt>Created</dt>
            <dd>{data.createdAt.toLocaleString()}</dd>
            <dt>Last change</dt>
            <dd>{data.updatedAt.toLocaleString()}</dd>
            <dt>Id</dt>
            <dd>
              <code>{data.id}</code>
            </dd>
            <dt>Resource name</dt>
            <dd>
              <code>{data.resourceName}</code>
            </dd>
          </dl>
          <History allocation={data} />
        </>
      )}
    </>
  );
}

/** The allocation's state changes, from the audit log (owners and admins). */
function History({ allocation }: { allocation: AllocationView }) {
  const history = useQuery({
    queryKey: ["history", allocation.id, allocation.version],
    queryFn: () => api.audit.auditList({ resource: allocation.resourceName, limit: 100 }),
    retry: false,
  });
  const forbidden = history.error && toApiError(history.error).status === 403;
  return (
    <section aria-labelledby="history-heading">
      <h2 id="history-heading">History</h2>
      {history.isPending && <Loading what="the history" />}
      {forbidden && <p className="hint">Only owners and admins of the organisation can read the history.</p>}
      {history.error && !forbidden && <ErrorNotice error={history.error} title="The history could not be loaded" />}
      {history.data && (
        <ol className="history">
          {history.data.items.map((entry) => {
            const details = entry.details as { from?: string; to?: string; failure_reason?: string | null };
            return (
              <li key={entry.id}>
                <time dateTime={entry.occurredAt.toISOString()}>{entry.occurredAt.toLocaleString()}</time>{" "}
                {entry.action === "allocation.transition" && details.to
                  ? `${label(details.from)} → ${label(details.to)}`
                  : (ACTIONS[entry.action] ?? entry.action)}
                {details.failure_reason ? ` (${details.failure_reason})` : ""}
              </li>
            );
          })}
        </ol>
      )}
    </section>
  );
}

/** What the audit's other actions on an allocation mean to its owner. */
const ACTIONS: Record<string, string> = {
  "allocation.create": "Launched",
  "allocation.stop": "Stop requested",
  "allocation.start": "Start requested",
  "allocation.terminate": "Termination requested",
  "task.issue": "Task sent to its host",
  "allocation.observe": "Reported by its host",
  "allocation.reconcile": "Checked by the reconciler",
  "allocation.retry": "Retried",
  "allocation.terminal_open": "Terminal opened",
  "allocation.terminal_close": "Terminal closed",
};

function label(state: string | undefined): string {
  return state ? stateLabel(state as AllocationView["state"]) ?? state : "—";
}
