import { Link, useNavigate, useSearchParams } from "react-router";
import { logIn } from "../api";
import { LoginForm } from "../components/LoginForm";
import { PageHeading } from "../components/PageHeading";
import { safeNext } from "../lib/navigation";
import { queryClient } from "../queryClient";

export function LoginPage() {
  const [params] = useSearchParams();
  const navigate = useNavigate();
  return (
    <div className="auth-page">
      <PageHeading>Log in to Keel</PageHeading>
      {params.get("expired") && (
        <p className="notice" role="status">
          Your session has ended. Log in again to go on where you were.
        </p>
      )}
      <LoginForm
        logIn={logIn}
        onDone={() => {
          queryClient.clear();
          navigate(safeNext(params.get("next")), { replace: true });
        }}
      />
      <p>
        New to Keel? <Link to="/signup">Create an account</Link>
      </p>
    </div>
  );
}
