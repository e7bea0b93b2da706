// The ONE error normaliser: every failure the console shows (an API error
// envelope, a response that is not one, the network) becomes an ApiError.

export interface FieldProblem {
  field: string;
  code: string;
  message: string;
}

/** Status 0 means the API could not be reached at all. */
export class ApiError extends Error {
  constructor(
    readonly status: number,
    readonly code: string,
    message: string,
    readonly requestId: string | null,
    readonly fields: FieldProblem[] = [],
  ) {
    super(message);
    this.name = "ApiError";
  }

  /** Reads the documented envelope `{code, message, request_id, fields}`. */
  static async fromResponse(response: Response): Promise<ApiError> {
    const headerId = response.headers.get("x-request-id");
    let body: unknown = null;
    try {
      body = await response.json();
    } catch {
      // Not JSON: a proxy's page or an empty body.
    }
    if (isEnvelope(body)) {
      return new ApiError(
        response.status,
        body.code,
        body.message,
        body.request_id ?? headerId,
        Array.isArray(body.fields) ? body.fields.filter(isFieldProblem) : [],
      );
    }
    return new ApiError(
      response.status,
      "unexpected_response",
      `The server answered ${response.status} ${response.statusText}`.trim() + ".",
      headerId,
    );
  }

  static network(): ApiError {
    return new ApiError(
      0,
      "unreachable",
      "Keel cannot be reached. Check your connection; this page tries again by itself.",
      null,
    );
  }

  /** The message for one form field, if the API named it. */
  fieldMessage(field: string): string | undefined {
    return this.fields.find((problem) => problem.field === field)?.message;
  }
}

/** Anything thrown on the way to the API, as an ApiError. */
export function toApiError(error: unknown): ApiError {
  if (error instanceof ApiError) {
    return error;
  }
  if (error instanceof TypeError || (error instanceof Error && error.name === "FetchError")) {
    return ApiError.network();
  }
  return new ApiError(
    0,
    "client_error",
    error instanceof Error ? error.message : "Something went wrong in the console.",
    null,
  );
}

interface Envelope {
  code: string;
  message: string;
  request_id?: string;
  fields?: unknown[];
}

function isEnvelope(value: unknown): value is Envelope {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as Envelope).code === "string" &&
    typeof (value as Envelope).message === "string"
  );
}

function isFieldProblem(value: unknown): value is FieldProblem {
  return (
    typeof value === "object" &&
    value !== null &&
    typeof (value as FieldProblem).field === "string" &&
    typeof (value as FieldProblem).message === "string"
  );
}
