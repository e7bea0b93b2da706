import { useNavigate, useSearchParams } from "react-router";
import { operatorLogIn } from "../../api";
import { LoginForm } from "../../components/LoginForm";
import { PageHeading } from "../../components/PageHeading";
import { safeNext } from "../../lib/navigation";
import { queryClient } from "../../queryClient";

export function OperatorLoginPage() {
  const [params] = useSearchParams();
  const navigate = useNavigate();
  return (
    <div className="auth-page">
      <PageHeading>Keel operations</PageHeading>
      <p className="hint">For the platform's operators. Tenants sign in on the main login page.</p>
      {params.get("expired") && (
        <p className="notice" role="status">
          Your operator session has ended. Log in again.
        </p>
      )}
      <LoginForm
        logIn={operatorLogIn}
        onDone={() => {
          queryClient.clear();
          const next = safeNext(params.get("next"));
          navigate(next.startsWith("/operator/") ? next : "/operator/hosts", { replace: true });
        }}
      />
    </div>
  );
}
