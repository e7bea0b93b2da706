import { useMutation } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { useNavigate, useSearchParams } from "react-router";
import { operatorLogIn } from "../../api";
import { ErrorNotice } from "../../components/ErrorNotice";
import { PageHeading } from "../../components/PageHeading";
import { safeNext } from "../../lib/navigation";
import { queryClient } from "../../queryClient";

export function OperatorLoginPage() {
  const [params] = useSearchParams();
  const navigate = useNavigate();
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const login = useMutation({
    mutationFn: () => operatorLogIn(email.trim(), password),
    onSuccess: () => {
      queryClient.clear();
      const next = safeNext(params.get("next"));
      navigate(next.startsWith("/operator/") ? next : "/operator/hosts", { replace: true });
    },
  });
  const submit = (event: FormEvent) => {
    event.preventDefault();
    login.mutate();
  };
  return (
    <div className="auth-page">
      <PageHeading>Keel operations</PageHeading>
      <p className="hint">For the platform's operators. Tenants sign in on the main login page.</p>
      {params.get("expired") && (
        <p className="notice" role="status">
          Your operator session has ended. Log in again.
        </p>
      )}
      <form onSubmit={submit} className="form">
        <label>
          Email
          <input type="email" name="email" autoComplete="username" required maxLength={254} value={email} onChange={(event) => setEmail(event.target.value)} />
        </label>
        <label>
          Password
          <input type="password" name="password" autoComplete="current-password" required maxLength={128} value={password} onChange={(event) => setPassword(event.target.value)} />
        </label>
        {login.error && <ErrorNotice error={login.error} title="Login failed" />}
        <button type="submit" className="button" disabled={login.isPending}>
          {login.isPending ? "Logging in…" : "Log in"}
        </button>
      </form>
    </div>
  );
}
