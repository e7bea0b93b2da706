import { describe, expect, it } from "vitest";
import { ApiError, toApiError } from "./errors";

describe("ApiError.fromResponse", () => {
  it("reads the API's envelope", async () => {
    const response = new Response(
      JSON.stringify({
        code: "validation_failed",
        message: "the request is invalid",
        request_id: "req-1",
        fields: [{ field: "name", code: "invalid", message: "must be 1–63 lowercase letters" }],
      }),
      { status: 400, headers: { "content-type": "application/json", "x-request-id": "req-1" } },
    );
    const error = await ApiError.fromResponse(response);
    expect(error.status).toBe(400);
    expect(error.code).toBe("validation_failed");
    expect(error.message).toBe("the request is invalid");
    expect(error.requestId).toBe("req-1");
    expect(error.fieldMessage("name")).toMatch(/lowercase/);
    expect(error.fieldMessage("flavor")).toBeUndefined();
  });

  it("keeps the request id of a response that is not an envelope", async () => {
    const response = new Response("<html>Bad gateway</html>", {
      status: 502,
      statusText: "Bad Gateway",
      headers: { "x-request-id": "req-2" },
    });
    const error = await ApiError.fromResponse(response);
    expect(error.code).toBe("unexpected_response");
    expect(error.message).toBe("The server answered 502 Bad Gateway.");
    expect(error.requestId).toBe("req-2");
  });
});

describe("toApiError", () => {
  it("turns a failed fetch into 'unreachable'", () => {
    const error = toApiError(new TypeError("Failed to fetch"));
    expect(error.status).toBe(0);
    expect(error.code).toBe("unreachable");
  });

  it("passes an ApiError through", () => {
    const original = new ApiError(409, "conflict", "no", "r");
    expect(toApiError(original)).toBe(original);
  });
});
