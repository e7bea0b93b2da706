import { useState } from "react";

/** A secret the API shows once (a key, an invitation token), with a copy
 * button and the warning that it will not be shown again. */
export function SecretOnce({ label, secret, onDone }: { label: string; secret: string; onDone: () => void }) {
  const [copied, setCopied] = useState(false);
  return (
    <div className="notice secret" role="region" aria-label={label}>
      <p>
        <strong>{label}</strong> — copy it now: it is shown only this once.
      </p>
      <p>
        <code className="secret-value">{secret}</code>
      </p>
      <div className="actions">
        <button
          type="button"
          className="button"
          onClick={async () => {
            await navigator.clipboard?.writeText(secret).catch(() => undefined);
            setCopied(true);
          }}
        >
          {copied ? "Copied" : "Copy"}
        </button>
        <button type="button" className="button secondary" onClick={onDone}>
          Done
        </button>
      </div>
    </div>
  );
}
