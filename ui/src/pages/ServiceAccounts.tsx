import { useMutation, useQuery, useQueryClient } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { useParams } from "react-router";
import { api, newIdempotencyKey, toApiError, type Role } from "../api";
import { ConfirmButton } from "../components/ConfirmButton";
import { ErrorNotice } from "../components/ErrorNotice";
import { Loading } from "../components/Loading";
import { PageHeading } from "../components/PageHeading";
import { SecretOnce } from "../components/SecretOnce";

const ROLES: Role[] = ["admin", "member", "viewer"];

/** A project's service accounts (machine identities) and their keys. */
export function ServiceAccountsPage() {
  const { projectId = "" } = useParams();
  const queryClient = useQueryClient();
  const accounts = useQuery({
    queryKey: ["service-accounts", projectId],
    queryFn: () => api.serviceAccounts.serviceAccountList({ projectId, limit: 200 }),
  });
  const [name, setName] = useState("");
  const [role, setRole] = useState<Role>("member");
  const [idempotencyKey, setIdempotencyKey] = useState(newIdempotencyKey);
  const create = useMutation({
    mutationFn: () =>
      api.serviceAccounts.serviceAccountCreate({
        projectId,
        idempotencyKey,
        serviceAccountRequest: { name: name.trim(), role },
      }),
    onSuccess: () => {
      setName("");
      setIdempotencyKey(newIdempotencyKey());
      void queryClient.invalidateQueries({ queryKey: ["service-accounts", projectId] });
    },
  });
  const problem = create.error ? toApiError(create.error) : null;
  const submit = (event: FormEvent) => {
    event.preventDefault();
    create.mutate();
  };
  return (
    <>
      <PageHeading>Service accounts</PageHeading>
      <p className="hint">
        Identities for programs (CI, scripts) in this project. Each authenticates with its own keys, exchanged at{" "}
        <code>POST /v1/auth/token</code> for short-lived access tokens.
      </p>
      <form className="form inline-form" onSubmit={submit}>
        <label>
          Name
          <input name="name" required maxLength={100} value={name} onChange={(event) => setName(event.target.value)} />
        </label>
        {problem?.fieldMessage("name") && <p className="field-error">{problem.fieldMessage("name")}</p>}
        <label>
          Role in this project
          <select name="role" value={role} onChange={(event) => setRole(event.target.value as Role)}>
            {ROLES.map((option) => (
              <option key={option} value={option}>
                {option}
              </option>
            ))}
          </select>
        </label>
        {create.error && <ErrorNotice error={create.error} title="The service account was not created" />}
        <div className="actions">
          <button type="submit" className="button" disabled={create.isPending}>
            {create.isPending ? "Creating…" : "Create service account"}
          </button>
        </div>
      </form>
      {accounts.isPending && <Loading what="service accounts" />}
      {accounts.error && <ErrorNotice error={accounts.error} title="Service accounts could not be loaded" />}
      {accounts.data && accounts.data.items.length === 0 && (
        <p className="empty">No service accounts in this project yet.</p>
      )}
      {accounts.data?.items.map((account) => (
        <ServiceAccount key={account.id} projectId={projectId} account={account} />
      ))}
    </>
  );
}

interface Account {
  id: string;
  name: string;
  role: Role;
  disabled: boolean;
}

function ServiceAccount({ projectId, account }: { projectId: string; account: Account }) {
  const queryClient = useQueryClient();
  const serviceAccountId = account.id;
  const keys = useQuery({
    queryKey: ["service-account-keys", serviceAccountId],
    queryFn: () => api.serviceAccounts.serviceAccountKeyList({ projectId, serviceAccountId }),
  });
  const [secret, setSecret] = useState<string | null>(null);
  const refresh = () => {
    void queryClient.invalidateQueries({ queryKey: ["service-accounts", projectId] });
    void queryClient.invalidateQueries({ queryKey: ["service-account-keys", serviceAccountId] });
  };
  const newKey = useMutation({
    mutationFn: () =>
      api.serviceAccounts.serviceAccountKeyCreate({ projectId, serviceAccountId, keyRequest: { expiresInDays: 90 } }),
    onSuccess: (created) => {
      setSecret(created.secret);
      refresh();
    },
  });
  const revoke = useMutation({
    mutationFn: (keyId: string) => api.serviceAccounts.serviceAccountKeyRevoke({ projectId, serviceAccountId, keyId }),
    onSettled: refresh,
  });
  const toggle = useMutation({
    mutationFn: () =>
      api.serviceAccounts.serviceAccountUpdate({
        projectId,
        serviceAccountId,
        serviceAccountUpdate: { disabled: !account.disabled },
      }),
    onSettled: refresh,
  });
  const remove = useMutation({
    mutationFn: () => api.serviceAccounts.serviceAccountDelete({ projectId, serviceAccountId }),
    onSettled: refresh,
  });
  const error = newKey.error ?? revoke.error ?? toggle.error ?? remove.error;
  const live = keys.data?.filter((key) => !key.revoked) ?? [];
  return (
    <section className="card" aria-labelledby={`account-${serviceAccountId}`}>
      <h2 id={`account-${serviceAccountId}`}>
        {account.name} <span className="hint">· {account.role}{account.disabled ? " · disabled" : ""}</span>
      </h2>
      {secret && <SecretOnce label={`New key for ${account.name}`} secret={secret} onDone={() => setSecret(null)} />}
      {error && <ErrorNotice error={error} title="That did not work" />}
      <div className="actions">
        <button type="button" className="button" disabled={newKey.isPending || account.disabled} onClick={() => newKey.mutate()}>
          New key
        </button>
        <button type="button" className="button secondary" disabled={toggle.isPending} onClick={() => toggle.mutate()}>
          {account.disabled ? "Enable" : "Disable"}
        </button>
        <ConfirmButton
          label={`Delete ${account.name}`}
          text="Delete"
          question={`Delete the service account ${account.name}? Its keys stop working at once.`}
          confirmLabel="Delete service account"
          danger
          disabled={remove.isPending}
          onConfirm={() => remove.mutate()}
        />
      </div>
      {keys.isPending && <Loading what="keys" />}
      {keys.error && <ErrorNotice error={keys.error} title="Keys could not be loaded" />}
      {keys.data && live.length === 0 && <p className="hint">No active keys.</p>}
      {live.length > 0 && (
        <ul className="keys">
          {live.map((key) => (
            <li key={key.id}>
              <code>{key.id}</code> · created {key.createdAt.toLocaleDateString()} · expires{" "}
              {key.expiresAt.toLocaleDateString()}{" "}
              <ConfirmButton
                label={`Revoke key ${key.id.slice(-8)}`}
                text="Revoke"
                question="Revoke this key? Programs using it stop working at once."
                confirmLabel="Revoke key"
                danger
                disabled={revoke.isPending}
                onConfirm={() => revoke.mutate(key.id)}
              />
            </li>
          ))}
        </ul>
      )}
    </section>
  );
}
