"""The floor under the gateway overhead: an ASGI app that answers every request at once, served by uvicorn as the
gateway is (uvloop, httptools), with no route, no validation and no Redis.

    python -m loadtest.bare_server PORT"""

from __future__ import annotations

import sys

import uvicorn


async def app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    while (await receive()).get("more_body"):
        pass
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"ok"})


if __name__ == "__main__":
    uvicorn.run(app, host="127.0.0.1", port=int(sys.argv[1]), log_level="warning", access_log=False)
