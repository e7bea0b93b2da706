import { useState } from "react";
import { toApiError } from "../api";

/** The API's message and a copyable request id, for any failure; a
 * failure to reach the API at all says so, whatever was being done. */
export function ErrorNotice({ error, title }: { error: unknown; title?: string }) {
  const problem = toApiError(error);
  const [copied, setCopied] = useState(false);
  const copy = async () => {
    if (problem.requestId) {
      await navigator.clipboard?.writeText(problem.requestId).catch(() => undefined);
      setCopied(true);
    }
  };
  return (
    <div className="notice notice-error" role="alert">
      <p>
        <strong>{problem.status === 0 ? "Keel is unreachable" : (title ?? "Something went wrong")}</strong>
        {": "}
        {problem.message}
      </p>
      {problem.requestId && (
        <p className="request-id">
          Request id <code>{problem.requestId}</code>{" "}
          <button type="button" className="link-button" onClick={copy}>
            {copied ? "Copied" : "Copy request id"}
          </button>
        </p>
      )}
    </div>
  );
}
