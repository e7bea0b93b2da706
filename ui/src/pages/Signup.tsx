import { useMutation } from "@tanstack/react-query";
import { useState, type FormEvent } from "react";
import { Link, useNavigate } from "react-router";
import { signUp, toApiError } from "../api";
import { ErrorNotice } from "../components/ErrorNotice";
import { PageHeading } from "../components/PageHeading";
import { queryClient } from "../queryClient";

export const MIN_PASSWORD = 10;
export const MAX_PASSWORD = 128;

export function SignupPage() {
  const navigate = useNavigate();
  const [email, setEmail] = useState("");
  const [password, setPassword] = useState("");
  const [tenantName, setTenantName] = useState("");
  const signup = useMutation({
    mutationFn: () => signUp(email.trim(), password, tenantName.trim()),
    onSuccess: () => {
      queryClient.clear();
      navigate("/", { replace: true });
    },
  });
  const problem = signup.error ? toApiError(signup.error) : null;
  const submit = (event: FormEvent) => {
    event.preventDefault();
    signup.mutate();
  };
  return (
    <div className="auth-page">
      <PageHeading>Create your Keel account</PageHeading>
      <form onSubmit={submit} className="form">
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
            aria-describedby={problem?.fieldMessage("email") ? "email-error" : undefined}
          />
        </label>
        {problem?.fieldMessage("email") && (
          <p id="email-error" className="field-error">
            {problem.fieldMessage("email")}
          </p>
        )}
        <label>
          Password
          <input
            type="password"
            name="password"
            autoComplete="new-password"
            required
            minLength={MIN_PASSWORD}
            maxLength={MAX_PASSWORD}
            value={password}
            onChange={(event) => setPassword(event.target.value)}
            aria-describedby="password-hint"
          />
        </label>
        <p id="password-hint" className="hint">
          {MIN_PASSWORD} to {MAX_PASSWORD} characters.
        </p>
        {problem?.fieldMessage("password") && <p className="field-error">{problem.fieldMessage("password")}</p>}
        <label>
          Organisation name
          <input
            type="text"
            name="tenant_name"
            autoComplete="organization"
            required
            maxLength={100}
            value={tenantName}
            onChange={(event) => setTenantName(event.target.value)}
          />
        </label>
        {problem?.fieldMessage("tenant_name") && (
          <p className="field-error">{problem.fieldMessage("tenant_name")}</p>
        )}
        {signup.error && <ErrorNotice error={signup.error} title="Sign-up failed" />}
        <button type="submit" className="button" disabled={signup.isPending}>
          {signup.isPending ? "Creating account…" : "Create account"}
        </button>
      </form>
      <p>
        Already have an account? <Link to="/login">Log in</Link>
      </p>
    </div>
  );
}
