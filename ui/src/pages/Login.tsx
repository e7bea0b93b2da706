import { useMutation } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { Link, useNavigate, useSearchParams } from "react-router";
import { logIn } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { PageHeading } from "../components/PageHeading";
import { safeNext } from "../lib/navigation";
import { queryClient } from "../queryClient";

export function LoginPage() {
  const [params] = useSearchParams();
  const navigate = useNavigate();
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const login = useMutation({
    mutationFn: () => logIn(email.trim(), password),
    onSuccess: () => {
      queryClient.clear();
      navigate(safeNext(params.get("next")), { replace: true });
    },
  });
  const submit = (event: FormEvent) => {
    event.preventDefault();
    login.mutate();
  };
  return (
    <div className="auth-page">
      <PageHeading>Log in to Keel</PageHeading>
      {params.get("expired") && (
        <p className="notice" role="status">
          Your session has ended. Log in again to go on where you were.
        </p>
      )}
      <form onSubmit={submit} className="form" noValidate={false}>
        <label>
          Email
          <input
            type="email"
            name="email"
            autoComplete="username"
            required
            maxLength={254}
            value={email}
            onChange={(event) => setEmail(event.target.value)}
          />
        </label>
        <label>
          Password
          <input
            type="password"
            name="password"
            autoComplete="current-password"
            required
            maxLength={128}
            value={password}
            onChange={(event) => setPassword(event.target.value)}
          />
        </label>
        {login.error && <ErrorNotice error={login.error} title="Login failed" />}
        <button type="submit" className="button" disabled={login.isPending}>
          {login.isPending ? "Logging in…" : "Log in"}
        </button>
      </form>
      <p>
        New to Keel? <Link to="/signup">Create an account</Link>
      </p>
    </div>
  );
}
